"""Throughput of data_tools/shard.py: pairs/s and MB/s, local and S3, per --workers.

    python benchmarks/bench_shard.py [--source DIR] [--pairs 2000] [--size 256x256]
                                     [--content noise|photo] [--workers 1 2 auto]
                                     [--extra "" "--load-size 286 --encode jpeg"]
                                     [--repeat 3] [--s3-dest s3://bucket/prefix] [--json out.json]

Without --source it generates an aligned dataset in a temp folder: random-noise JPEGs
(the worst case for bytes per pixel) or, with --content photo, smooth scenes with grain
(~180 KB per 1200x600 JPEG, like photos). Each run is `shard.py` as a user runs it, a
fresh process packing into a fresh destination (a local temp folder, and --s3-dest,
credentials and AWS_ENDPOINT_URL from the environment, when given), once per --extra
option set (""; copy as is), --workers value and --repeat. A row gives the tool's own
pairs/s (what it prints: packing, process start-up included) best of the repeats and all
of them, the whole command's seconds and its CPU seconds (all processes). MB/s counts
source bytes read, the bytes a user cares about. The 1,096 1200x600 pairs of issue #37:

    python benchmarks/bench_shard.py --pairs 1096 --size 600x600 --content photo \\
        --workers 1 auto --extra "" "--load-size 286 --encode jpeg" --repeat 3
"""
import argparse
import io
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from report import report  # noqa: E402  benchmarks/ is on the path when run as a script

from data_tools.packing import usable_cpus  # noqa: E402
from pipeline import storage  # noqa: E402

SHARD_PY = [sys.executable, str(ROOT / "data_tools" / "shard.py")]


def make_dataset(root: str, pairs: int, size: tuple[int, int], content: str = "noise") -> None:
    width, height = size[0] * 2, size[1]  # one A|B image holds two halves
    if content == "photo":
        rng = np.random.default_rng(0)
        for i in range(pairs):  # smooth random scenes with grain (std 6 levels), q90
            coarse = rng.uniform(0, 255, (12, 24, 3)).astype(np.uint8)
            scene = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
            pixels = np.clip(scene + rng.normal(0, 6, scene.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, f"{i}.jpg"), quality=90)
        return
    rng = random.Random(0)
    noise = Image.frombytes("RGB", (width * 2, height * 2), rng.randbytes(width * height * 12))
    for i in range(pairs):  # crops of one noise image: distinct files, cheap to make
        x, y = rng.randrange(width), rng.randrange(height)
        buffer = io.BytesIO()
        noise.crop((x, y, x + width, y + height)).save(buffer, "JPEG", quality=90)
        with open(os.path.join(root, f"{i}.jpg"), "wb") as f:
            f.write(buffer.getvalue())


def upload(folder: str, url: str) -> None:
    for path in storage.list_files(folder):
        storage.put(path, storage.join(url, os.path.relpath(path, folder)))


def time_run(source: str, dest: str, workers: str, extra: list[str]) -> dict:
    """One shard.py process: its own pairs/s line, wall and CPU seconds (children too)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(SHARD_PY + [source, dest, "--workers", workers, "--quiet", *extra],
                            capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"bench_shard.py: shard.py failed ({result.returncode}): {result.stderr}")
    rate = re.search(r"= (\d+) pairs/s", result.stderr)
    processes = re.search(r"with (\d+) process", result.stderr)
    pairs = re.search(r"\((\d+) pairs,", result.stderr)
    return {"tool_pairs_per_s": int(rate.group(1)), "processes": processes and int(processes.group(1)),
            "pairs": int(pairs.group(1)), "command_s": seconds,
            "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)}


def cpu_flags() -> str:
    """The CPU features the project's figures name (bf16 and AMX matter to the trainer)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags) or "none"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="an existing SOURCE; default: generate one")
    parser.add_argument("--pairs", type=int, default=2000, help="pairs to generate")
    parser.add_argument("--size", default="256x256", help="generated half size WxH")
    parser.add_argument("--content", choices=("noise", "photo"), default="noise",
                        help="generated images: random noise, or photo-like scenes")
    parser.add_argument("--workers", nargs="+", default=["1", "2"], help="ints or auto")
    parser.add_argument("--s3-dest", help="also pack to s3://bucket/prefix (a fresh "
                        "sub-prefix per run)")
    parser.add_argument("--extra", nargs="+", default=[""],
                        help="shard.py option sets, one row each, e.g. '' '--load-size 286'")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row (best counts)")
    parser.add_argument("--json", help="also write the JSON record here")
    args = parser.parse_args(argv)

    scratch = tempfile.mkdtemp(prefix="bench_shard_")
    load_before = os.getloadavg()
    try:
        source = args.source
        if source is None:
            source = os.path.join(scratch, "src")
            os.makedirs(source)
            width, height = (int(v) for v in args.size.split("x"))
            make_dataset(source, args.pairs, (width, height), args.content)
        source_bytes = sum(storage.list_sizes(source).values())
        s3_source = None
        if args.s3_dest:  # the same source on S3, to time reading from it too
            s3_source = storage.join(args.s3_dest, f"src-{uuid.uuid4().hex[:8]}")
            upload(source, s3_source)
        rows = []
        for extra in args.extra:
            for workers in args.workers:
                pairs = [(source, "local")]
                if args.s3_dest:
                    pairs += [(source, "s3"), (s3_source, "local")]
                for src, dest_kind in pairs:
                    runs = []
                    for _ in range(args.repeat):
                        dest = storage.join(args.s3_dest, f"bench-{uuid.uuid4().hex[:8]}") \
                            if dest_kind == "s3" else os.path.join(scratch, f"out-{uuid.uuid4().hex[:8]}")
                        runs.append(time_run(src, dest, workers, extra.split()))
                        if dest_kind == "local":
                            shutil.rmtree(dest, ignore_errors=True)
                    best = max(runs, key=lambda r: r["tool_pairs_per_s"])
                    rows.append({
                        "options": extra or "(copy)", "workers": workers,
                        "processes": best["processes"],
                        "source": "s3" if storage.is_s3(src) else "local", "dest": dest_kind,
                        "pairs": best["pairs"], "pairs_per_s": best["tool_pairs_per_s"],
                        "all_pairs_per_s": "/".join(str(r["tool_pairs_per_s"]) for r in runs),
                        "command_s": round(min(r["command_s"] for r in runs), 2),
                        "cpu_s": round(min(r["cpu_s"] for r in runs), 2),
                        "source_mb_per_s": round(source_bytes / 2**20 * best["tool_pairs_per_s"]
                                                 / best["pairs"], 1)})
                    print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    figures = {"source": args.source or f"generated {args.pairs} pairs of {args.size}|{args.size} "
               f"{args.content} JPEG", "source_mb": round(source_bytes / 2**20, 1),
               "usable_cpus": usable_cpus(), "cpu_flags": cpu_flags(),
               "load_average_before_after": f"{load_before[0]:.2f} / {os.getloadavg()[0]:.2f}"}
    record = report("bench_shard", rows, figures)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
