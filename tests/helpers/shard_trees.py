"""Source folders for data_tools/shard.py and reading its output back: noise images,
aligned A|B trees, the tool run in-process, manifests, file trees and the samples of
every shard (by plain tarfile and by webdataset)."""
from __future__ import annotations

import io
import json
import random
import sys
import tarfile
from pathlib import Path

import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_tools import shard
from pipeline import storage
from pipeline.data.format import TAR_MTIME

ROOT = Path(__file__).resolve().parents[2]
SHARD_PY = [sys.executable, str(ROOT / "data_tools" / "shard.py")]


def noise_image(width, height, fmt="JPEG", seed=0) -> bytes:
    """An image of seeded random pixels, encoded as `fmt`."""
    rng = random.Random(seed)
    im = Image.frombytes("RGB", (width, height), bytes(rng.getrandbits(8) for _ in range(width * height * 3)))
    buffer = io.BytesIO()
    im.save(buffer, fmt)
    return buffer.getvalue()


def make_aligned(root: Path, counts: dict, size=(32, 16)) -> dict:
    """A|B images in root/SPLIT/ (or flat for split None); returns {relpath: bytes}."""
    files = {}
    for split, n in counts.items():
        for i in range(n):
            rel = f"{split}/{i}.jpg" if split else f"{i}.jpg"
            files[rel] = noise_image(*size, seed=f"{split}/{i}")
    write_files(root, files)
    return files


def write_files(root: Path, files: dict) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def run_shard(*args) -> int:
    """shard.py in this process, quiet; returns its exit code."""
    return shard.main([str(a) for a in args] + ["--quiet"])


def manifest(dest) -> dict:
    return json.loads(storage.read_bytes(storage.join(str(dest), "manifest.json")))


def tree(root: Path) -> dict:
    """{relative path: bytes} of every visible file below root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def samples_by_tarfile(dest: str) -> dict:
    """{(split, key): {suffix: bytes}} read back with plain tarfile via storage."""
    found = {}
    for split, info in manifest(dest)["splits"].items():
        for entry in info["shards"]:
            with storage.open_read(storage.join(dest, entry["name"])) as f, \
                    tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    key, _, suffix = member.name.partition(".")
                    assert member.mtime == TAR_MTIME and member.uid == 0
                    found.setdefault((split, key), {})[suffix] = tar.extractfile(member).read()
    return found


def samples_by_webdataset(dest: str) -> dict:
    """The same, read by webdataset: its WebDataset locally, its tar iterators over
    storage streams on S3 (webdataset 1.0.2 has no s3:// opener)."""
    urls = [storage.join(dest, s["name"]) for info in manifest(dest)["splits"].values()
            for s in info["shards"]]
    if storage.is_s3(dest):
        samples = list(group_by_keys(tar_file_expander(
            {"url": url, "stream": storage.open_read(url)} for url in urls)))
    else:
        samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    found = {(s["__url__"].rsplit("/", 1)[1].rsplit("-", 1)[0], s["__key__"]):
             {k: v for k, v in s.items() if not k.startswith("__")} for s in samples}
    assert len(found) == len(samples)  # no key twice
    return found


def assert_pairs_intact(found: dict, files: dict) -> None:
    """Every source A|B image present exactly once, bytes untouched, JSON consistent."""
    assert len(found) == len(files)
    sources = {}
    for (split, _key), members in found.items():
        meta = json.loads(members["json"])
        assert meta["layout"] == "pair" and meta["split_x"] == meta["width"] // 2
        assert members["pair.jpg"] == files[meta["source"]]
        sources[meta["source"]] = split
    assert set(sources) == set(files)
    assert all(rel.startswith(split + "/") for rel, split in sources.items() if "/" in rel)
