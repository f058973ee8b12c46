"""Which shards to read, and reading them: shard lists -> Entry / Skip records.

Plain `tarfile` streaming over storage.open_read rather than webdataset's pipeline: it
gives byte positions to resume from, skips member data without decoding it, and is the
one place that turns every read failure into a counted Skip. Nothing raises out of
`read_entries` for bad data.
"""
from __future__ import annotations

import itertools
import logging
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline import storage
from pipeline.data.format import MANIFEST, MANIFEST_MISMATCH, Entry, Manifest, Samples, Skip, is_image_name
from pipeline.errors import DataError

log = logging.getLogger(__name__)

READ_ERRORS = (tarfile.TarError, EOFError, OSError, storage.StorageError)


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int


def list_shards(spec: str, split: str, key: str = "data.train") -> list[Shard]:
    """Shards of `split` from a folder/prefix holding manifest.json, a manifest URL, or a
    brace pattern `dir/train-{000000..000007}.tar` (counts from the manifest next to the
    shards if it lists them, else by reading the tar headers). `key` names the option
    the spec came from, for the error messages."""
    if not spec:
        raise DataError(f"{key} is empty: give the shards to read")
    try:
        storage.check_url(spec)
    except storage.RefusedURL as err:
        raise DataError(f"{key}: {err}") from None
    if "{" in spec:
        urls = _existing(expand_braces(spec), spec, key)
        counts = _manifest_counts(_folder(urls[0]))
        return [Shard(u, counts.get(u.rsplit("/", 1)[-1]) or count_samples(u)) for u in urls]
    manifest_url = spec if spec.endswith(".json") else storage.join(spec, MANIFEST)
    try:
        manifest = Manifest.read(manifest_url)
        shards = manifest.split(split, manifest_url).shards
    except DataError as err:
        raise DataError(f"{key}: {_raw_images_hint(spec) or err}") from None
    folder = _folder(manifest_url)
    return [Shard(storage.inside(folder, s.name), s.samples) for s in shards]


def _existing(urls: list[str], spec: str, key: str) -> list[str]:
    """`urls` if every file a brace pattern names is there (one listing of their folder),
    else a DataError saying how many are missing: a typo in the range would otherwise
    read as shards that are empty or unreadable."""
    there = set()
    for folder in sorted({_folder(u) for u in urls}):
        try:
            there |= {f"{folder}/{u.rsplit('/', 1)[-1]}"
                      for u in storage.list_sizes(folder, recursive=False)}
        except OSError as err:
            raise DataError(f"{key}: cannot list {folder} for {spec}: {err.strerror or err}") from None
    missing = [u for u in urls if f"{_folder(u)}/{u.rsplit('/', 1)[-1]}" not in there]
    if len(missing) == len(urls):
        raise DataError(f"{key}: the pattern {spec} matches no file (the first it names: {urls[0]}); "
                        "check the folder and the range")
    if missing:
        raise DataError(f"{key}: {len(missing)} of the {len(urls)} files the pattern {spec} names "
                        f"are missing (first: {missing[0]}); fix the range or pack them")
    return urls


def _raw_images_hint(spec: str) -> str | None:
    """For a folder of images given where shards belong: the command that makes shards."""
    try:
        if spec.endswith(".json") or not any(is_image_name(u) for u in storage.list_files(spec)[:1000]):
            return None
    except OSError:  # a folder that cannot be listed: the manifest's own error says enough
        return None
    dest = spec.rstrip("/") + "_shards"
    return (f"{spec} holds images, not shards (no {MANIFEST}): pack them first with "
            f"`python data_tools/shard.py {spec} {dest}`, then pass {dest}")


def manifest_of(spec: str) -> Manifest | None:
    """The manifest describing the shards of `spec`; None for a brace pattern with none
    beside its shards (its sizes, layouts and packing options are then unknown). A
    pattern's own shards are a part of the manifest's split: what it says of the split
    (sizes) holds for them too, if more broadly."""
    folder = _folder(expand_braces(spec)[0]) if "{" in spec else \
        _folder(spec) if spec.endswith(".json") else spec
    url = storage.join(folder, MANIFEST)
    if "{" in spec and not storage.exists(url):
        return None
    return Manifest.read(url)


def packed_load_size(spec: str) -> int:
    """The N of `shard.py --load-size N` the shards were packed with; 0 for originals."""
    manifest = manifest_of(spec)
    return int(manifest.options.get("load_size") or 0) if manifest else 0


def _folder(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _manifest_counts(folder: str) -> dict[str, int]:
    url = storage.join(folder, MANIFEST)
    return Manifest.read(url).counts() if storage.exists(url) else {}


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar (zero padding kept)."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    first, last = match.group(1), match.group(2)
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [url for n in range(int(first), int(last) + 1)
            for url in expand_braces(f"{head}{n:0{len(first)}d}{tail}")]


def count_samples(url: str) -> int:
    """Samples in a tar shard, reading it through (for shards without a manifest)."""
    return sum(1 for record in read_entries([url]) if isinstance(record, Entry))


def read_entries(urls, start_shard: int = 0, start_offset: int = 0,
                 check_counts: bool = False) -> Iterator[Entry | Skip]:
    """An Entry per sample, from the shard at index `start_shard` (at the tar header at
    `start_offset`) onwards. A shard that cannot be read to its end gives a Skip and the
    stream goes on with the next shard; the sample cut by the failure is dropped with it.
    With `check_counts`, a Shard read from its first byte to a clean end with another
    sample count than its manifest's is logged and followed by a MANIFEST_MISMATCH Skip."""
    for index, url in enumerate(itertools.islice(urls, start_shard, None), start_shard):
        offset = start_offset if index == start_shard else 0
        whole = check_counts and isinstance(url, Shard) and offset == 0
        yield from _read_tar(index, url.url if isinstance(url, Shard) else url, offset,
                             url.samples if whole else None)


def read_range(index: int, shard: Shard, first: int, end: int, offset: int = 0,
               at: int = 0) -> Iterator[tuple[int, Entry | Skip]]:
    """(sample number in the shard, record) for samples [first, end) of `shard` (its
    `index` in the list being read), reading from the tar header at byte `offset`, which
    holds sample `at` (0, 0: the shard's start). Samples before `first` are passed over
    undecoded (tar headers, member data read past), so a stream may start mid-shard.

    Several ranges of one epoch may share a shard: a failure is reported (a Skip) only by
    the range it happened in, so it counts once. Likewise MANIFEST_MISMATCH: a shard that
    ends cleanly before its manifest's count is noted by the range it ends in; one that
    holds more, by the range that ends at the manifest's count."""
    owns = lambda i: first <= i < end or i >= end == shard.samples
    i = at
    for record in _read_tar(index, shard.url, offset):
        if isinstance(record, Skip):
            if owns(i):
                yield i, record
            return
        if i >= end:
            if end == shard.samples:
                log.warning("shard %s holds more samples than its manifest's %d", shard.url, end)
                yield i, Skip(index, record.offset, MANIFEST_MISMATCH)
            return
        if i >= first:
            yield i, record
        i += 1
    if i < end and owns(i):
        log.warning("shard %s holds %d samples, its manifest says %d", shard.url, i, shard.samples)
        yield i, Skip(index, 0, MANIFEST_MISMATCH)


def _read_tar(index: int, url: str, offset: int, expected: int | None = None) -> Iterator[Entry | Skip]:
    found, samples = 0, None
    try:
        with storage.open_read(url) as f:
            f.seek(offset)
            # stream mode: member data not read is skipped; a member cut short raises
            # ReadError("unexpected end of data")
            tar = tarfile.open(fileobj=f, mode="r|")
            samples = Samples(tar, offset)
            for key, parts, start in samples:
                yield Entry(index, start, key, parts)
                found += 1
            # tarfile ends quietly at a bad or missing header past the first one: a
            # well-formed shard ends with a zero block where the member loop stopped
            end = offset + tar.offset
            f.seek(end)
            if f.read(512) != bytes(512):
                raise tarfile.ReadError(f"no end-of-archive block at byte {end}")
        if samples.last is not None:
            yield Entry(index, samples.last[2], *samples.last[:2])
            found += 1
    except READ_ERRORS as err:
        start = samples.start if samples else offset
        log.warning("shard %s unreadable from byte %d on: %s", url, start, err)
        truncated = isinstance(err, (tarfile.TarError, EOFError))
        yield Skip(index, start, "truncated_shard" if truncated else "unreadable_shard")
        return
    if expected is not None and found != expected:
        log.warning("shard %s holds %d samples, its manifest says %d", url, found, expected)
        yield Skip(index, end, MANIFEST_MISMATCH)
