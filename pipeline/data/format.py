"""The shard format: the one module that says what a shard folder holds.

A shard folder (a local folder or an s3:// prefix) holds `SPLIT-NNNNNN.tar` shards and
`manifest.json`. Each shard is a standard WebDataset tar: a sample's members are
consecutive and named `KEY.SUFFIX`, the key ending at the first dot:
    KEY.input.EXT + KEY.target.EXT   a pair stored as two images (original bytes), or
    KEY.pair.EXT                     an A|B side-by-side image kept whole, split by the
                                     reader at KEY.json's "split_x"
    KEY.json                         where it came from, sizes, layout
EXT is one of IMAGE_EXTS. The manifest lists every shard of every split with its sample
count and bytes, the rejected pairs by reason and the options shard.py packed with.
shard.py writes through `write_member` and `Manifest.write`; the trainer, inspect_shards.py,
translate.py and the benchmarks read through `Samples`, `Manifest.read` and the records
below. Nothing else parses a member name or the manifest.
"""
from __future__ import annotations

import errno
import io
import json
import os
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from pipeline import storage
from pipeline.errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# what shard.py --load-size N --preprocess may record (augmentation.PREPROCESS's resizing
# modes; tests/unit/test_shard_sizes.py holds the two lists together)
RESIZING_MODES = ("resize_and_crop", "scale_width", "scale_width_and_crop", "scale_shortside_and_crop")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # what shards hold and the reader decodes
# image files shard.py finds but cannot store: rejected and counted, never ignored
UNSUPPORTED_IMAGE_EXTS = ("bmp", "gif", "tif", "tiff")
EXT_OF_PIL_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # decoded format -> EXT
KINDS = ("input", "target", "pair")  # the image members a sample may have
META = "json"
TAR_MTIME = 946684800  # 2000-01-01: a fixed stamp keeps shards byte-identical across runs
MANIFEST_MISMATCH = "manifest_mismatch"  # a shard holding another count than listed
# PIL's own decompression-bomb limit: shard.py rejects above it, the trainer skips above
# it, so nothing packed with the defaults is skipped by a training run with the defaults
MAX_IMAGE_PIXELS = 89_478_485


def is_image_name(name: str) -> bool:
    """A file (or member) name ending in an extension the reader decodes."""
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS


# ------------------------------------------------------------- image files in a folder

def is_input_image_name(name: str) -> bool:
    """A file name that makes an image input: an extension the reader decodes or one of
    UNSUPPORTED_IMAGE_EXTS (read all the same: the bytes decide, see list_input_images)."""
    base = name.rsplit("/", 1)[-1]
    return "." in base and base.rsplit(".", 1)[-1].lower() in IMAGE_EXTS + UNSUPPORTED_IMAGE_EXTS


def is_hidden(rel: str) -> bool:
    """A path (relative to the folder given) with a part starting with '.'."""
    return any(part.startswith(".") for part in rel.split("/"))


@dataclass
class InputFiles:
    """The image files below a folder: `images` {path inside it: bytes} to read, sorted;
    `hidden` the image-named files skipped as hidden (counted and named, never read)."""
    images: dict[str, int]
    hidden: list[str]


def list_input_images(folder: str) -> InputFiles:
    """The one policy by which shard.py and translate.py find image files in a folder
    (local or s3://; evaluate reads shards): a file whose name ends in an image extension
    (is_input_image_name, any case) is an input, and its bytes, not its name, decide its
    format: a PNG named .jpg is read as a PNG, a TIFF or GIF is counted as
    unsupported_format. One under a name starting with '.' inside `folder` (macOS's
    ._x.jpg, a .thumbnails/ folder) is hidden: skipped and counted. Other files are not
    images and are ignored. A folder that cannot be listed (a symbolic link loop) is
    one DataError line."""
    try:
        sizes = storage.list_sizes(folder)
    except OSError as err:
        raise DataError(listing_error(folder, err)) from None
    prefix = folder.rstrip("/") + "/"
    found = {url[len(prefix):]: n for url, n in sizes.items()
             if url.startswith(prefix) and is_input_image_name(url)}
    hidden = [rel for rel in found if is_hidden(rel)]
    return InputFiles({rel: n for rel, n in found.items() if rel not in hidden}, hidden)


def listing_error(folder: str, err: OSError) -> str:
    """One line for a folder that cannot be listed, naming the link of a loop."""
    where = str(err.filename or folder)
    if err.errno == errno.ELOOP:
        link = next((p for p in _prefixes(where) if os.path.islink(p)), where)
        target = os.readlink(link) if os.path.islink(link) else "?"
        return (f"cannot list {folder}: the symbolic link {link} -> {target} makes a loop (it "
                "points at itself or at a folder that holds it); remove it or give a folder "
                "without it")
    return f"cannot list {folder}: {err.strerror or err} ({where})"


def _prefixes(path: str) -> Iterator[str]:
    parts = path.split("/")
    for end in range(1, len(parts) + 1):
        yield "/".join(parts[:end]) or "/"


def member_name(key: str, suffix: str) -> str:
    """`KEY.SUFFIX`, e.g. member_name("facade_3", "pair.jpg")."""
    return f"{key}.{suffix}"


def split_member(name: str) -> tuple[str, str]:
    """(key, suffix) of a member name: the key ends at the first dot."""
    key, _, suffix = name.partition(".")
    return key, suffix


def image_members(parts: dict[str, bytes]) -> dict[str, str]:
    """{kind: suffix} of a sample's image members, e.g. {"pair": "pair.jpg"}."""
    return {suffix.split(".")[0]: suffix for suffix in parts if is_image_name(suffix)}


def write_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One member with fixed metadata, so the same input packs to the same bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


# ----------------------------------------------------------------------------- records

@dataclass(frozen=True)
class Entry:
    """A sample read from a shard: `shard` is the index in the list being read, `offset`
    the tar byte offset of its first member (a resume seeks there)."""
    shard: int
    offset: int
    key: str
    parts: dict[str, bytes]


@dataclass(frozen=True)
class Skip:
    """What could not be read at (shard, offset): `reason` names the counter it goes to
    (truncated_shard, unreadable_shard, or MANIFEST_MISMATCH, a note on a whole shard)."""
    shard: int
    offset: int
    reason: str


class Samples:
    """A tar stream's members grouped into samples: iterating gives (key, parts, offset)
    for each sample followed by another one (so known complete), offsets relative to
    `base` (where the stream was opened); the stream's last sample is then `last`, for
    the caller to take once it has checked that the tar ended cleanly (else it may be cut
    short). `start` is the offset of the sample being read, for a reader that hits a
    failure. Directories and links are skipped; nothing is ever extracted to disk."""

    def __init__(self, tar: tarfile.TarFile, base: int = 0):
        self.tar, self.base, self.start = tar, base, base
        self.last: tuple[str, dict[str, bytes], int] | None = None

    def __iter__(self) -> Iterator[tuple[str, dict[str, bytes], int]]:
        key, parts = None, {}
        for member in self.tar:
            if not member.isfile():
                continue
            member_key, suffix = split_member(member.name)
            if member_key != key:
                if key is not None:
                    yield key, parts, self.start
                key, parts, self.start = member_key, {}, self.base + member.offset
            parts[suffix] = self.tar.extractfile(member).read()
        self.last = (key, parts, self.start) if key is not None else None


# ---------------------------------------------------------------------------- manifest

@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int


@dataclass
class SizeCount:
    """How many of a split's pairs have one stored size (each half's), and one of them."""
    samples: int
    example: str  # a sample key


@dataclass
class SplitInfo:
    samples: int = 0
    bytes: int = 0
    rejected: int = 0
    shards: list[ShardInfo] = field(default_factory=list)
    # {"WxH": SizeCount} of the stored pairs (width x height of each half, as packed);
    # None: a manifest of an older shard.py, which did not record them
    sizes: dict[str, SizeCount] | None = None
    # {"pair" | "separate": pairs}: how the pairs were laid out at the source (an A|B
    # image, or input and target files); None: not recorded
    layouts: dict[str, int] | None = None

    def size_list(self) -> list[tuple[tuple[int, int], SizeCount]]:
        """[((height, width), SizeCount)] of `sizes`, most common first."""
        sizes = [(parse_size(name), count) for name, count in (self.sizes or {}).items()]
        return sorted(sizes, key=lambda item: (-item[1].samples, item[0]))


def size_name(height: int, width: int) -> str:
    """A size as the manifest names it: "WxH" (width first, as people write sizes)."""
    return f"{width}x{height}"


def parse_size(name: str) -> tuple[int, int]:
    """"WxH" -> (height, width); ValueError if it is not one."""
    width, height = name.split("x")
    return int(height), int(width)


@dataclass
class Manifest:
    """manifest.json: the splits, their shards and counts, rejections, packing options."""
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_json(cls, tree: dict, where: str = MANIFEST) -> Manifest:
        """A manifest from its parsed JSON, checked whole: every reader (the trainer,
        translate.py, evaluate.py, inspect_shards.py) refuses the same things in one line."""
        if not isinstance(tree, dict) or not isinstance(tree.get("splits"), dict):
            raise DataError(f"{where} is not a shard manifest (no \"splits\" object); "
                            "shard.py writes one")
        version = tree.get("format_version", FORMAT_VERSION)
        if type(version) is not int or version != FORMAT_VERSION:  # not 1.0, not true
            raise DataError(f"{where}: format_version {version!r} is not one this version reads "
                            f"({FORMAT_VERSION}); pack the shards again with this version's shard.py")
        splits = {name: _split_info(name, info, where) for name, info in tree["splits"].items()}
        rejected, options = tree.get("rejected", {}), tree.get("options", {})
        if not isinstance(rejected, dict) or not isinstance(options, dict):
            raise DataError(f"{where}: \"rejected\" and \"options\" must be objects")
        for reason, count in rejected.items():
            _count(count, f"rejected {reason!r}", where)
        if options.get("load_size"):
            _count(options["load_size"], "options load_size", where)
        if options.get("preprocess") not in (None, *RESIZING_MODES):
            raise DataError(f"{where}: options preprocess {json.dumps(options['preprocess'])} is "
                            f"not one of {', '.join(RESIZING_MODES)}; pack the shards again")
        return cls(splits, dict(rejected), dict(options), version)

    @classmethod
    def read(cls, url: str) -> Manifest:
        """From a manifest URL or the folder holding one."""
        if not url.endswith(".json"):
            url = storage.join(url, MANIFEST)
        try:
            tree = json.loads(storage.read_bytes(url))
        except (FileNotFoundError, NotADirectoryError):
            raise DataError(f"no {MANIFEST} at {url}: make shards with "
                            "`python data_tools/shard.py SOURCE DEST`") from None
        except ValueError as err:  # not JSON, or not UTF-8
            raise DataError(f"{url} is not valid JSON ({err})") from None
        return cls.from_json(tree, url)

    def write(self, folder: str) -> None:
        storage.write_bytes(storage.join(folder, MANIFEST),
                            (json.dumps(asdict(self), indent=1, sort_keys=True) + "\n").encode())

    def split(self, name: str, where: str = MANIFEST) -> SplitInfo:
        if name not in self.splits:
            raise DataError(f"split {name!r} not in {where} (it has: {', '.join(self.splits)})")
        return self.splits[name]

    def shard_names(self) -> set[str]:
        return {s.name for info in self.splits.values() for s in info.shards}

    def counts(self) -> dict[str, int]:
        """{shard name: samples} over every split."""
        return {s.name: s.samples for info in self.splits.values() for s in info.shards}


def _split_info(name: str, info, where: str) -> SplitInfo:
    """One split of a manifest, its counts whole numbers and each shard listed once (a
    shard listed twice would be read twice an epoch)."""
    if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
        raise DataError(f"{where}: split {name!r} has no \"shards\" list; shard.py writes one")
    where_split = f"split {name!r}"
    shards, seen = [], set()
    for entry in info["shards"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise DataError(f"{where}: {where_split} lists a shard without a \"name\": {entry!r}")
        label = f"{where_split} shard {entry['name']!r}"
        normal = posixpath.normpath(entry["name"])
        if normal in seen:
            raise DataError(f"{where}: {where_split} lists shard {entry['name']!r} twice (it would "
                            "be read twice an epoch); list each shard once")
        seen.add(normal)
        shards.append(ShardInfo(entry["name"], _count(entry.get("samples"), f"{label} samples", where),
                                _count(entry.get("bytes", 0), f"{label} bytes", where)))
    return SplitInfo(_count(info.get("samples"), f"{where_split} samples", where),
                     _count(info.get("bytes", 0), f"{where_split} bytes", where),
                     _count(info.get("rejected", 0), f"{where_split} rejected", where), shards,
                     _sizes(info.get("sizes"), where_split, where),
                     _layouts(info.get("layouts"), where_split, where))


def _sizes(sizes, where_split: str, where: str) -> dict[str, SizeCount] | None:
    """A split's "sizes": {"WxH": {"samples": n, "example": key}}, or None (not recorded)."""
    if sizes is None:
        return None
    if not isinstance(sizes, dict):
        raise DataError(f"{where}: {where_split} \"sizes\" must be an object")
    checked = {}
    for name, entry in sizes.items():
        try:
            height, width = parse_size(name)
        except ValueError:
            height = width = 0
        if min(height, width) <= 0 or not isinstance(entry, dict) or \
                not isinstance(entry.get("example"), str):
            raise DataError(f"{where}: {where_split} sizes: {name!r}: {json.dumps(entry)} is not "
                            "a \"WxH\": {\"samples\", \"example\"} entry")
        checked[name] = SizeCount(_count(entry.get("samples"), f"{where_split} size {name} samples",
                                         where), entry["example"])
    return checked


def _layouts(layouts, where_split: str, where: str) -> dict[str, int] | None:
    if layouts is None:
        return None
    if not isinstance(layouts, dict) or not set(layouts) <= {"pair", "separate"}:
        raise DataError(f"{where}: {where_split} \"layouts\" must map \"pair\" and "
                        f"\"separate\" to counts, got {json.dumps(layouts)}")
    return {name: _count(n, f"{where_split} layouts {name}", where) for name, n in layouts.items()}


def _count(value, what: str, where: str) -> int:
    """A count from a manifest: a whole number >= 0 (JSON's 3, not "3", 3.5 or true)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"{where}: {what} must be a whole number >= 0, got {json.dumps(value)}")
    return value
