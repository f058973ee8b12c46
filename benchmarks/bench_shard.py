"""Throughput of data_tools/shard.py: pairs/s and MB/s, local and S3, per --workers.

    python benchmarks/bench_shard.py [--source DIR] [--pairs 2000] [--size 256x256]
                                     [--workers 1 2] [--s3-dest s3://bucket/prefix]
                                     [--json out.json]

Without --source it generates an aligned dataset of random-noise JPEGs (the worst case
for bytes per pixel) in a temp folder. Each run packs into a fresh destination: a local
temp folder, and --s3-dest (credentials and AWS_ENDPOINT_URL from the environment) when
given. MB/s counts source bytes read, the bytes a user cares about. Prints one JSON object.
"""
import argparse
import io
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import uuid

from PIL import Image

from data_tools import shard
from pipeline import storage
from pipeline.data.format import Manifest


def make_dataset(root: str, pairs: int, size: tuple[int, int]) -> None:
    rng = random.Random(0)
    width, height = size[0] * 2, size[1]  # one A|B image holds two halves
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


def time_run(source: str, dest: str, workers: int, extra: list[str]) -> dict:
    start = time.perf_counter()
    code = shard.main([source, dest, "--workers", str(workers), "--quiet"] + extra)
    seconds = time.perf_counter() - start
    manifest = Manifest.read(dest)
    pairs = sum(s.samples for s in manifest.splits.values())
    kind = lambda url: "s3" if storage.is_s3(url) else "local"
    return {"source": kind(source), "dest": kind(dest), "workers": workers,
            "exit_code": code, "pairs": pairs, "seconds": round(seconds, 3),
            "pairs_per_s": round(pairs / seconds, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="an existing SOURCE; default: generate one")
    parser.add_argument("--pairs", type=int, default=2000, help="pairs to generate")
    parser.add_argument("--size", default="256x256", help="generated half size WxH")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--s3-dest", help="also pack to s3://bucket/prefix (a fresh "
                        "sub-prefix per run)")
    parser.add_argument("--extra", default="", help="more shard.py options, e.g. '--verify'")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)

    scratch = tempfile.mkdtemp(prefix="bench_shard_")
    try:
        source = args.source
        if source is None:
            source = os.path.join(scratch, "src")
            os.makedirs(source)
            width, height = (int(v) for v in args.size.split("x"))
            make_dataset(source, args.pairs, (width, height))
        source_bytes = sum(storage.list_sizes(source).values())
        s3_source = None
        if args.s3_dest:  # the same source on S3, to time reading from it too
            s3_source = storage.join(args.s3_dest, f"src-{uuid.uuid4().hex[:8]}")
            upload(source, s3_source)
        runs = []
        for workers in args.workers:
            pairs = [(source, os.path.join(scratch, f"out-{workers}"))]
            if args.s3_dest:
                fresh = storage.join(args.s3_dest, f"bench-{uuid.uuid4().hex[:8]}")
                pairs += [(source, fresh), (s3_source, os.path.join(scratch, f"from-s3-{workers}"))]
            for src, dest in pairs:
                run = time_run(src, dest, workers, args.extra.split())
                run["source_mb_per_s"] = round(source_bytes / 2**20 / run["seconds"], 1)
                runs.append(run)
                print(json.dumps(run), file=sys.stderr)
        result = {"benchmark": "shard", "source": args.source or f"generated {args.pairs} "
                  f"pairs of {args.size}|{args.size} JPEG", "source_mb": round(source_bytes / 2**20, 1),
                  "extra_options": args.extra, "cpu_count": os.cpu_count(),
                  "machine": platform.machine(), "python": platform.python_version(), "runs": runs}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
