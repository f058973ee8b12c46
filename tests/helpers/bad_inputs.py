"""Bad inputs for the bad-input suites (tests/unit/test_bad_inputs.py and
tests/integration/test_bad_inputs_runs.py): header bombs, 16-bit gray, path-traversal
names, pairs of different sizes, and a folder of shards holding every bad kind at once."""
from __future__ import annotations

import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np

from pipeline import data
from tests.helpers.images import SIZE, add_member, image_bytes, sample_pixels


def bomb_png() -> bytes:
    """A valid PNG header claiming 100000 x 100000 pixels (30 GB once decoded)."""
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body +
                                struct.pack(">I", zlib.crc32(kind + body)))
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def gray16(pixels: np.ndarray) -> bytes:
    """A 16-bit grayscale PNG of 8-bit `pixels` (v -> v * 257: the reader gives v back)."""
    return image_bytes(pixels.astype(np.uint16) * 257)


def pair_members(key: str, target_size: int = SIZE) -> list[tuple[str, bytes]]:
    """A good separate-layout sample: target = 255 - input (at target_size pixels)."""
    return [(f"{key}.input.png", image_bytes(sample_pixels(key))),
            (f"{key}.target.png", image_bytes(255 - sample_pixels(key, target_size)))]


TRAVERSAL = ["../escape", "/abs/evil", "sub/../../up"]  # member names before .input.png


def traversal_members() -> list[tuple[str, bytes]]:
    """Samples named to climb out of wherever they would be extracted: absolute, `..`."""
    good = image_bytes(sample_pixels("t"))
    return [(f"{name}.{kind}.png", good) for name in TRAVERSAL for kind in ("input", "target")]


def mixed_members() -> list[tuple[str, bytes]]:
    """Good and bad samples side by side (bad_folder says what each must count)."""
    gray = sample_pixels("gray")[..., 0]
    return [*pair_members("small_target", SIZE // 2),                       # sizes differ
            ("gray.input.png", image_bytes(gray)), ("gray.target.png", gray16(255 - gray)),
            ("odd.pair.png", image_bytes(sample_pixels("odd", 33)[:SIZE])),  # 16 | 17 wide
            ("bomb.input.png", bomb_png()), ("bomb.target.png", image_bytes(sample_pixels("b"))),
            ("cut.input.png", image_bytes(sample_pixels("c"))[:60]),        # corrupt image
            ("cut.target.png", image_bytes(sample_pixels("c"))),
            *traversal_members()]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            add_member(tar, name, payload)
    return path


def write_manifest(folder: Path, splits: dict[str, dict[str, int]]) -> None:
    """manifest.json listing {split: {shard name: samples claimed}} (byte counts true)."""
    size = lambda name: (folder / name).stat().st_size
    manifest = {"format_version": 1, "options": {}, "splits": {
        split: {"samples": sum(shards.values()), "bytes": sum(size(name) for name in shards),
                "shards": [{"name": name, "samples": n, "bytes": size(name)}
                           for name, n in shards.items()]} for split, shards in splits.items()}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def bad_folder(folder: Path) -> dict[str, int]:
    """Shards of every bad kind at once, plus good ones; returns the skips one epoch of
    training must count."""
    folder.mkdir(parents=True)
    for name in ("good-0", "good-1", "good-2", "truncated"):
        write_tar(folder / f"{name}.tar", [m for k in range(6)
                                           for m in pair_members(f"{name}n{k}")])
    (folder / "truncated.tar").write_bytes((folder / "truncated.tar").read_bytes()[:5000])
    (folder / "random.tar").write_bytes(np.random.default_rng(0).bytes(5000))
    write_tar(folder / "mixed.tar", mixed_members())
    write_tar(folder / "empty.tar", [])
    write_tar(folder / "val.tar", [m for k in range(3) for m in pair_members(f"v{k}")] +
              [("cut.input.png", b"\x89PNG broken"), ("cut.target.png", b"\x89PNG broken")])
    write_manifest(folder, {
        "train": {"good-0.tar": 6, "good-1.tar": 6, "good-2.tar": 10,  # over-counted
                  "truncated.tar": 6, "random.tar": 6, "empty.tar": 0,
                  "mixed.tar": data.count_samples(str(folder / "mixed.tar"))},
        "val": {"val.tar": 4}})
    return {"truncated_shard": 2, "unsafe_name": 3, "too_large": 1, "corrupt_image": 1,
            "manifest_mismatch": 1}


def first_epoch_skips(loader) -> dict:
    """Everything epoch 0 skipped, once epoch_batches has read it: its epoch_skipped
    misses what a worker skipped after its last batch."""
    assert loader.epoch == 1
    return loader.state_dict()["skipped_before"]
