"""Finds image pairs in a SOURCE, local or s3://, without opening a single image.

Three layouts (see `find_pairs`):
- "aligned": each image holds input|target side by side (the reference pix2pix layout);
- "folders": `A/` inputs and `B/` targets matched by file name (extension aside);
- "list":    a CSV or JSONL file of `input,target` paths or URLs (optional `split`).
Folders `train/ val/ test/` (inside SOURCE, or inside A/ and B/) become splits; a flat
folder is one split. The convention everywhere: input = A (left half, A folder, first
column), target = B. Sizes come from the listing: they plan shards before any read.
"""
import csv
import hashlib
import io
import json
import os
import posixpath
import re
from dataclasses import dataclass

from pipeline import storage
from pipeline.data.format import IMAGE_EXTS, UNSUPPORTED_IMAGE_EXTS
from pipeline.errors import UserError

# what the trainer reads, and what it cannot (rejected and counted, never ignored)
IMAGE_SUFFIXES = tuple(f".{ext}" for ext in IMAGE_EXTS + UNSUPPORTED_IMAGE_EXTS)
SPLIT_FOLDERS = ("train", "val", "test")
LAYOUTS = ("auto", "aligned", "folders", "list")
LIST_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True)
class Pair:
    """One sample to pack. `target` is None for an aligned A|B image (layout "pair");
    `input` or `target` is None when that half is missing (rejected at packing)."""
    key: str          # unique in its split, no dots, no slashes
    name: str         # where it came from, relative to SOURCE (or as listed)
    layout: str       # "pair" (one A|B image) or "separate" (two files)
    input: str | None
    target: str | None
    nbytes: int       # source bytes of both halves, for shard planning


class SourceError(UserError):
    """SOURCE cannot be read as any layout, or holds no pairs."""


def find_pairs(source: str, layout: str = "auto", split: str = "train") -> dict[str, list[Pair]]:
    """{split: pairs sorted by key}. `split` names the one split of a flat source."""
    if not storage.exists(source):
        raise SourceError(f"{source}: no such folder or list file")
    if layout == "auto":
        layout = detect_layout(source)
    if layout == "list":
        by_split = _list_pairs(source, split)
    elif layout == "folders":
        by_split = _folder_pairs(source, split)
    elif layout == "aligned":
        by_split = _aligned_pairs(source, split)
    else:
        raise ValueError(f"unknown layout {layout!r}: choose from {', '.join(LAYOUTS)}")
    by_split = {s: pairs for s, pairs in sorted(by_split.items()) if pairs}
    if not by_split:
        raise SourceError(f"no image pairs found in {source} (layout {layout})")
    return by_split


def detect_layout(source: str) -> str:
    if source.lower().endswith(LIST_SUFFIXES):
        return "list"
    both = all(storage.exists(storage.join(source, half)) for half in ("A", "B"))
    return "folders" if both else "aligned"


def _images(folder: str) -> dict[str, int]:
    """{path relative to folder: bytes} of the image files below it."""
    sizes = storage.list_sizes(folder)
    prefix = folder.rstrip("/") + "/"
    return {url[len(prefix):]: n for url, n in sizes.items()
            if url.lower().endswith(IMAGE_SUFFIXES) and not _hidden(url[len(prefix):])}


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _by_split(images: dict[str, int], flat_split: str) -> dict[str, tuple[str, dict]]:
    """{split: (sub-folder, {path relative to it: bytes})}: the split folders if any hold
    images (other files are then ignored), else the whole folder as `flat_split`."""
    grouped = {}
    for rel, n in images.items():
        top, _, rest = rel.partition("/")
        if top in SPLIT_FOLDERS and rest:
            grouped.setdefault(top, (top, {}))[1][rest] = n
    return grouped or {flat_split: ("", images)}


def _aligned_pairs(source: str, split: str) -> dict[str, list[Pair]]:
    by_split = {}
    for name, (sub, images) in _by_split(_images(source), split).items():
        keys = _keys(list(images))
        by_split[name] = sorted(
            (Pair(keys[rel], posixpath.join(sub, rel), "pair",
                  storage.join(source, sub, rel), None, n) for rel, n in images.items()),
            key=lambda p: p.key)
    return by_split


def _folder_pairs(source: str, split: str) -> dict[str, list[Pair]]:
    """A/ and B/ matched by path without extension; a file alone is a missing half."""
    a_root, b_root = storage.join(source, "A"), storage.join(source, "B")
    a_splits, b_splits = _by_split(_images(a_root), split), _by_split(_images(b_root), split)
    by_split = {}
    for name in sorted(set(a_splits) | set(b_splits)):
        sub = (a_splits.get(name) or b_splits[name])[0]
        a_stems = _by_stem(a_splits.get(name, ("", {}))[1])
        b_stems = _by_stem(b_splits.get(name, ("", {}))[1])
        keys = _keys(list(set(a_stems) | set(b_stems)))
        by_split[name] = sorted(
            (_folder_pair(keys[stem], sub, a_root, b_root, a_stems.get(stem), b_stems.get(stem))
             for stem in keys), key=lambda p: p.key)
    return by_split


def _folder_pair(key, sub, a_root, b_root, a, b) -> Pair:
    """`a`, `b`: (path relative to the split folder, bytes), or None if missing."""
    return Pair(key, posixpath.join(sub, (a or b)[0]), "separate",
                storage.join(a_root, sub, a[0]) if a else None,
                storage.join(b_root, sub, b[0]) if b else None,
                (a[1] if a else 0) + (b[1] if b else 0))


def _by_stem(images: dict[str, int]) -> dict[str, tuple[str, int]]:
    """{relative path without extension: (relative path, bytes)}; first name wins."""
    stems = {}
    for rel in sorted(images):
        stems.setdefault(posixpath.splitext(rel)[0], (rel, images[rel]))
    return stems


def _list_pairs(list_url: str, split: str) -> dict[str, list[Pair]]:
    """Rows of `input,target[,split]`; relative paths are relative to the list file."""
    text = storage.read_bytes(list_url).decode("utf-8")
    if list_url.lower().endswith(".jsonl"):
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    if rows and not {"input", "target"} <= set(rows[0]):
        raise SourceError(f"{list_url}: needs columns/fields 'input' and 'target', "
                          f"found {sorted(rows[0])}")
    rows = [(r.get("split") or split, r["input"] or r["target"],
             _resolve(list_url, r["input"]), _resolve(list_url, r["target"])) for r in rows]
    sizes = _sizes_of({url for row in rows for url in row[2:] if url})
    by_split = {}
    for name, listed, a, b in rows:
        by_split.setdefault(name, []).append((listed, a, b))
    pairs_by_split = {}
    for name, entries in by_split.items():
        keys = _keys([listed for listed, _, _ in entries])
        pairs_by_split[name] = sorted(
            (Pair(keys[listed], listed, "separate", a if a in sizes else None,
                  b if b in sizes else None, sizes.get(a, 0) + sizes.get(b, 0))
             for listed, a, b in entries), key=lambda p: p.key)
    return pairs_by_split


def _resolve(list_url: str, path: str | None) -> str | None:
    if not path or "://" in path or path.startswith("/"):
        return path or None
    if storage.is_s3(list_url):
        return storage.join(posixpath.dirname(list_url), path)
    return os.path.join(os.path.dirname(os.path.abspath(list_url.removeprefix("file://"))), path)


def _sizes_of(urls: set[str]) -> dict[str, int]:
    """Sizes by listing each distinct parent folder once (not one request per file)."""
    sizes = {}
    for folder in sorted({posixpath.dirname(u) for u in urls}):
        sizes.update(storage.list_sizes(folder, recursive=False))
    return {u: sizes[u] for u in urls if u in sizes}


def _keys(names: list[str]) -> dict[str, str]:
    """{name: key}: the name without extension, anything but [A-Za-z0-9_-] made '_'
    (webdataset splits a key at its first dot); a clash gets a hash of the name."""
    keys, taken = {}, set()
    for name in sorted(set(names)):
        key = re.sub(r"[^A-Za-z0-9_-]", "_", posixpath.splitext(name)[0]) or "_"
        if key in taken:
            key += "_" + hashlib.sha1(name.encode()).hexdigest()[:8]
        taken.add(key)
        keys[name] = key
    return keys
