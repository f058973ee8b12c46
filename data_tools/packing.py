"""One pair -> the members of its sample (shard.py's per-pair work), and the processes
that do it pair by pair when it costs CPU.

`pack_pair` stores a pair's bytes untouched (only the header probed) unless an option
asks for new pixels (--load-size [--preprocess], --resize, --split-pairs, a size
mismatch resized); then `reencode` decodes, splits, resizes and encodes it. On a
1200x600 A|B JPEG pre-resized to 286 (--load-size 286 --encode jpeg) that costs ~6 ms of
one core: decoding the full-size JPEG ~3 ms (simplejpeg, libjpeg-turbo: the trainer's
own decoder, the same pixels as PIL's, which needs ~5.5), the trainer's resize ~2 ms for
both halves, the JPEG encode <1 ms; PNG's encode alone costs ~30 ms per half. The pixels
are exactly the trainer's: no reduced-scale (draft) decoding, which would be cheaper and
different. So re-encoding is spread over processes pair by pair (`outcomes_in_pool`),
whatever the number of shards, while copying, which costs almost nothing, is spread
shard by shard (shard.py's `pack`). Figures and advice: docs/sharding.md.
"""
from __future__ import annotations

import collections
import contextlib
import io
import math
import multiprocessing
import multiprocessing.pool
import os
import re
import signal
from collections.abc import Iterable, Iterator
from multiprocessing import resource_tracker

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_tools import sources
from pipeline import storage
from pipeline.data import decode
from pipeline.data.decode import scale_16bit
from pipeline.data.format import EXT_OF_PIL_FORMAT

FORMATS = EXT_OF_PIL_FORMAT  # what the trainer decodes
READ_AHEAD = 32  # pairs read at once while packing
AUTO_PAIRS_PER_WORKER = 100  # --workers auto when re-encoding: fewer pairs, fewer processes
REASONS = ("read_error", "missing_input", "missing_target", "not_an_image",
           "unsupported_format", "too_large", "size_mismatch", "decode_error",
           "ambiguous_source", "duplicate_row")  # the last two found by the listing (sources.py)


def _detail(err: BaseException) -> str:
    """An error's message for rejected.jsonl: PIL names in-memory files by their object
    repr (`<_io.BytesIO object at 0x7f...>`), which says nothing and differs per run."""
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the image", str(err))
    return " ".join(text.split())[:200]


class Rejected(Exception):
    """A pair that cannot be packed: `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail

    def __reduce__(self):  # crosses process boundaries whole
        return Rejected, (self.reason, self.detail)


def reencodes(options: dict) -> bool:
    """Whether the options make pairs decoded and encoded again (CPU-bound work)."""
    return bool(options.get("load_size") or options["resize"] or options["split_pairs"])


# ------------------------------------------------------------------------------ reading

def fetched(pairs: list) -> Iterator[tuple]:
    """(pair, {url: bytes, FileNotFoundError or Rejected}) per pair, read READ_AHEAD at
    once (concurrent reads: S3 latency adds up otherwise). Other read errors become
    their read_error rejection here: an S3 client's exception may not cross processes."""
    for start in range(0, len(pairs), READ_AHEAD):
        batch = pairs[start:start + READ_AHEAD]
        found = storage.read_many([u for p in batch for u in (p.input, p.target) if u])
        for url, data in found.items():
            if isinstance(data, Exception) and not isinstance(data, FileNotFoundError):
                found[url] = Rejected("read_error", f"{type(data).__name__}: {_detail(data)}"[:200])
        for pair in batch:
            yield pair, {u: found[u] for u in (pair.input, pair.target) if u in found}


def _read(found: dict, url: str | None, missing: str) -> bytes:
    data = found.get(url, FileNotFoundError()) if url else FileNotFoundError()
    if isinstance(data, FileNotFoundError):
        raise Rejected(missing, url or "")
    if isinstance(data, Rejected):
        raise data
    return data


# ------------------------------------------------------------------------------ packing

def probe(data: bytes, options: dict) -> tuple[str, int, int]:
    """(format, width, height) from the header only; a full decode with --verify."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # --max-pixels rules here
    try:
        im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise Rejected("not_an_image", _detail(err)) from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    with im:
        fmt = "JPEG" if im.format == "MPO" else im.format  # a camera's JPEG, extra pictures aside
        if fmt not in FORMATS:
            raise Rejected("unsupported_format", str(im.format))
        width, height = im.size
        if width * height > options["max_pixels"]:
            raise Rejected("too_large", f"{width}x{height} > {options['max_pixels']} pixels")
        if options["verify"]:
            try:
                im.load()
            except Exception as err:  # noqa: BLE001 - PIL raises many types for broken data
                raise Rejected("decode_error", _detail(err)) from None
    return fmt, width, height


def outcome(pair: sources.Pair, found: dict, options: dict):
    """`pack_pair`'s (metadata, members), or the Rejected it raised (returned)."""
    try:
        return pack_pair(pair, found, options)
    except Rejected as why:
        return why


def pack_pair(pair: sources.Pair, found: dict, options: dict) -> tuple[dict, list]:
    """(metadata, [(member suffix, bytes)]) for one pair whose files are in `found`
    ({url: bytes or error}), or raises Rejected."""
    if pair.problem:
        raise Rejected(*pair.problem)
    meta = {"source": pair.name, "layout": pair.layout}
    a = _read(found, pair.input, "missing_input")
    fmt, width, height = probe(a, options)
    b_fmt = None
    if pair.layout == "pair":
        halves_differ = width % 2 == 1
        half_w = width // 2
    else:
        b = _read(found, pair.target, "missing_target")
        b_fmt, b_width, b_height = probe(b, options)
        halves_differ = (width, height) != (b_width, b_height)
        half_w = width
    if halves_differ and options["on_size_mismatch"] == "skip":
        detail = f"{width}x{height} A|B" if pair.layout == "pair" else \
            f"input {width}x{height}, target {b_width}x{b_height}"
        raise Rejected("size_mismatch", detail)
    too_big = options["resize"] and max(half_w, height) > options["resize"]
    resized = options.get("load_size", 0) > 0
    if halves_differ or too_big or resized or (pair.layout == "pair" and options["split_pairs"]):
        return reencode(pair, (a, fmt), None if pair.layout == "pair" else (b, b_fmt), options)
    meta.update(width=width, height=height, format=fmt.lower())
    if pair.layout == "pair":
        meta["split_x"] = half_w
        return meta, [("pair." + FORMATS[fmt], a)]
    return meta, [("input." + FORMATS[fmt], a), ("target." + FORMATS[b_fmt], b)]


def reencode(pair, a: tuple, b: tuple | None, options: dict):
    """Decode, split an A|B image, resize (target to input's size, then to --resize),
    encode as PNG or JPEG; the only path that changes pixels, and only when asked.
    `a`, `b`: (bytes, PIL format name); b is None for an A|B image."""
    try:
        input_px = decode_rgb(*a)
        if b is None:
            half = input_px.shape[1] // 2
            input_px, target_px = input_px[:, :half], input_px[:, half:]
        else:
            target_px = decode_rgb(*b)
    except Exception as err:  # noqa: BLE001 - truncated data shows only now, without --verify
        raise Rejected("decode_error", _detail(err)) from None
    if options.get("load_size"):  # both halves alike, as the trainer would resize them
        input_im, target_im = to_load_size([input_px, target_px], options["load_size"],
                                           options.get("preprocess", "resize_and_crop"))
    else:
        input_im, target_im = Image.fromarray(input_px), Image.fromarray(target_px)
        if target_im.size != input_im.size:
            target_im = target_im.resize(input_im.size, Image.BICUBIC)
    if options["resize"] and max(input_im.size) > options["resize"]:
        scale = options["resize"] / max(input_im.size)
        size = (max(1, round(input_im.width * scale)), max(1, round(input_im.height * scale)))
        input_im, target_im = (im.resize(size, Image.BICUBIC) for im in (input_im, target_im))
    ext = "png" if options["encode"] == "png" else "jpg"
    meta = {"source": pair.name, "layout": "separate", "source_layout": pair.layout,
            "width": input_im.width, "height": input_im.height,
            "format": "png" if ext == "png" else "jpeg",
            "reencoded": "png" if ext == "png" else f"jpeg q{options['jpeg_quality']}"}
    return meta, [("input." + ext, _encode(input_im, options)),
                  ("target." + ext, _encode(target_im, options))]


def to_load_size(halves: list[np.ndarray], load_size: int,
                 preprocess: str = "resize_and_crop") -> list[Image.Image]:
    """Each H x W x 3 uint8 array resized to `preprocess`'s scale of the input half
    (augmentation.scale_to: load_size x load_size for resize_and_crop, the aspect kept
    for the scale_* modes; a target of another size goes to the input's) by the
    trainer's own resize (pipeline.data.resize_u8: antialiased bicubic on uint8, one call
    for halves of one size), so pre-resized shards hold exactly the pixels the trainer
    would compute from the originals. (torch only here: packing processes start faster
    without it.)"""
    import torch

    from pipeline.data.augmentation import resize_u8, scale_to
    size = scale_to(preprocess, load_size, halves[0].shape[:2])
    batches = [halves] if halves[0].shape == halves[1].shape else [[h] for h in halves]
    resized = []
    for batch in batches:
        pixels = torch.stack([torch.from_numpy(h) for h in batch]).permute(0, 3, 1, 2)
        resized += list(resize_u8(pixels, size).permute(0, 2, 3, 1).contiguous().numpy())
    return [Image.fromarray(px) for px in resized]


def decode_rgb(data: bytes, fmt: str) -> np.ndarray:
    """H x W x 3 uint8: gray and RGB halves then match; 16-bit grayscale scaled to 8 bits
    by the trainer's own policy (pipeline.data.decode). JPEG through simplejpeg where it
    takes the file (the trainer's decoder: the same pixels as PIL's, ~1.8x faster); what
    it refuses (CMYK, a warning such as a cut file, more pixels than PIL allows) goes to
    PIL, whose error message rejected.jsonl then records."""
    simplejpeg = decode._simplejpeg()
    if fmt == "JPEG" and simplejpeg is not None:
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            if colorspace in ("Gray", "YCbCr", "RGB") and \
                    width * height <= (Image.MAX_IMAGE_PIXELS or width * height):
                return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError:
            pass
    return np.array(scale_16bit(Image.open(io.BytesIO(data))).convert("RGB"))


def _encode(im: Image.Image, options: dict) -> bytes:
    buffer = io.BytesIO()
    if options["encode"] == "png":
        im.save(buffer, "PNG")
    else:
        im.save(buffer, "JPEG", quality=options["jpeg_quality"])
    return buffer.getvalue()


# ------------------------------------------------------------------------ the processes

def usable_cpus() -> int:
    """CPUs this process may run on (a Slurm or container limit), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def auto_workers(reencodes: bool, pairs: int) -> int:
    """--workers auto: to copy, at most 8 processes (it is I/O); to re-encode, every
    usable CPU, one per AUTO_PAIRS_PER_WORKER pairs at most (a process costs ~2 CPU-s to
    start, torch's import: ~350 pairs' work)."""
    if not reencodes:
        return min(8, usable_cpus())
    return min(usable_cpus(), math.ceil(pairs / AUTO_PAIRS_PER_WORKER))


INTERRUPTS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def interrupts_to_this_thread():
    """Threads started inside (the pool's, tqdm's monitor) keep SIGINT and SIGTERM
    blocked, so these reach this thread alone: storage.atomic_write holds them here while
    it creates a temp file, and one taken by another thread would still raise here,
    before the `try` that removes the file, leaving it behind."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def start_pool(workers: int, options: dict) -> multiprocessing.pool.Pool:
    """`workers` packing processes. spawn, not fork: a fork of a process that runs
    threads (an S3 client's event loop, tqdm's monitor) can copy a held lock into a
    worker that then never starts."""
    resource_tracker.ensure_running()  # first: starting it unblocks SIGINT and SIGTERM
    with interrupts_to_this_thread():
        return multiprocessing.get_context("spawn").Pool(
            workers, _worker_init, (bool(options.get("load_size")),))


def _worker_init(resizes: bool) -> None:
    """Ctrl-C reaches the whole process group: the parent alone decides, then stops the
    workers with SIGTERM, which must unwind atomic_write to remove its temp file. torch
    (the resize) runs one thread per process: N processes of N threads each are N times
    oversubscribed, and ran slower than one process (45 against 61 pairs/s, 2 cores)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _quiet_exit)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, INTERRUPTS)  # inherited from start_pool
    if resizes:
        import torch
        torch.set_num_threads(1)


@contextlib.contextmanager
def one_torch_thread(resizes: bool):
    """The resize on one thread meanwhile: more only burn CPU in OpenMP's waits (the
    same wall time, +50% CPU seconds on 2 cores); more cores take more processes."""
    if not resizes:
        yield
        return
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _quiet_exit(signum, frame):
    """Inside the worker's loop: unwind like an exception (atomic_write removes its temp
    file), ending without a traceback. Past it (the worker already leaving, in its exit
    handlers) nothing is left to unwind, and an exception would print one: exit now."""
    while frame is not None and frame.f_code is not multiprocessing.pool.worker.__code__:
        frame = frame.f_back
    if frame is None:
        os._exit(128 + signum)
    raise SystemExit(128 + signum)


def outcomes_in_pool(pool, items: Iterable[tuple], options: dict, depth: int) -> Iterator[tuple]:
    """(pair, outcome) for each (pair, found) of `items`, in their order, packed by the
    pool's processes with at most `depth` pairs in flight (read ahead, never the whole
    source into memory)."""
    window = collections.deque()
    for pair, found in items:
        window.append((pair, pool.apply_async(outcome, (pair, found, options))))
        if len(window) >= depth:
            pair, result = window.popleft()
            yield pair, result.get()
    while window:
        pair, result = window.popleft()
        yield pair, result.get()
