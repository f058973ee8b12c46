"""Packs image pairs into deterministic WebDataset tar shards, local or on S3.

    python data_tools/shard.py SOURCE DEST [options]    plan, pack every shard, manifest
    python data_tools/shard.py SOURCE DEST --slice i/n  pack only part i of n (job arrays)
    python data_tools/shard.py merge DEST               manifest from all parts' results

Shards are planned up front from the listing (seeded order, --max-samples/--max-bytes,
at least --min-shards per split), so their boundaries depend on neither --workers nor
--slice, and a rejected pair leaves a hole instead of shifting later shards. Each shard
is written atomically; its result (samples, bytes, rejected pairs, sizes, layouts) goes to
DEST/_parts/NAME.json, which is how a re-run skips finished shards and how `merge`
builds DEST/rejected.jsonl and, last, DEST/manifest.json. _parts/ is kept after the
manifest: it lets a later re-run or merge check the work without repacking.

Members per sample: KEY.input.EXT + KEY.target.EXT, or KEY.pair.EXT for an A|B image
kept whole (split at "split_x" of KEY.json by the reader), plus KEY.json. Original
bytes are stored untouched unless --load-size, --split-pairs, --resize or a size-mismatch
resize asks for decoding; those re-encode as PNG (lossless) or JPEG at --jpeg-quality
(data_tools/packing.py: the per-pair work and the processes that share it).
"""
import argparse
import dataclasses
import errno
import itertools
import json
import signal
import sys
import tarfile
import time

from data_tools import packing, sources, tally
from data_tools.shard_options import (
    RESIZES,
    integer,
    load_size_options,
    parse_size,
    parse_slice,
    positive,
    preprocess_arg,
    workers_arg,
)
from data_tools.sources import Shard, in_slice, plan_shards
from pipeline import cli, faults, storage
from pipeline.data.format import (
    FORMAT_VERSION,
    MAX_IMAGE_PIXELS,
    Manifest,
    ShardInfo,
    SplitInfo,
    member_name,
    write_member,
)
from pipeline.errors import DataError, RunError, UserError
from pipeline.progress import Progress

PARTS = "_parts"
# options that change the shards' bytes: recorded in the plan, the parts and the manifest
OUTPUT_OPTIONS = ("source", "layout", "split", "seed", "max_samples", "max_bytes",
                  "min_shards", "split_pairs", "resize", "encode", "jpeg_quality",
                  "on_size_mismatch", "max_pixels", "verify")


# ----------------------------------------------------------------------------- summary

def say(text: str) -> None:
    """A summary line on stderr, named as the user called the tool (p2p-shard or shard.py)."""
    print(f"{cli.prog_name('shard.py')}: {text}", file=sys.stderr)


# ------------------------------------------------------------------------------ packing

def pack_shard(job: tuple) -> dict:
    """Read, pack and write one shard in this process; returns its part."""
    dest, shard, options = job
    return write_shard(dest, shard, ((pair, packing.outcome(pair, found, options))
                                     for pair, found in packing.fetched(shard.pairs)))


def write_shard(dest: str, shard: Shard, outcomes) -> dict:
    """Write one shard atomically from its pairs' (pair, outcome) in plan order, then its
    part file (with its samples' sizes and layouts, data_tools/tally.py); returns the part."""
    samples, rejected, counts = 0, [], tally.ShardTally()
    with storage.atomic_write(storage.join(dest, shard.name)) as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for pair, result in outcomes:
                if isinstance(result, packing.Rejected):
                    rejected.append({"split": shard.split, "key": pair.key, "source": pair.name,
                                     "reason": result.reason, "detail": result.detail})
                    continue
                meta, members = result
                for suffix, data in members:
                    write_member(tar, member_name(pair.key, suffix), data)
                write_member(tar, member_name(pair.key, "json"), json.dumps(meta, sort_keys=True).encode())
                counts.add(pair.key, meta)
                samples += 1
        nbytes = f.tell()
    faults.kill_point("shard.after_tar")  # the shard is in place, its part file not yet
    part = {"name": shard.name, "split": shard.split, "digest": shard.digest,
            "samples": samples, "bytes": nbytes, "planned": len(shard.pairs),
            "rejected": rejected, **counts.fields()}
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
    say(f"{dest} held shards of another plan: its manifest.json is removed until "
          "this run writes the new one")


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

def pack(dest: str, shards: list[Shard], options: dict, workers, progress: bool) -> dict:
    """Pack every shard not finished yet; returns counts for the summary. Re-encoding
    (CPU-bound) is shared by `workers` processes pair by pair while this one reads and
    writes the shards in order; copying, shard by shard (each process reads and writes
    its own). The bytes are the same either way, and with one process."""
    todo = [s for s in shards if finished_part(dest, s) is None]
    pairs = sum(len(s.pairs) for s in todo)
    stats = {"skipped": len(shards) - len(todo), "packed": 0, "pairs": 0, "bytes": 0}
    start = time.perf_counter()
    per_pair = packing.reencodes(options)
    if workers == "auto":
        workers = packing.auto_workers(per_pair, pairs)
    workers = stats["workers"] = max(1, min(workers, pairs if per_pair else len(todo)))
    with packing.interrupts_to_this_thread():
        bar = Progress(pairs, desc="shard", unit="pair", enabled=progress and bool(todo))
    pool = packing.start_pool(workers, options) if workers > 1 else None
    try:
        if pool and per_pair:
            found = itertools.chain.from_iterable(packing.fetched(s.pairs) for s in todo)
            outcomes = packing.outcomes_in_pool(pool, found, options, depth=4 * workers + packing.READ_AHEAD)
            parts = (write_shard(dest, s, itertools.islice(outcomes, len(s.pairs))) for s in todo)
        else:
            jobs = [(dest, shard, options) for shard in todo]
            parts = pool.imap_unordered(pack_shard, jobs) if pool else map(pack_shard, jobs)
        with packing.one_torch_thread(not pool and bool(options.get("load_size"))):
            for part in parts:
                stats["packed"] += 1
                stats["pairs"] += part["planned"]
                stats["bytes"] += part["bytes"]
                rate = stats["bytes"] / 2**20 / (time.perf_counter() - start)
                bar.update(part["planned"], MB_per_s=f"{rate:.1f}")
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
    for name, split in manifest.splits.items():
        split.sizes, split.layouts = tally.split_tally([p for p in parts if p["split"] == name])
    rejected_rows = [json.dumps(row, sort_keys=True) + "\n" for p in parts for row in p["rejected"]]
    _write_changed(storage.join(dest, "rejected.jsonl"), "".join(rejected_rows).encode())
    if strict and rejected_rows:
        report_rejected(manifest, dest)
        storage.remove(storage.join(dest, "manifest.json"))  # one from an earlier run
        raise DataError(f"--strict: {len(rejected_rows)} pairs were rejected, so no manifest.json "
                        f"was written (the trainer cannot use {dest}); fix or remove them and "
                        "run again (packed shards are kept), or drop --strict")
    faults.kill_point("shard.before_manifest")
    try:  # as it is already: left alone
        unchanged = json.loads(storage.read_bytes(storage.join(dest, "manifest.json"))) == \
            dataclasses.asdict(manifest)
    except (OSError, ValueError):
        unchanged = False
    if not unchanged:
        manifest.write(dest)
    return manifest


def _write_changed(url: str, data: bytes) -> None:
    """Write unless `url` holds these bytes already: a re-run that finds its work done
    leaves every file as it was."""
    try:
        if storage.read_bytes(url) == data:
            return
    except OSError:
        pass
    storage.write_bytes(url, data)


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
    # load_size (and preprocess) recorded only when used: earlier plans' digests stay valid
    options.update(load_size_options(args))
    hidden = []
    pairs_by_split = sources.find_pairs(args.source, args.layout, args.split, hidden)
    if hidden:
        say(f"skipped {len(hidden)} hidden image files (a name or folder starting with '.', such "
            f"as macOS's ._x.jpg; first: {hidden[0]})")
    shards = plan_shards(pairs_by_split, options)
    plan = {"format_version": FORMAT_VERSION, "options": options,
            "shards": [{"name": s.name, "split": s.split, "digest": s.digest} for s in shards]}
    try:  # the plan is also the probe: an unwritable DEST fails here, before any work
        storage.makedirs(args.dest)
        drop_stale_manifest(args.dest, plan)
        _write_changed(storage.join(args.dest, PARTS, "plan.json"), _dumps(plan))
    except OSError as err:
        raise UserError(f"cannot write to {args.dest}: {err.strerror or err}") from None
    try:
        stats = pack(args.dest, in_slice(shards, args.slice), options, args.workers, not args.quiet)
        say_packed(args, pairs_by_split, len(shards), stats)
        if args.slice[1] > 1:
            say(f"slice {args.slice[0]}/{args.slice[1]} done; when all slices are, run: "
                f"shard.py merge {args.dest}")
            return 0
        manifest = merge(args.dest, strict=args.strict)
    except OSError as err:  # a full disk, a file-size limit: one line, what is kept
        raise RunError(write_failure(args.dest, shards, err)) from None
    report_rejected(manifest, args.dest)
    samples = sum(s.samples for s in manifest.splits.values())
    say(f"{samples} samples in {storage.join(args.dest, 'manifest.json')}")
    return 0


def say_packed(args: argparse.Namespace, pairs_by_split: dict, planned: int, stats: dict) -> None:
    counts = ", ".join(f"{split} {len(pairs)}" for split, pairs in pairs_by_split.items())
    mb = stats["bytes"] / 2**20
    if stats["packed"] == 0:
        say(f"{counts} pairs planned into {planned} shards; all "
            f"{stats['skipped']} {'of this slice ' if args.slice[1] > 1 else ''}were packed "
            f"already: nothing to do")
        return
    say(f"{counts} pairs planned into {planned} shards; this run packed "
        f"{stats['packed']} shards ({stats['pairs']} pairs, {mb:.1f} MB) with {stats['workers']} "
        f"process{'es' if stats['workers'] > 1 else ''} in {stats['seconds']:.1f} s = "
        f"{stats['pairs'] / max(stats['seconds'], 1e-9):.0f} pairs/s, "
        f"{mb / max(stats['seconds'], 1e-9):.1f} MB/s; {stats['skipped']} already done")


def write_failure(dest: str, shards: list[Shard], err: OSError) -> str:
    """The line for a write to DEST that failed mid-run: what failed, what is kept (every
    shard finished before; the one being written is removed, temporary files with it)."""
    try:
        kept = f"{sum(finished_part(dest, s) is not None for s in shards)} of {len(shards)}"
    except (OSError, ValueError):
        kept = "the"
    full = " (the disk or quota is full, or a file-size limit was reached)" \
        if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else ""
    return (f"writing to {dest} failed: {err.strerror or err}{full}; kept {kept} shards finished "
            "before it, no partial or temporary file left; make room and run the same command "
            "again: it packs only the rest")


def report_rejected(manifest: Manifest, dest: str) -> None:
    """What was rejected and why, and the shards a rejection left empty."""
    total = sum(manifest.rejected.values())
    if total:
        why = ", ".join(f"{reason} {n}" for reason, n in manifest.rejected.items())
        say(f"rejected {total} pairs ({why}); listed in "
              f"{storage.join(dest, 'rejected.jsonl')}")
    empty = [s.name for info in manifest.splits.values() for s in info.shards if s.samples == 0]
    if empty:
        say(f"{len(empty)} shards hold no sample, every pair planned for them was "
              f"rejected (first: {empty[0]}); the trainer skips them")


# ---------------------------------------------------------------------------------- CLI

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
    p.add_argument("--workers", type=workers_arg, default="auto",
                   help="packing processes; auto: every usable CPU when re-encoding "
                        "(--load-size, --resize, --split-pairs), else at most 8")
    p.add_argument("--slice", type=parse_slice, default="0/1", metavar="I/N",
                   help="pack only part I of N of the shard plan (then `merge`)")
    p.add_argument("--split-pairs", action="store_true",
                   help="store A|B images as separate re-encoded input/target members")
    p.add_argument("--resize", type=integer(0), default=0, metavar="PIXELS",
                   help="shrink each half so its longer side is at most this (0: never)")
    p.add_argument("--load-size", type=integer(0), default=0, metavar="N",
                   help="store each pair already resized by the trainer's own resize (both "
                        "halves alike): to N x N, or as --preprocess says; recorded in the "
                        "manifest: the trainer then needs data.load_size=N (and the same "
                        "data.preprocess) and decodes small images (high-resolution sources); "
                        "0: store the originals")
    p.add_argument("--preprocess", type=preprocess_arg, choices=RESIZES, default=RESIZES[0],
                   help="with --load-size: the trainer's data.preprocess mode whose resize is "
                        "stored: resize_and_crop squashes to N x N; scale_width and "
                        "scale_width_and_crop make the width N, scale_shortside_and_crop the "
                        "shorter side N, each keeping the aspect (crop and none resize "
                        "nothing: store the originals)")
    p.add_argument("--encode", choices=("png", "jpeg"), default="png",
                   help="format for re-encoded images (png is lossless)")
    p.add_argument("--jpeg-quality", type=integer(0, 100), default=95,
                   help="quality for --encode jpeg, 0 (worst) to 100")
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
        say("interrupted; finished shards are kept, run the same command again "
              "to resume")
        return 130


main = cli.entry_point("shard.py", _main)


if __name__ == "__main__":
    sys.exit(main())
