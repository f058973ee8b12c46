"""Packs image pairs into deterministic WebDataset tar shards, local or on S3.

    python data_tools/shard.py SOURCE DEST [options]    plan, pack every shard, manifest
    python data_tools/shard.py SOURCE DEST --slice i/n  pack only part i of n (job arrays)
    python data_tools/shard.py merge DEST               manifest from all parts' results

Shards are planned up front from the listing (seeded order, --max-samples/--max-bytes,
at least --min-shards per split), so their boundaries depend on neither --workers nor
--slice, and a rejected pair leaves a hole instead of shifting later shards. Each shard
is written atomically; its result (samples, bytes, rejected pairs) goes to
DEST/_parts/NAME.json, which is how a re-run skips finished shards and how `merge`
builds DEST/rejected.jsonl and, last, DEST/manifest.json. _parts/ is kept after the
manifest: it lets a later re-run or merge check the work without repacking.

Members per sample: KEY.input.EXT + KEY.target.EXT, or KEY.pair.EXT for an A|B image
kept whole (split at "split_x" of KEY.json by the reader), plus KEY.json. Original
bytes are stored untouched unless --split-pairs, --resize or a size-mismatch resize asks
for decoding; those re-encode as PNG (lossless) or JPEG at --jpeg-quality.
"""
import argparse
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import re
import signal
import sys
import tarfile
import time

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from data_tools import sources
from pipeline import cli, faults, storage
from pipeline.data.decode import MAX_IMAGE_PIXELS, scale_16bit
from pipeline.data.format import (
    EXT_OF_PIL_FORMAT,
    FORMAT_VERSION,
    Manifest,
    ShardInfo,
    SplitInfo,
    member_name,
    write_member,
)
from pipeline.errors import DataError, UserError

FORMATS = EXT_OF_PIL_FORMAT  # what the trainer decodes
PARTS = "_parts"
READ_AHEAD = 32  # pairs read at once while packing
REASONS = ("read_error", "missing_input", "missing_target", "not_an_image",
           "unsupported_format", "too_large", "size_mismatch", "decode_error")
# options that change the shards' bytes: recorded in the plan, the parts and the manifest
OUTPUT_OPTIONS = ("source", "layout", "split", "seed", "max_samples", "max_bytes",
                  "min_shards", "split_pairs", "resize", "encode", "jpeg_quality",
                  "on_size_mismatch", "max_pixels", "verify")


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


@dataclasses.dataclass
class Shard:
    name: str
    split: str
    pairs: list
    digest: str = ""  # of the options and pairs: a finished part counts only if it matches


# ----------------------------------------------------------------------------- planning

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
        rows = [dataclasses.astuple(p) for p in shard.pairs]
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
        if im.format not in FORMATS:
            raise Rejected("unsupported_format", str(im.format))
        width, height = im.size
        if width * height > options["max_pixels"]:
            raise Rejected("too_large", f"{width}x{height} > {options['max_pixels']} pixels")
        if options["verify"]:
            try:
                im.load()
            except Exception as err:  # noqa: BLE001 - PIL raises many types for broken data
                raise Rejected("decode_error", _detail(err)) from None
    return im.format, width, height


def _read(fetched: dict, url: str | None, missing: str) -> bytes:
    data = fetched.get(url, FileNotFoundError()) if url else FileNotFoundError()
    if isinstance(data, FileNotFoundError):
        raise Rejected(missing, url or "")
    if isinstance(data, Exception):
        raise Rejected("read_error", f"{type(data).__name__}: {_detail(data)}"[:200])
    return data


def pack_pair(pair: sources.Pair, fetched: dict, options: dict) -> tuple[dict, list]:
    """(metadata, [(member suffix, bytes)]) for one pair whose files are in `fetched`
    ({url: bytes or error}), or raises Rejected."""
    meta = {"source": pair.name, "layout": pair.layout}
    a = _read(fetched, pair.input, "missing_input")
    fmt, width, height = probe(a, options)
    if pair.layout == "pair":
        halves_differ = width % 2 == 1
        half_w = width // 2
    else:
        b = _read(fetched, pair.target, "missing_target")
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
        return reencode(pair, a, None if pair.layout == "pair" else b, options)
    meta.update(width=width, height=height, format=fmt.lower())
    if pair.layout == "pair":
        meta["split_x"] = half_w
        return meta, [("pair." + FORMATS[fmt], a)]
    return meta, [("input." + FORMATS[fmt], a), ("target." + FORMATS[b_fmt], b)]


def reencode(pair, a: bytes, b: bytes | None, options: dict):
    """Decode, split an A|B image, resize (target to input's size, then to --resize),
    encode as PNG or JPEG; the only path that changes pixels, and only when asked."""
    try:
        input_im = _rgb(a)
        if b is None:
            half = input_im.width // 2
            target_im = input_im.crop((half, 0, input_im.width, input_im.height))
            input_im = input_im.crop((0, 0, half, input_im.height))
        else:
            target_im = _rgb(b)
    except Exception as err:  # noqa: BLE001 - truncated data shows only now, without --verify
        raise Rejected("decode_error", _detail(err)) from None
    if options.get("load_size"):  # both halves to N x N, as the trainer would resize them
        input_im, target_im = (to_load_size(im, options["load_size"]) for im in (input_im, target_im))
    elif target_im.size != input_im.size:
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


def to_load_size(im: Image.Image, size: int) -> Image.Image:
    """`im` resized to size x size by the trainer's own resize (pipeline.data.resize_u8:
    antialiased bicubic on uint8), so pre-resized shards hold exactly the pixels the
    trainer would compute from the originals. (torch only here: shard.py's packing
    processes start faster without it.)"""
    import torch

    from pipeline.data.augmentation import resize_u8
    pixels = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None]
    return Image.fromarray(resize_u8(pixels, size)[0].permute(1, 2, 0).contiguous().numpy())


def _rgb(data: bytes) -> Image.Image:
    """Decoded as RGB (gray and RGB halves then match), 16-bit grayscale scaled to 8 bits
    by the trainer's own policy (pipeline.data.decode)."""
    return scale_16bit(Image.open(io.BytesIO(data))).convert("RGB")


def _encode(im: Image.Image, options: dict) -> bytes:
    buffer = io.BytesIO()
    if options["encode"] == "png":
        im.save(buffer, "PNG")
    else:
        im.save(buffer, "JPEG", quality=options["jpeg_quality"])
    return buffer.getvalue()


def pack_shard(job: tuple) -> dict:
    """Write one shard atomically, then its part file; returns the part."""
    dest, shard, options = job
    samples, rejected = 0, []
    with storage.atomic_write(storage.join(dest, shard.name)) as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for i, pair in enumerate(shard.pairs):
                if i % READ_AHEAD == 0:  # concurrent reads: S3 latency adds up otherwise
                    batch = shard.pairs[i:i + READ_AHEAD]
                    fetched = storage.read_many([u for p in batch for u in (p.input, p.target) if u])
                try:
                    meta, members = pack_pair(pair, fetched, options)
                except Rejected as why:
                    rejected.append({"split": shard.split, "key": pair.key, "source": pair.name,
                                     "reason": why.reason, "detail": why.detail})
                    continue
                for suffix, data in members:
                    write_member(tar, member_name(pair.key, suffix), data)
                write_member(tar, member_name(pair.key, "json"), json.dumps(meta, sort_keys=True).encode())
                samples += 1
        nbytes = f.tell()
    faults.kill_point("shard.after_tar")  # the shard is in place, its part file not yet
    part = {"name": shard.name, "split": shard.split, "digest": shard.digest,
            "samples": samples, "bytes": nbytes, "planned": len(shard.pairs),
            "rejected": rejected}
    storage.write_bytes(_part_url(dest, shard.name), _dumps(part))
    return part


def drop_stale_manifest(dest: str, plan: dict) -> None:
    """A manifest of another plan is removed before the first tar is written: a run cut
    short would otherwise leave it listing shards that are now partly the new data's."""
    manifest, old_plan = storage.join(dest, "manifest.json"), storage.join(dest, PARTS, "plan.json")
    if not storage.exists(manifest):
        return
    if storage.exists(old_plan) and json.loads(storage.read_bytes(old_plan)) == plan:
        return
    storage.remove(manifest)
    print(f"shard.py: {dest} held shards of another plan: its manifest.json is removed until "
          "this run writes the new one", file=sys.stderr)


def _part_url(dest: str, shard_name: str) -> str:
    return storage.join(dest, PARTS, shard_name.removesuffix(".tar") + ".json")


def _dumps(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def finished_part(dest: str, shard: Shard) -> dict | None:
    """The part of a shard packed earlier with the same plan, or None."""
    url = _part_url(dest, shard.name)
    if not storage.exists(url):
        return None
    part = json.loads(storage.read_bytes(url))
    done = part.get("digest") == shard.digest and storage.exists(storage.join(dest, shard.name))
    return part if done else None


# ------------------------------------------------------------------------------ running

def pack(dest: str, shards: list[Shard], options: dict, workers: int, progress: bool) -> dict:
    """Pack every shard not finished yet; returns counts for the summary."""
    todo = [s for s in shards if finished_part(dest, s) is None]
    stats = {"skipped": len(shards) - len(todo), "packed": 0, "pairs": 0, "bytes": 0}
    start = time.perf_counter()
    bar = tqdm(total=sum(len(s.pairs) for s in todo), unit="pair", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    jobs = [(dest, shard, options) for shard in todo]
    # spawn, not fork: a fork of a process that runs threads (an S3 client's event loop,
    # tqdm's monitor) can copy a held lock into a worker that then never starts.
    pool = multiprocessing.get_context("spawn").Pool(workers, _worker_signals) \
        if workers > 1 and len(jobs) > 1 else None
    try:
        parts = pool.imap_unordered(pack_shard, jobs) if pool else map(pack_shard, jobs)
        for part in parts:
            stats["packed"] += 1
            stats["pairs"] += part["planned"]
            stats["bytes"] += part["bytes"]
            bar.update(part["planned"])
            bar.set_postfix_str(f"{stats['bytes'] / 2**20 / (time.perf_counter() - start):.1f} MB/s")
        if pool:
            pool.close()  # all done: let the workers exit on their own
            pool.join()
    finally:
        bar.close()
        if pool:
            pool.terminate()  # on Ctrl-C or an error the workers must stop now
    stats["seconds"] = time.perf_counter() - start
    return stats


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _worker_signals() -> None:
    """Ctrl-C reaches the whole process group: the parent alone decides, then stops the
    workers with SIGTERM, which must unwind atomic_write to remove its temp file."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _quiet_exit)


def _quiet_exit(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like an exception, ends without a traceback


def merge(dest: str, strict: bool = False) -> Manifest:
    """Write rejected.jsonl and, last, manifest.json from the plan and every part. With
    `strict`, a rejected pair fails the run before the manifest is written: a failed
    strict run must not look like a finished dataset."""
    plan_url = storage.join(dest, PARTS, "plan.json")
    if not storage.exists(plan_url):
        raise UserError(f"no shard plan in {dest}: run `shard.py SOURCE DEST [--slice i/n]` first")
    plan = json.loads(storage.read_bytes(plan_url))
    parts, missing = [], []
    for entry in plan["shards"]:
        shard = Shard(entry["name"], entry["split"], [], entry["digest"])
        part = finished_part(dest, shard)
        (parts if part else missing).append(part or shard.name)
    if missing:
        raise UserError(f"{len(missing)} of {len(plan['shards'])} shards in {dest} are not "
                        f"packed yet (first: {missing[0]}); run the missing slices (or the "
                        "same command again), then merge")
    manifest = Manifest(options=plan["options"], format_version=FORMAT_VERSION)
    for part in parts:
        split = manifest.splits.setdefault(part["split"], SplitInfo())
        split.samples += part["samples"]
        split.bytes += part["bytes"]
        split.rejected += len(part["rejected"])
        split.shards.append(ShardInfo(part["name"], part["samples"], part["bytes"]))
        for row in part["rejected"]:
            manifest.rejected[row["reason"]] = manifest.rejected.get(row["reason"], 0) + 1
    manifest.rejected = dict(sorted(manifest.rejected.items()))
    rejected_rows = [json.dumps(row, sort_keys=True) + "\n" for p in parts for row in p["rejected"]]
    storage.write_bytes(storage.join(dest, "rejected.jsonl"), "".join(rejected_rows).encode())
    if strict and rejected_rows:
        report_rejected(manifest, dest)
        storage.remove(storage.join(dest, "manifest.json"))  # one from an earlier run
        raise DataError(f"--strict: {len(rejected_rows)} pairs were rejected, so no manifest.json "
                        f"was written (the trainer cannot use {dest}); fix or remove them and "
                        "run again (packed shards are kept), or drop --strict")
    faults.kill_point("shard.before_manifest")
    manifest.write(dest)
    return manifest


def run(args: argparse.Namespace) -> int:
    """Plan, pack this slice, merge when it is the whole plan. SIGTERM (Slurm preemption,
    `kill`) stops it like Ctrl-C: finished shards kept, temp files removed."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    options = {name: getattr(args, name) for name in OUTPUT_OPTIONS}
    if args.load_size:  # recorded only when used: earlier plans' digests stay valid
        if args.resize:
            raise UserError("--load-size and --resize: choose one (--load-size stores the "
                            "trainer's own resize to N x N; --resize caps the longer side)")
        options["load_size"] = args.load_size
    pairs_by_split = sources.find_pairs(args.source, args.layout, args.split)
    shards = plan_shards(pairs_by_split, options)
    plan = {"format_version": FORMAT_VERSION, "options": options,
            "shards": [{"name": s.name, "split": s.split, "digest": s.digest} for s in shards]}
    try:  # the plan is also the probe: an unwritable DEST fails here, before any work
        storage.makedirs(args.dest)
        drop_stale_manifest(args.dest, plan)
        storage.write_bytes(storage.join(args.dest, PARTS, "plan.json"), _dumps(plan))
    except OSError as err:
        raise UserError(f"cannot write to {args.dest}: {err.strerror or err}") from None
    mine = in_slice(shards, args.slice)
    stats = pack(args.dest, mine, options, args.workers, not args.quiet)
    counts = ", ".join(f"{split} {len(pairs)}" for split, pairs in pairs_by_split.items())
    mb = stats["bytes"] / 2**20
    print(f"shard.py: {counts} pairs planned into {len(shards)} shards; this run packed "
          f"{stats['packed']} shards ({stats['pairs']} pairs, {mb:.1f} MB) in "
          f"{stats['seconds']:.1f} s = {stats['pairs'] / max(stats['seconds'], 1e-9):.0f} pairs/s,"
          f" {mb / max(stats['seconds'], 1e-9):.1f} MB/s; {stats['skipped']} already done",
          file=sys.stderr)
    if args.slice[1] > 1:
        print(f"shard.py: slice {args.slice[0]}/{args.slice[1]} done; when all slices are, run: "
              f"shard.py merge {args.dest}", file=sys.stderr)
        return 0
    manifest = merge(args.dest, strict=args.strict)
    report_rejected(manifest, args.dest)
    samples = sum(s.samples for s in manifest.splits.values())
    print(f"shard.py: {samples} samples in {storage.join(args.dest, 'manifest.json')}", file=sys.stderr)
    return 0


def report_rejected(manifest: Manifest, dest: str) -> None:
    """What was rejected and why, and the shards a rejection left empty."""
    total = sum(manifest.rejected.values())
    if total:
        why = ", ".join(f"{reason} {n}" for reason, n in manifest.rejected.items())
        print(f"shard.py: rejected {total} pairs ({why}); listed in "
              f"{storage.join(dest, 'rejected.jsonl')}", file=sys.stderr)
    empty = [s.name for info in manifest.splits.values() for s in info.shards if s.samples == 0]
    if empty:
        print(f"shard.py: {len(empty)} shards hold no sample, every pair planned for them was "
              f"rejected (first: {empty[0]}); the trainer skips them", file=sys.stderr)


# ---------------------------------------------------------------------------------- CLI

def parse_slice(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/n, got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"need 0 <= i < n, got {text!r}")
    return index, count


def parse_size(text: str) -> int:
    """Bytes from '536870912', '512M', '2G'."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    text = text.strip().upper().removesuffix("B")
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


SUBCOMMANDS = ("pack", "merge")


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="shard.py", description="Pack image pairs into WebDataset tar shards + manifest.json.",
        epilog="`shard.py SOURCE DEST [options]` is short for `shard.py pack SOURCE DEST "
               "[options]`; `shard.py pack --help` lists the options.")
    sub = p.add_subparsers(dest="command", metavar="{pack,merge}")
    pack = sub.add_parser("pack", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                          help="plan the shards and pack them (all, or one --slice)")
    add_pack_options(pack)
    merge_parser = sub.add_parser("merge", help="write DEST/manifest.json once every --slice run "
                                  "has packed its part (they leave results in DEST/_parts)")
    merge_parser.add_argument("dest", help="the DEST given to the slices")
    return p


def add_pack_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="aligned A|B folder, folder with A/ and B/, or a .csv/.jsonl "
                                  "list of input,target; local path or s3:// URL")
    p.add_argument("dest", help="output folder or s3://bucket/prefix")
    p.add_argument("--layout", choices=sources.LAYOUTS, default="auto", help="SOURCE layout")
    p.add_argument("--split", default="train", help="split name for a source without "
                   "train/ val/ test/ folders")
    p.add_argument("--seed", type=int, default=0, help="fixes the pair order")
    p.add_argument("--max-samples", type=positive, default=10000, help="pairs per shard at most")
    p.add_argument("--max-bytes", type=parse_size, default=512 * 2**20,
                   help="source bytes per shard at most (accepts K, M, G)")
    p.add_argument("--min-shards", type=positive, default=8,
                   help="shards per split at least (a smaller split: one per pair)")
    p.add_argument("--workers", type=positive, default=min(8, os.cpu_count() or 1),
                   help="packing processes: min(8, CPU count) unless given")
    p.add_argument("--slice", type=parse_slice, default="0/1", metavar="I/N",
                   help="pack only part I of N of the shard plan (then `merge`)")
    p.add_argument("--split-pairs", action="store_true",
                   help="store A|B images as separate re-encoded input/target members")
    p.add_argument("--resize", type=int, default=0, metavar="PIXELS",
                   help="shrink each half so its longer side is at most this (0: never)")
    p.add_argument("--load-size", type=int, default=0, metavar="N",
                   help="store each pair already resized to N x N by the trainer's own resize "
                        "(both halves alike), recorded in the manifest: the trainer then needs "
                        "data.load_size=N and decodes small images (high-resolution sources); "
                        "0: store the originals")
    p.add_argument("--encode", choices=("png", "jpeg"), default="png",
                   help="format for re-encoded images (png is lossless)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="quality for --encode jpeg")
    p.add_argument("--on-size-mismatch", choices=("skip", "resize"), default="skip",
                   help="halves of different sizes: reject, or resize target to input")
    p.add_argument("--max-pixels", type=positive, default=MAX_IMAGE_PIXELS,
                   help="larger images are rejected as too_large (decompression bombs); the "
                        "trainer's data.max_image_pixels has the same default")
    p.add_argument("--verify", action="store_true", help="also fully decode every image")
    p.add_argument("--strict", action="store_true",
                   help="fail (exit 2, no manifest.json) if any pair is rejected")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _main(argv: list[str]) -> int:
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["pack", *argv]  # `shard.py SOURCE DEST [options]`, the everyday form
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("give SOURCE DEST (or a subcommand: pack, merge)")
    cli.setup_logging()
    if args.command == "merge":
        manifest = merge(args.dest)
        report_rejected(manifest, args.dest)
        return 0
    try:
        return run(args)
    except KeyboardInterrupt:
        print("shard.py: interrupted; finished shards are kept, run the same command again "
              "to resume", file=sys.stderr)
        return 130


main = cli.entry_point("shard.py", _main)


if __name__ == "__main__":
    sys.exit(main())
