"""Finds image pairs in a SOURCE, local or s3://, without opening a single image, and plans
them into shards (`plan_shards`: seeded, by count and bytes, before any read).

Three layouts (see `find_pairs`):
- "aligned": each image holds input|target side by side (the reference pix2pix layout);
- "folders": `A/` inputs and `B/` targets matched by file name (extension aside);
- "list":    a CSV or JSONL file of `input,target` paths or URLs (optional `split`).
Folders `train/ val/ test/` (inside SOURCE, or inside A/ and B/) become splits; a flat
folder is one split. The convention everywhere: input = A (left half, A folder, first
column), target = B. Sizes come from the listing: they plan shards before any read.
Which files are images is format.list_input_images's policy (translate.py's too): hidden
ones are skipped and counted. What the listing alone shows to be wrong (two files for one
name in A/ or B/, a list row given twice) becomes a pair with a `problem`: rejected at
packing like any other bad pair, counted and listed in rejected.jsonl.
"""
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import posixpath
import random
import re
from dataclasses import dataclass

from pipeline import storage
from pipeline.data.format import list_input_images, listing_error
from pipeline.errors import UserError

SPLIT_FOLDERS = ("train", "val", "test")
LAYOUTS = ("auto", "aligned", "folders", "list")
LIST_SUFFIXES = (".csv", ".jsonl")
SPLIT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")  # it names shard files: no '/'


@dataclass(frozen=True)
class Pair:
    """One sample to pack. `target` is None for an aligned A|B image (layout "pair");
    `input` or `target` is None when that half is missing (rejected at packing).
    `problem` (reason, detail): a rejection the listing already shows."""
    key: str          # unique in its split, no dots, no slashes
    name: str         # where it came from, relative to SOURCE (or as listed)
    layout: str       # "pair" (one A|B image) or "separate" (two files)
    input: str | None
    target: str | None
    nbytes: int       # source bytes of both halves, for shard planning
    problem: tuple = ()

    def digest_row(self) -> tuple:
        """What a shard's plan digest covers: `problem` only when there is one, so plans
        made before it existed keep their digests (a re-run finds their shards done)."""
        row = dataclasses.astuple(self)
        return row if self.problem else row[:-1]


class SourceError(UserError):
    """SOURCE cannot be read as any layout, or holds no pairs."""


def find_pairs(source: str, layout: str = "auto", split: str = "train",
               hidden: list | None = None) -> dict[str, list[Pair]]:
    """{split: pairs sorted by key}. `split` names the one split of a flat source; the
    hidden image files skipped are appended to `hidden` (paths relative to SOURCE)."""
    if not storage.exists(source):
        raise SourceError(f"{source}: no such folder or list file")
    check_split_name(split, "--split")
    if layout == "auto":
        layout = detect_layout(source)
    hidden = [] if hidden is None else hidden
    if layout == "list":
        by_split = _list_pairs(source, split)
    elif layout == "folders":
        by_split = _folder_pairs(source, split, hidden)
    elif layout == "aligned":
        by_split = _aligned_pairs(source, split, hidden)
    else:
        raise ValueError(f"unknown layout {layout!r}: choose from {', '.join(LAYOUTS)}")
    by_split = {s: pairs for s, pairs in sorted(by_split.items()) if pairs}
    if not by_split:
        raise SourceError(f"no image pairs found in {source} (layout {layout})")
    return by_split


def check_split_name(name, where: str) -> None:
    """A split names its shard files (SPLIT-NNNNNN.tar): letters, digits, '_', '-', '.'."""
    if not isinstance(name, str) or not SPLIT_NAME.fullmatch(name):
        raise SourceError(f"{where}: split {name!r} is not a usable name: use letters, digits, "
                          "'_', '-' and '.' (it names the shard files)")


def detect_layout(source: str) -> str:
    if source.lower().endswith(LIST_SUFFIXES):
        return "list"
    both = all(storage.exists(storage.join(source, half)) for half in ("A", "B"))
    return "folders" if both else "aligned"


def _images(folder: str, hidden: list, prefix: str) -> dict[str, int]:
    """{path relative to folder: bytes} of the image files below it; the hidden ones go
    to `hidden`, named `prefix` + their path."""
    found = list_input_images(folder)
    hidden += [prefix + rel for rel in found.hidden]
    return found.images


def _by_split(images: dict[str, int], flat_split: str) -> dict[str, tuple[str, dict]]:
    """{split: (sub-folder, {path relative to it: bytes})}: the split folders if any hold
    images (other files are then ignored), else the whole folder as `flat_split`."""
    grouped = {}
    for rel, n in images.items():
        top, _, rest = rel.partition("/")
        if top in SPLIT_FOLDERS and rest:
            grouped.setdefault(top, (top, {}))[1][rest] = n
    return grouped or {flat_split: ("", images)}


def _aligned_pairs(source: str, split: str, hidden: list) -> dict[str, list[Pair]]:
    by_split = {}
    for name, (sub, images) in _by_split(_images(source, hidden, ""), split).items():
        keys = _keys(list(images))
        by_split[name] = sorted(
            (Pair(keys[rel], posixpath.join(sub, rel), "pair",
                  storage.join(source, sub, rel), None, n) for rel, n in images.items()),
            key=lambda p: p.key)
    return by_split


def _folder_pairs(source: str, split: str, hidden: list) -> dict[str, list[Pair]]:
    """A/ and B/ matched by path without extension; a file alone is a missing half."""
    a_root, b_root = storage.join(source, "A"), storage.join(source, "B")
    a_splits = _by_split(_images(a_root, hidden, "A/"), split)
    b_splits = _by_split(_images(b_root, hidden, "B/"), split)
    by_split = {}
    for name in sorted(set(a_splits) | set(b_splits)):
        sub = (a_splits.get(name) or b_splits[name])[0]
        a_stems = _by_stem(a_splits.get(name, ("", {}))[1])
        b_stems = _by_stem(b_splits.get(name, ("", {}))[1])
        keys = _keys(list(set(a_stems) | set(b_stems)))
        by_split[name] = sorted(
            (_folder_pair(keys[stem], sub, a_root, b_root, a_stems.get(stem, []), b_stems.get(stem, []))
             for stem in keys), key=lambda p: p.key)
    return by_split


def _folder_pair(key, sub, a_root, b_root, a: list, b: list) -> Pair:
    """`a`, `b`: the (path relative to the split folder, bytes) of each half's files of
    this name; none: a missing half; several (x.jpg and x.png): which one is meant is
    unknown, so the pair is rejected as ambiguous_source rather than one picked."""
    name = posixpath.join(sub, (a or b)[0][0])
    if len(a) > 1 or len(b) > 1:
        files = ", ".join([f"A/{posixpath.join(sub, rel)}" for rel, _ in a] +
                          [f"B/{posixpath.join(sub, rel)}" for rel, _ in b])
        return Pair(key, name, "separate", None, None, 0,
                    ("ambiguous_source", f"{files}: one file per name (extension aside) in A/ and B/"))
    return Pair(key, name, "separate",
                storage.join(a_root, sub, a[0][0]) if a else None,
                storage.join(b_root, sub, b[0][0]) if b else None,
                (a[0][1] if a else 0) + (b[0][1] if b else 0))


def _by_stem(images: dict[str, int]) -> dict[str, list[tuple[str, int]]]:
    """{relative path without extension: [(relative path, bytes), ...]}, sorted."""
    stems = {}
    for rel in sorted(images):
        stems.setdefault(posixpath.splitext(rel)[0], []).append((rel, images[rel]))
    return stems


def _list_pairs(list_url: str, split: str) -> dict[str, list[Pair]]:
    """Rows of `input,target[,split]`; relative paths are relative to the list file. A
    row repeating an (input, target) its split already listed is rejected as duplicate_row
    (the first is packed); an input with another target is another pair, under its own key."""
    rows = [(line, row.get("split") or split, row.get("input") or None, row.get("target") or None)
            for line, row in _read_rows(list_url)]
    for line, name, *_ in rows:
        check_split_name(name, f"{list_url} line {line}")
    rows = [(line, name, a or b or f"line {line}", _resolve(list_url, a), _resolve(list_url, b))
            for line, name, a, b in rows]
    sizes = _sizes_of({url for row in rows for url in row[3:] if url})
    by_split = {}
    for line, name, listed, a, b in rows:
        by_split.setdefault(name, []).append((line, listed, a, b))
    return {name: _listed_pairs(entries, sizes) for name, entries in by_split.items()}


def _listed_pairs(entries: list, sizes: dict) -> list[Pair]:
    """One Pair per distinct (input, target) row; a row repeating one is a duplicate_row.
    An input listed with another target is another pair, its key the input's plus a hash
    of the target (the first keeps the input's key)."""
    keys = _keys([listed for _, listed, _, _ in entries])
    first, taken, pairs = {}, set(), []
    for line, listed, a, b in entries:
        if (a, b) in first:
            pairs.append(Pair(f"{keys[listed]}_line{line}", listed, "separate", None, None, 0,
                              ("duplicate_row", f"line {line} lists {listed} with the same target again "
                                                f"(first on line {first[a, b]}); list each pair once")))
            continue
        first[a, b] = line
        key = keys[listed]
        if key in taken:
            key += "_" + hashlib.sha1(str(b).encode()).hexdigest()[:8]
        taken.add(key)
        pairs.append(Pair(key, listed, "separate", a if a in sizes else None,
                          b if b in sizes else None, sizes.get(a, 0) + sizes.get(b, 0)))
    return sorted(pairs, key=lambda p: p.key)


def _read_rows(list_url: str) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV (a header naming input and target) or JSONL (an object
    per line) list, UTF-8 with or without the byte-order mark spreadsheets write."""
    try:
        text = storage.read_bytes(list_url).decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SourceError(f"{list_url} is not UTF-8 text (byte {err.start}: {err.reason}); "
                          "save it as UTF-8") from None
    if list_url.lower().endswith(".jsonl"):
        rows = [(n, _json_row(list_url, n, line)) for n, line in enumerate(text.splitlines(), 1)
                if line.strip()]
        fields = set().union(*(row for _, row in rows)) if rows else set()
    else:
        reader = csv.reader(io.StringIO(text))
        header = [h.strip() for h in next(reader, [])]
        fields = set(header)
        rows = [(reader.line_num, dict(zip(header, values))) for values in reader if any(values)]
    if not {"input", "target"} <= fields:
        raise SourceError(f"{list_url}: needs columns/fields 'input' and 'target', "
                          f"found {sorted(fields)}")
    return rows


def _json_row(list_url: str, number: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except ValueError as err:
        raise SourceError(f"{list_url} line {number}: not valid JSON ({err})") from None
    if not isinstance(row, dict):
        raise SourceError(f"{list_url} line {number}: a JSON {type(row).__name__}, not an object "
                          'like {"input": "a.png", "target": "b.png"}')
    for field in ("input", "target", "split"):
        if row.get(field) is not None and not isinstance(row[field], str):
            raise SourceError(f"{list_url} line {number}: {field} must be a string, got "
                              f"{json.dumps(row[field])}")
    return row


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
        try:
            sizes.update(storage.list_sizes(folder, recursive=False))
        except OSError as err:
            raise SourceError(listing_error(folder, err)) from None
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


# ----------------------------------------------------------------------------- planning

@dataclasses.dataclass
class Shard:
    name: str
    split: str
    pairs: list
    digest: str = ""  # of the options and pairs: a finished part counts only if it matches


def plan_shards(pairs_by_split: dict, options: dict) -> list[Shard]:
    """Seeded order per split, cut into near-equal runs (at least min_shards, or one per
    pair when fewer; at most max_samples each), runs then cut again by source bytes."""
    shards = []
    for split, pairs in pairs_by_split.items():
        order = list(pairs)
        random.Random(f"{options['seed']}/{split}").shuffle(order)
        count = max(min(options["min_shards"], len(order)),
                    math.ceil(len(order) / options["max_samples"]))
        runs = [order[i * len(order) // count:(i + 1) * len(order) // count] for i in range(count)]
        groups = [g for run in runs for g in _cut_by_bytes(run, options["max_bytes"])]
        shards += [Shard(f"{split}-{i:06d}.tar", split, g) for i, g in enumerate(groups)]
    for shard in shards:
        rows = [p.digest_row() for p in shard.pairs]
        text = json.dumps([shard.name, options, rows], sort_keys=True)
        shard.digest = hashlib.sha256(text.encode()).hexdigest()
    return shards


def _cut_by_bytes(pairs: list, max_bytes: int) -> list[list]:
    groups, nbytes = [[]], 0
    for pair in pairs:
        if groups[-1] and nbytes + pair.nbytes > max_bytes:
            groups.append([])
            nbytes = 0
        groups[-1].append(pair)
        nbytes += pair.nbytes
    return groups


def in_slice(shards: list[Shard], slice_: tuple[int, int]) -> list[Shard]:
    """Round-robin over the whole plan: disjoint parts of similar size."""
    index, count = slice_
    return shards[index::count]
