"""Tiny images and tar shards for the data-stream tests: smooth pixels unique to a key,
PNG/JPEG bytes, tar members, shard folders with a manifest, and reading a loader's epoch."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import data
from pipeline.config import DataConfig

SIZE = 16  # pixels of the test images: tiny, the 2 shared cores stay free


def image_bytes(pixels: np.ndarray, fmt: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **save)
    return buffer.getvalue()


def sample_pixels(key: str, size: int = SIZE) -> np.ndarray:
    """A smooth image unique to `key` (smooth: resizes keep it a known function)."""
    rng = np.random.default_rng(data.derive_seed(key))
    ramp = np.linspace(0, 1, size)
    base = rng.uniform(40, 200, 3) + rng.uniform(-30, 30, 3) * ramp[:, None, None] \
        + rng.uniform(-30, 30, 3) * ramp[None, :, None]
    return base.round().astype(np.uint8)


def write_image(path, pixels: np.ndarray) -> str:
    """`pixels` saved as the image file `path` (its suffix names the format); returns the path."""
    Image.fromarray(pixels).save(path)
    return str(path)


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_dataset(folder: Path, counts: list[int], split: str = "train",
                  prefix: str = "", corrupt: tuple[str, ...] = ()) -> list[str]:
    """Shards `split-00000N.tar` of PNG pairs (target = 255 - input) + manifest.json;
    returns every key. The input images of the `corrupt` keys are cut short."""
    folder.mkdir(parents=True, exist_ok=True)
    keys, entries = [], []
    for number, count in enumerate(counts):
        name = f"{split}-{number:06d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for i in range(count):
                key = f"{prefix}s{number:02d}n{i:03d}"
                pixels = sample_pixels(key)
                add_member(tar, f"{key}.input.png", image_bytes(pixels)[:60 if key in corrupt else None])
                add_member(tar, f"{key}.target.png", image_bytes(255 - pixels))
                add_member(tar, f"{key}.json", b'{"layout": "separate"}')
                keys.append(key)
        entries.append({"name": name, "samples": count, "bytes": (folder / name).stat().st_size})
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else \
        {"format_version": 1, "splits": {}, "options": {}}
    manifest["splits"][split] = {"samples": sum(counts),
                                 "bytes": sum(e["bytes"] for e in entries), "shards": entries}
    manifest_path.write_text(json.dumps(manifest))
    return keys


def config(folder, **overrides) -> DataConfig:
    base = dict(train=str(folder), val=str(folder), load_size=18, crop_size=16,
                batch_size=2, num_workers=0, shuffle_buffer=4)
    return DataConfig(**{**base, **overrides})


def epoch_batches(loader) -> list[dict]:
    """The batches of the loader's current epoch, every update's (stops at the first
    update of the next); sets loader.epoch_skipped to the skip counts as the epoch ended."""
    epoch, batches = loader.epoch, []
    while True:
        skipped = loader.skipped
        update = next(loader)
        if update.epoch != epoch:
            loader.epoch_skipped = skipped
            return batches
        batches += update.batches


def next_batch(loader) -> dict:
    """The one batch of a loader's next update (train.grad_accum 1)."""
    update = next(loader)
    assert len(update.batches) == 1
    return update.batches[0]


def keys_of(batches) -> list[str]:
    return [key for batch in batches for key in batch["key"]]
