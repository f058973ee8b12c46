"""The trainer's input pipeline: tar shards (local or s3://) -> equal batches per rank.

Stages, each a plain function testable alone:

    list_shards        manifest.json (or a brace pattern) -> [Shard(url, samples)]
    epoch_shards       shuffle with (seed, epoch): the same order on every rank
    split_by_node      shards[rank::world]   (explicit rank/world from the trainer)
    split_by_worker    shards[worker::workers]
    read_entries       stream tar members through pipeline.storage, group them by key
    shuffle blocks     `shuffle_buffer` entries read, permuted with a seeded RNG, consumed
    decode_sample      bytes -> uint8 HxWxC input/target (an A|B `pair` split after decode)
    augment            resize to load_size, the same crop and flip for both halves
    batches            full batches only, built inside the worker

Design decisions (the why):

* Shuffle blocks instead of a running shuffle buffer: a block is `shuffle_buffer`
  entries read from a known tar position and permuted by an RNG seeded from that
  position, so a worker's position is (shard, byte offset of the block, entries taken)
  and resuming seeks there, re-reads at most one block and skips the taken entries
  without decoding them. Mixing across shards comes from the shard shuffle.
* All randomness is derived from seeds, never from worker RNG state: shard order from
  (seed, epoch); block order from (seed, epoch, rank, worker, position); augmentation
  from (seed, epoch, sample key), so a sample is augmented identically whatever the
  worker count, and after a resume.
* Batches are made inside the worker (DataLoader batch_size=None). The DataLoader hands
  out workers' batches round-robin (skipping finished workers), which is deterministic;
  each batch carries its worker's position, so the loader's state is the last position
  of every worker plus who is next. On resume the worker ids are rotated so the
  round-robin starts at the right worker.
* Bad data (truncated tar, unreadable shard, corrupt image, missing half, too large,
  unsafe member name) becomes an entry that is skipped and counted by reason where it is
  consumed: counts are exact across resumes, and nothing raises. A shard holding another
  sample count than its manifest says is counted too (manifest_mismatch) and logged.
* Equal steps: see TrainLoader.
* Plain `tarfile` streaming over storage.open_read rather than webdataset's pipeline:
  it gives byte positions to resume from, skipping member data without decoding it, and
  one place that turns every read failure into a counted entry. torchdata's
  StatefulDataLoader is not needed: the per-worker positions ride along with the
  batches, and its fast-forward would decode what it skips.
* Measured here (benchmarks/bench_data.py, one core): simplejpeg decodes JPEG 1.6-2.6x
  faster than PIL, so JPEG goes through it; torch's uint8 channels-last bicubic resize is
  ~4x faster than PIL's, so both augmentation paths use it.
* Do not pass these loaders through accelerator.prepare(): it re-splits or drops data.

EXIF orientation is ignored (pixels are used as stored, as the reference pix2pix does):
a pair is aligned in its stored pixel grid, shard.py measures `split_x` in stored
pixels, and applying per-file tags could rotate one half of a pair but not the other.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import re
import signal
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline import storage
from pipeline.config import DataConfig

log = logging.getLogger(__name__)

STATE_VERSION = 1
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
READ_ERRORS = (tarfile.TarError, EOFError, OSError, storage.StorageError)
MANIFEST_MISMATCH = "manifest_mismatch"  # counts shards, not samples: nothing is skipped


class BadSample(Exception):
    """A sample that cannot be used; `reason` is the counter it goes to."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------------------ listing

@dataclass(frozen=True)
class Shard:
    url: str
    samples: int


def list_shards(spec: str, split: str) -> list[Shard]:
    """Shards of `split` from a folder/prefix holding manifest.json, a manifest URL, or a
    brace pattern `dir/train-{000000..000007}.tar` (counts from the manifest next to the
    shards if it lists them, else by reading the tar headers)."""
    if not spec:
        raise ValueError("no shards given (data.train / data.val is empty)")
    if spec.startswith("pipe:") or "://" in spec and not spec.startswith(("s3://", "file://")):
        raise ValueError(f"refusing shard URL {spec!r}: only local paths and s3:// "
                         "(pipe: URLs run a shell)")
    if "{" in spec:
        urls = expand_braces(spec)
        counts = _manifest_counts(_folder(urls[0]))
        return [Shard(u, counts.get(u.rsplit("/", 1)[-1]) or count_samples(u)) for u in urls]
    manifest_url = spec if spec.endswith(".json") else storage.join(spec, "manifest.json")
    manifest = json.loads(storage.read_bytes(manifest_url))
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} not in {manifest_url} "
                         f"(it has: {', '.join(manifest['splits'])})")
    folder = _folder(manifest_url)
    return [Shard(storage.inside(folder, entry["name"]), entry["samples"])
            for entry in manifest["splits"][split]["shards"]]


def _folder(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _manifest_counts(folder: str) -> dict[str, int]:
    url = storage.join(folder, "manifest.json")
    if not storage.exists(url):
        return {}
    splits = json.loads(storage.read_bytes(url))["splits"].values()
    return {entry["name"]: entry["samples"] for split in splits for entry in split["shards"]}


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
    return sum(1 for _, _, key, _ in read_entries([url]) if key is not None)


# --------------------------------------------------------------------- shards per worker

def derive_seed(*parts) -> int:
    """A 64-bit seed from any values; stable across processes (unlike hash())."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def epoch_shards(shards: list, seed: int, epoch: int) -> list:
    """The shard order of one epoch: the same on every rank."""
    order = np.random.default_rng(derive_seed(seed, epoch, "shards")).permutation(len(shards))
    return [shards[i] for i in order]


def split_by_node(shards: list, rank: int, world_size: int) -> list:
    return shards[rank::world_size]


def split_by_worker(shards: list, worker: int, num_workers: int) -> list:
    return shards[worker::num_workers]


def resampled_shards(shards: list, seed: int, epoch: int, rank: int, worker: int) -> Iterator:
    """Endless shard draws with replacement, distinct per rank and worker."""
    rng = np.random.default_rng(derive_seed(seed, epoch, rank, worker, "resampled"))
    while True:
        yield shards[rng.integers(len(shards))]


# ------------------------------------------------------------------------------ reading

def read_entries(urls, start_shard: int = 0, start_offset: int = 0,
                 check_counts: bool = False) -> Iterator[tuple]:
    """(shard index, byte offset, key, {suffix: bytes}) per sample, from the shard at
    index `start_shard` (at the tar header at `start_offset`) onwards. A shard that
    cannot be read to its end gives (index, offset, None, reason) and the stream goes on
    with the next shard; the sample cut by the failure is dropped with it. With
    `check_counts`, a Shard read from its first byte to a clean end with another sample
    count than its manifest's is logged and followed by (index, end, None,
    MANIFEST_MISMATCH)."""
    for index, url in enumerate(itertools.islice(urls, start_shard, None), start_shard):
        offset = start_offset if index == start_shard else 0
        whole = check_counts and isinstance(url, Shard) and offset == 0
        yield from _read_tar(index, url.url if isinstance(url, Shard) else url, offset,
                             url.samples if whole else None)


def _read_tar(index: int, url: str, offset: int, expected: int | None = None) -> Iterator[tuple]:
    key, parts, start, found = None, {}, offset, 0
    try:
        with storage.open_read(url) as f:
            f.seek(offset)
            # stream mode: member data not read is skipped, and nothing is ever extracted
            # to disk; a member cut short raises ReadError("unexpected end of data")
            tar = tarfile.open(fileobj=f, mode="r|")
            for member in tar:
                if not member.isfile():
                    continue
                member_key, _, suffix = member.name.partition(".")
                if member_key != key:
                    if key is not None:
                        yield index, start, key, parts
                        found += 1
                    key, parts, start = member_key, {}, offset + member.offset
                parts[suffix] = tar.extractfile(member).read()
            # tarfile ends quietly at a bad or missing header past the first one: a
            # well-formed shard ends with a zero block where the member loop stopped
            end = offset + tar.offset
            f.seek(end)
            if f.read(512) != bytes(512):
                raise tarfile.ReadError(f"no end-of-archive block at byte {end}")
    except READ_ERRORS as err:
        log.warning("shard %s unreadable from byte %d on: %s", url, start, err)
        truncated = isinstance(err, (tarfile.TarError, EOFError))
        yield index, start, None, "truncated_shard" if truncated else "unreadable_shard"
        return
    if key is not None:
        yield index, start, key, parts
        found += 1
    if expected is not None and found != expected:
        log.warning("shard %s holds %d samples, its manifest says %d", url, found, expected)
        yield index, end, None, MANIFEST_MISMATCH


# ------------------------------------------------------------------------------- decode

def decode_image(data: bytes, ext: str, channels: int, max_pixels: int) -> np.ndarray:
    """Encoded bytes -> uint8 HxWxC (C = channels, 1 or 3). Policy: JPEG through
    simplejpeg (CMYK/YCCK through PIL); palette and alpha images lose the alpha; 16-bit
    grayscale is scaled to 8 bits (65535 -> 255); gray <-> RGB converted as requested
    (RGB -> gray by ITU-R 601 luma); EXIF orientation ignored. The pixel count is checked
    from the header before any decoding (decompression-bomb guard)."""
    if ext in ("jpg", "jpeg"):
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            raise BadSample("corrupt_image") from None
        _check_size(width, height, max_pixels)
        if colorspace in ("Gray", "YCbCr", "RGB"):
            try:
                return simplejpeg.decode_jpeg(data, colorspace="GRAY" if channels == 1 else "RGB")
            except ValueError:
                raise BadSample("corrupt_image") from None
    return _decode_pil(data, channels, max_pixels)


def _decode_pil(data: bytes, channels: int, max_pixels: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            _check_size(*im.size, max_pixels)
            im.load()
            if im.mode.startswith("I"):  # 16/32-bit grayscale: scale, not clip
                wide = np.asarray(im, dtype=np.uint32).clip(0, 65535)
                im = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
            elif im.mode == "P":
                im = im.convert("RGBA")
            pixels = np.array(im.convert("L" if channels == 1 else "RGB"))  # writable
    except BadSample:
        raise
    except Image.DecompressionBombError:  # PIL's own guard, at 2x its default limit
        raise BadSample("too_large") from None
    except Exception:  # PIL raises many types on broken data; all mean the same here
        raise BadSample("corrupt_image") from None
    return pixels.reshape(*pixels.shape[:2], channels)


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise BadSample("too_large")


def decode_sample(parts: dict, cfg: DataConfig, in_channels: int,
                  out_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """A sample's members -> (network input, network target) as uint8 HxWxC, with the
    direction applied: stored input = A, target = B; BtoA swaps them. Each image gets the
    configured channels whatever its own mode (gray and RGB mix freely). Halves of
    different sizes are kept as they are and later resized alike, each to load_size (to
    crop_size for evaluation), as the reference pix2pix does: shard.py is where such a
    pair is rejected or resized by policy (--on-size-mismatch)."""
    swap = cfg.direction == "BtoA"
    a_channels, b_channels = (out_channels, in_channels) if swap else (in_channels, out_channels)
    found = {suffix.split(".")[0]: suffix for suffix in parts
             if suffix.rsplit(".", 1)[-1].lower() in IMAGE_EXTS}
    if "pair" in found:
        whole = _decode_member(parts, found["pair"], max(a_channels, b_channels), cfg)
        split_x = _split_x(parts, whole.shape[1])
        a, b = whole[:, :split_x], whole[:, split_x:]
        a, b = _to_channels(a, a_channels), _to_channels(b, b_channels)
    elif "input" in found and "target" in found:
        a = _decode_member(parts, found["input"], a_channels, cfg)
        b = _decode_member(parts, found["target"], b_channels, cfg)
    else:
        raise BadSample("missing_target" if "input" in found else "missing_input")
    return (b, a) if swap else (a, b)


def _decode_member(parts: dict, suffix: str, channels: int, cfg: DataConfig) -> np.ndarray:
    ext = suffix.rsplit(".", 1)[-1].lower()
    return decode_image(parts[suffix], ext, channels, cfg.max_image_pixels)


def _split_x(parts: dict, width: int) -> int:
    try:
        split_x = int(json.loads(parts["json"]).get("split_x", width // 2)) \
            if "json" in parts else width // 2
    except (ValueError, TypeError, AttributeError):
        raise BadSample("bad_json") from None
    if not 0 < split_x < width:
        raise BadSample("bad_json")
    return split_x


def _to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """RGB -> gray (ITU-R 601, as PIL) or the reverse, for the halves of a pair image."""
    if pixels.shape[2] == channels:
        return pixels
    if channels == 3:
        return np.repeat(pixels, 3, axis=2)
    luma = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.rint(luma).astype(np.uint8)[..., None]


# ------------------------------------------------------------------------- augmentation

def augment_params(seed: int, epoch: int, key: str, cfg: DataConfig) -> tuple[int, int, int]:
    """(top, left, flip) of one sample, from (seed, epoch, key) only."""
    rng = np.random.default_rng(derive_seed(seed, epoch, key, "augment"))
    top, left = rng.integers(0, cfg.load_size - cfg.crop_size + 1, size=2)
    flip = int(cfg.flip and rng.random() < 0.5)
    return int(top), int(left), flip


def resize_u8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic (antialiased) resize of uint8 Bx C x H x W to size x size, uint8 out.
    On CPU torch's uint8 channels-last kernel is ~4x faster than PIL's; elsewhere it
    runs in float and rounds the same way."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    if images.device.type == "cpu":
        return F.interpolate(images.contiguous(memory_format=torch.channels_last),
                             size=(size, size), mode="bicubic", antialias=True)
    return resize_u8_via_float(images, size)


def resize_u8_via_float(images: torch.Tensor, size: int) -> torch.Tensor:
    """The same resize for devices without a uint8 kernel (CUDA): float, round, clamp."""
    resized = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def augment(images: torch.Tensor, params: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """uint8 B x C x H x W -> uint8 B x C x crop x crop: resize to load_size, then each
    sample's crop and flip from `params` (B x 3: top, left, flip). Called with the same
    params for input and target, so the pair stays aligned."""
    resized = resize_u8(images, cfg.load_size)
    size = cfg.crop_size
    crops = [resized[i, :, top:top + size, left:left + size]
             for i, (top, left, _) in enumerate(params.tolist())]
    return torch.stack([crop.flip(-1) if flip else crop
                        for crop, (_, _, flip) in zip(crops, params.tolist())])


def to_unit_range(images: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] (the reference's Normalize(0.5, 0.5))."""
    return images.to(dtype).div_(127.5).sub_(1.0)


def _chw(pixels: np.ndarray) -> torch.Tensor:
    """HxWxC numpy -> 1 x C x H x W tensor in channels-last memory (copies only the
    non-contiguous halves of a pair image)."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None]


# ------------------------------------------------------------------------ worker stream

@dataclass
class EpochPlan:
    """Everything a worker needs to produce its batches of one epoch (picklable)."""
    cfg: DataConfig
    shards: list
    seed: int
    epoch: int
    rank: int
    world_size: int
    num_workers: int  # logical workers: max(1, cfg.num_workers)
    in_channels: int
    out_channels: int

    def worker_shards(self, worker: int):
        if self.cfg.mode == "resampled":
            return resampled_shards(self.shards, self.seed, self.epoch, self.rank, worker)
        mine = split_by_node(epoch_shards(self.shards, self.seed, self.epoch),
                             self.rank, self.world_size)
        return split_by_worker(mine, worker, self.num_workers)

    def steps(self) -> int:
        """Full batches per rank this epoch, the same on every rank: the minimum over
        ranks of the full batches their workers can make (exact), or the dataset over
        the global batch, at least 1 (resampled)."""
        batch = self.cfg.batch_size
        if self.cfg.mode == "resampled":
            return max(1, sum(s.samples for s in self.shards) // (batch * self.world_size))
        order = epoch_shards(self.shards, self.seed, self.epoch)
        return min(sum(sum(s.samples for s in split_by_worker(
            split_by_node(order, rank, self.world_size), w, self.num_workers)) // batch
            for w in range(self.num_workers)) for rank in range(self.world_size))


def start_position() -> dict:
    return {"shard": 0, "offset": 0, "taken": 0, "skipped": {}}


def worker_batches(plan: EpochPlan, worker: int, position: dict,
                   device_augment: bool) -> Iterator[dict]:
    """One worker's batches for one epoch, from `position` (see start_position). Each
    batch carries "_position", this worker's position after it; the stream ends with a
    batch-less {"_position"} so that skips after the last batch are counted too."""
    cfg = plan.cfg
    mismatched = set(position.get("mismatched", ()))
    entries = _noting_mismatches(read_entries(plan.worker_shards(worker), position["shard"],
                                              position["offset"], check_counts=True), mismatched)
    skipped, samples = Counter(position["skipped"]), []
    shard, offset, taken = position["shard"], position["offset"], position["taken"]
    last_good_shard = shard
    here = lambda: {"shard": shard, "offset": offset, "taken": taken, "skipped": dict(skipped),
                    "mismatched": sorted(mismatched)}
    while block := list(itertools.islice(entries, cfg.shuffle_buffer)):
        if (shard, offset) != block[0][:2]:
            shard, offset, taken = *block[0][:2], 0
        if shard - last_good_shard > 2 * len(plan.shards):  # only resampled draws get here
            log.error("worker %d: no usable sample in %d shard draws; ending its stream",
                      worker, shard - last_good_shard)
            break
        order = np.random.default_rng(derive_seed(
            plan.seed, plan.epoch, plan.rank, worker, shard, offset, "block")).permutation(len(block))
        while taken < len(block):
            _, _, key, parts = block[order[taken]]
            taken += 1
            reason = parts if key is None else None
            if reason is None:
                pair, reason = try_decode(key, parts, cfg, plan.in_channels, plan.out_channels)
            if reason is not None:
                skipped[reason] += 1
                continue
            samples.append((key, pair))
            last_good_shard = shard
            if len(samples) == cfg.batch_size:
                yield {**collate(samples, plan, device_augment), "_position": here()}
                samples = []
    yield {"_position": here()}


def _noting_mismatches(entries: Iterator[tuple], mismatched: set) -> Iterator[tuple]:
    """The entries without MANIFEST_MISMATCH notes, whose shard indices go to `mismatched`.
    A note exists only when its shard is read from the first byte, so it must stay out of
    the shuffle blocks (a resumed block is re-read from inside a shard); a set, as a resume
    can read a shard from its start again."""
    for entry in entries:
        if entry[2] is None and entry[3] == MANIFEST_MISMATCH:
            mismatched.add(entry[0])
        else:
            yield entry


def try_decode(key: str, parts: dict, cfg: DataConfig, in_channels: int,
               out_channels: int) -> tuple[tuple | None, str | None]:
    """(pair, None), or (None, reason): bad data never raises out of a worker. Member
    names that are absolute or climb with `..` make their sample "unsafe_name": nothing
    is extracted from a tar, but keys become file names (translate.py's outputs). Keys
    end at the first dot, so a `..` or `./` leaves a '/' in a suffix or an empty key."""
    if not key or key.startswith("/") or any("/" in suffix for suffix in parts):
        return None, "unsafe_name"
    try:
        return decode_sample(parts, cfg, in_channels, out_channels), None
    except BadSample as bad:
        return None, bad.reason
    except Exception as err:  # an unforeseen decoder failure is still one bad sample
        log.warning("sample %s skipped: %s: %s", key, type(err).__name__, err)
        return None, "decode_error"


def collate(samples: list, plan: EpochPlan, device_augment: bool) -> dict:
    """[(key, (input HWC, target HWC))] -> a batch. Worker augmentation gives float
    [-1, 1] crops; device augmentation gives uint8 images (their own size when the batch
    agrees on one, else resized to load_size here) plus "aug" params for to_device."""
    cfg = plan.cfg
    keys = [key for key, _ in samples]
    params = torch.tensor([augment_params(plan.seed, plan.epoch, k, cfg) for k in keys])
    halves = []
    for side in (0, 1):
        images = [_chw(pair[side]) for _, pair in samples]
        if not device_augment:
            crops = [augment(im, params[i:i + 1], cfg) for i, im in enumerate(images)]
            halves.append(to_unit_range(torch.cat(crops)))
        elif len({im.shape for im in images}) == 1:
            halves.append(torch.cat(images))
        else:
            halves.append(torch.cat([resize_u8(im, cfg.load_size) for im in images]))
    batch = {"input": halves[0], "target": halves[1], "key": keys}
    if device_augment:
        batch["aug"] = params
    return batch


class _EpochStream(torch.utils.data.IterableDataset):
    """One epoch of one rank: each DataLoader worker runs worker_batches for its logical
    worker id, (physical id + rotation) % workers, so a resumed loader's round-robin
    starts at the worker that was next."""

    def __init__(self, plan: EpochPlan, positions: list, rotation: int, device_augment: bool):
        self.plan, self.positions, self.rotation = plan, positions, rotation
        self.device_augment = device_augment

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = ((info.id if info else 0) + self.rotation) % self.plan.num_workers
        for batch in worker_batches(self.plan, worker, self.positions[worker],
                                    self.device_augment):
            batch["_worker"] = worker
            yield batch


# -------------------------------------------------------------------------- workers

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave stopping to the trainer. Launchers signal a worker's whole
    process group (torchrun's agent, a terminal's Ctrl-C): a loader worker dying of it
    would crash the trainer before it can checkpoint."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class WorkerLoader(torch.utils.data.DataLoader):
    """A DataLoader over a batching IterableDataset that leaves the trainer alone: its
    base seed comes from a private generator (drawing from the global torch RNG would
    shift the trainer's dropout masks after every resume), and its workers ignore stop
    signals (held while they fork, so none lands before they can ignore it)."""

    def __init__(self, dataset, num_workers: int, seed: int):
        super().__init__(dataset, batch_size=None, num_workers=num_workers,
                         pin_memory=torch.cuda.is_available(),
                         worker_init_fn=ignore_stop_signals,
                         generator=torch.Generator().manual_seed(seed))

    def __iter__(self):
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


# -------------------------------------------------------------------------- train loader

class TrainLoader:
    """Endless batches across epochs: `batch = next(loader)`.

    Batches are {"input", "target": Tensor, "key": list[str]} (+ "aug" when
    augment_on == "device": pass them through to_device). `epoch` is the epoch of the
    next batch; `steps_per_epoch` is this epoch's planned step count, the same on every
    rank (exact mode: it can differ between epochs by a few steps when shard sizes
    differ, as the shard-to-rank split changes).

    Equal steps on every rank, always: every rank stops an epoch after steps_per_epoch
    batches (computed identically on every rank from the manifest counts), and before
    each batch `have_batch_all_ranks(have_one)` (an all-reduce MIN across ranks supplied
    by the trainer, called once per step) ends the epoch on every rank together as soon
    as one rank runs out early (bad data). With world_size > 1 it is required.

    `state_dict()` is this rank's position (plain JSON): {"version", "epoch",
    "step_in_epoch", "next_worker", "workers": [{"shard", "offset", "taken", "skipped",
    "mismatched"} per worker: index in the worker's shard list (or draw), byte offset of
    the current shuffle block, entries of the block consumed, skip counts this epoch,
    indices of shards whose sample count is not the manifest's],
    "skipped_before" (earlier epochs), and the layout: "seed", "world_size", "rank",
    "num_workers", "mode", "batch_size", "shuffle_buffer"}. Every rank has its own; the
    trainer saves all of them. `load_state_dict` continues the stream exactly where it
    was: the same batches, the same augmentation, consumed data skipped without decoding
    (one shuffle block at most is read again). A state saved with another layout (world
    size, workers, mode, seed, ...) restarts its epoch with the new split, logged as a
    warning. `skipped` counts what bad data dropped, by reason (shards and samples), and
    as "manifest_mismatch" the shards found holding another sample count than the
    manifest says (logged as warnings; steps stay equal, planned from the manifest: a rank
    that runs out ends the epoch on all, and samples beyond the plan may go unseen).
    """

    def __init__(self, cfg: DataConfig, shards: list[Shard], *, rank: int, world_size: int,
                 seed: int, in_channels: int, out_channels: int,
                 have_batch_all_ranks: Callable[[bool], bool] | None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if world_size > 1 and have_batch_all_ranks is None:
            raise ValueError("world_size > 1 needs have_batch_all_ranks (an all-reduce MIN) "
                             "so that ranks end an epoch together when one runs out")
        # the manifest's counts plan every epoch: a shard listed as empty would only leave
        # some rank's share of some epoch without a full batch, so it is not read at all
        shards = [shard for shard in shards if shard.samples > 0]
        self.cfg, self.shards, self.rank, self.world_size = cfg, shards, rank, world_size
        self.seed, self.in_channels, self.out_channels = seed, in_channels, out_channels
        self.num_workers = max(1, cfg.num_workers)
        self.have_batch_all_ranks = have_batch_all_ranks or (lambda have_one: have_one)
        if not shards:
            raise ValueError("no training shards")
        if cfg.mode == "exact" and len(shards) < world_size * self.num_workers:
            raise ValueError(f"{len(shards)} shards < {world_size} ranks x "
                             f"{self.num_workers} workers: some workers would get no data in "
                             "exact mode; write more shards, use fewer workers, or "
                             "data.mode=resampled")
        self.epoch, self._skipped_before = 0, Counter()
        self._reset_epoch()

    def _plan(self) -> EpochPlan:
        return EpochPlan(self.cfg, self.shards, self.seed, self.epoch, self.rank,
                         self.world_size, self.num_workers, self.in_channels, self.out_channels)

    def _reset_epoch(self) -> None:
        self._iterator, self.step_in_epoch, self._next_worker = None, 0, 0
        self._positions = [start_position() for _ in range(self.num_workers)]
        self.steps_per_epoch = self._plan().steps()
        if self.steps_per_epoch == 0:
            raise ValueError(f"epoch {self.epoch} has no full batch of {self.cfg.batch_size} "
                             f"on some rank of {self.world_size}: too few samples")

    def _end_epoch(self) -> None:
        self._skipped_before = Counter(self.skipped)
        self.epoch += 1
        self._reset_epoch()

    def _start_iterator(self):
        dataset = _EpochStream(self._plan(), self._positions, self._next_worker,
                               self.cfg.augment_on == "device")
        return iter(WorkerLoader(dataset, self.cfg.num_workers, derive_seed(self.seed, self.epoch)))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            if self.step_in_epoch >= self.steps_per_epoch:
                self._end_epoch()
            if self._iterator is None:
                self._iterator = self._start_iterator()
            batch = self._fetch()
            if self.have_batch_all_ranks(batch is not None):
                break
            if self.step_in_epoch == 0:
                raise RuntimeError(f"epoch {self.epoch}: some rank has no usable batch "
                                   f"(skipped so far: {dict(self.skipped)})")
            log.info("epoch %d ended after %d of %d steps: a rank ran out of good samples",
                     self.epoch, self.step_in_epoch, self.steps_per_epoch)
            self._end_epoch()
        self.step_in_epoch += 1
        return batch

    def _fetch(self) -> dict | None:
        """The next batch of this epoch (None at its end), recording worker positions."""
        for item in self._iterator:
            worker = item.pop("_worker")
            self._positions[worker] = item.pop("_position")
            self._next_worker = (worker + 1) % self.num_workers
            if item:  # else a worker's end-of-stream position, not a batch
                return item
        return None

    @property
    def skipped(self) -> dict[str, int]:
        total = Counter(self._skipped_before)
        for position in self._positions:
            total.update(position["skipped"])
            total.update({MANIFEST_MISMATCH: len(position.get("mismatched", ()))})
        return {reason: n for reason, n in total.items() if n}

    def _layout(self) -> dict:
        return {"seed": self.seed, "world_size": self.world_size, "rank": self.rank,
                "num_workers": self.num_workers, "mode": self.cfg.mode,
                "batch_size": self.cfg.batch_size, "shuffle_buffer": self.cfg.shuffle_buffer}

    def state_dict(self) -> dict:
        """This rank's position as plain JSON types (see load_state_dict), a copy."""
        return json.loads(json.dumps({"version": STATE_VERSION, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "next_worker": self._next_worker, "workers": self._positions,
                "skipped_before": dict(self._skipped_before), **self._layout()}))

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`. Same layout (seed, world size, rank, workers, mode,
        batch size, shuffle buffer): exactly where it was. Another layout: the saved
        epoch starts again from its beginning with this loader's split (samples of that
        epoch already seen are seen again), and a warning says so."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')} != {STATE_VERSION}")
        self._iterator = None
        self.epoch = state["epoch"]
        self._reset_epoch()
        self._skipped_before = Counter(state["skipped_before"])
        layout = {k: state[k] for k in self._layout()}
        if layout != self._layout():
            changed = {k: f"{v} -> {self._layout()[k]}" for k, v in layout.items()
                       if v != self._layout()[k]}
            log.warning("data position saved with another layout (%s): restarting epoch %d "
                        "from its beginning with the new split", changed, self.epoch)
            return
        self.step_in_epoch, self._next_worker = state["step_in_epoch"], state["next_worker"]
        self._positions = json.loads(json.dumps(state["workers"]))


def make_train_loader(cfg: DataConfig, *, rank: int, world_size: int, seed: int,
                      in_channels: int, out_channels: int,
                      have_batch_all_ranks: Callable[[bool], bool] | None = None) -> TrainLoader:
    """The training stream of this rank (see TrainLoader). rank/world_size are explicit,
    never read from the environment; do not pass the loader to accelerator.prepare()."""
    shards = list_shards(cfg.train, cfg.train_split)
    return TrainLoader(cfg, shards, rank=rank, world_size=world_size, seed=seed,
                       in_channels=in_channels, out_channels=out_channels,
                       have_batch_all_ranks=have_batch_all_ranks)


def to_device(batch: dict, device, *, cfg: DataConfig, channels_last: bool,
              dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target) on `device` (non_blocking), in [-1, 1], as `dtype`. A batch made
    with augment_on == "device" (it has "aug") is resized, cropped and flipped here,
    batched, with the worker-computed (seed, epoch, key) params."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out = []
    for name in ("input", "target"):
        images = batch[name].to(device, non_blocking=True)
        if "aug" in batch:
            images = to_unit_range(augment(images, batch["aug"], cfg), dtype)
        out.append(images.to(dtype=dtype, memory_format=memory_format))
    return out[0], out[1]


# --------------------------------------------------------------------------- evaluation

class _EvalStream(torch.utils.data.IterableDataset):
    """The val split in manifest order; sample i belongs to reader i % readers (a reader
    is one worker of one rank): disjoint, complete, deterministic, unpadded. Every reader
    reads every shard but decodes only its own samples."""

    def __init__(self, cfg, shards, rank, world_size, in_channels, out_channels, batch_size):
        self.cfg, self.shards, self.rank, self.world_size = cfg, shards, rank, world_size
        self.in_channels, self.out_channels, self.batch_size = in_channels, out_channels, batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        readers, me = self.world_size * workers, self.rank * workers + worker
        samples = []
        entries = (e for e in read_entries(self.shards) if e[2] is not None)
        for index, (_, _, key, parts) in enumerate(entries):
            if index % readers != me:
                continue
            pair, reason = try_decode(key, parts, self.cfg, self.in_channels, self.out_channels)
            if reason is not None:
                log.warning("val sample %s skipped: %s", key, reason)
                continue
            samples.append((key, [to_unit_range(resize_u8(_chw(p), self.cfg.crop_size))[0]
                                  for p in pair]))
            if len(samples) == self.batch_size:
                yield _stack(samples)
                samples = []
        if samples:
            yield _stack(samples)


def _stack(samples: list) -> dict:
    return {"input": torch.stack([s[1][0] for s in samples]),
            "target": torch.stack([s[1][1] for s in samples]), "key": [s[0] for s in samples]}


def make_eval_loader(cfg: DataConfig, *, rank: int, world_size: int, in_channels: int,
                     out_channels: int, batch_size: int | None = None):
    """The val split for this rank: every sample exactly once across ranks (ranks may
    get different counts; sum metrics across ranks). Reference test protocol: bicubic
    resize to crop_size, no crop, no flip, direction applied. Re-iterable; batches are
    float [-1, 1] {"input", "target", "key"} (no "aug": to_device only moves them)."""
    shards = list_shards(cfg.val, cfg.val_split)
    dataset = _EvalStream(cfg, shards, rank, world_size, in_channels, out_channels,
                          batch_size or cfg.batch_size)
    return WorkerLoader(dataset, cfg.num_workers, seed=0)
