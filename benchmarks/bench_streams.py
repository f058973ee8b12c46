"""The training stream's start-up cost and buffer memory against the dataset size.

    python benchmarks/bench_streams.py --samples 100000 1000000 --streams 12
    python benchmarks/bench_streams.py --local --boundary --samples 2400 --shard-samples 200 --batch 16

Writes shards of small synthetic pairs (two 8x8 PNGs a sample, --shard-samples a shard),
puts them on a moto S3 server on loopback (--local: a local folder), then for each size
starts one process's training stream (one reader: all V streams in this process,
num_workers=0) and measures:
  list_s        list_shards: the manifest read
  first_batch_s the first batch (its streams open their shards and skip, undecoded, to
                where their ranges start: up to one shard each)
  all_streams_s until every stream has given a sample (V samples)
  steady_sps    samples/s over the next --steps batches
  buffer_mb     resident memory the stream added after listing (RSS after minus
                before): V x shuffle_buffer encoded samples, plus each stream's open
                shard (its storage read buffer)
With --tail, the same dataset with one shard unreadable (a cut tar: its stream runs dry
a shard early) is read for a whole epoch, and the row says:
  handed_out    the epoch's samples handed out, of `good` (fewer than one batch short)
  before_sps    samples/s before the dry stream, tail_sps in the epoch's tail (read a
                round of streams at a time by the loader workers; here num_workers=0)
  tail_samples  how many the tail held; tail_mb the resident memory it added (its
                read-ahead and one update: not the tail's size)
With --boundary, only the epoch boundaries: --epochs epochs of the dataset read by a
null model (no network: --step-ms of sleep an update, 0 included) with each of
--workers loader workers, and the row says:
  update_wait_ms  the median wait for an update inside an epoch
  first_update_s  the wait for the run's first update (workers forked, streams opened)
  boundary_wait_s the mean wait for the first update of each later epoch
  lost_per_boundary_s  that, less an ordinary update's wait: the seconds each epoch
                boundary costs the trainer
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from report import report  # noqa: E402  benchmarks/ is on the path when run as a script

from pipeline import data  # noqa: E402
from pipeline.config import DataConfig  # noqa: E402


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def write_shards(folder: Path, samples: int, per_shard: int) -> None:
    folder.mkdir(parents=True)
    images = [png(0), png(1)]
    shards = []
    for number, first in enumerate(range(0, samples, per_shard)):
        name = f"train-{number:06d}.tar"
        count = min(per_shard, samples - first)
        with tarfile.open(folder / name, "w") as tar:
            for i in range(first, first + count):
                for kind, payload in zip(("input", "target"), images):
                    info = tarfile.TarInfo(f"k{i:08d}.{kind}.png")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        shards.append({"name": name, "samples": count, "bytes": (folder / name).stat().st_size})
    manifest = {"format_version": 1, "options": {}, "splits": {"train": {
        "samples": samples, "bytes": sum(s["bytes"] for s in shards), "shards": shards}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def upload(folder: Path, bucket: str, prefix: str) -> str:
    import boto3
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    for path in sorted(folder.iterdir()):
        client.upload_file(str(path), bucket.removeprefix("s3://"), f"{prefix}/{path.name}")
    return f"{bucket}/{prefix}"


def cut_one_shard(folder: Path) -> int:
    """Makes the first shard unreadable (a tar cut after its first header); returns its
    sample count."""
    manifest = json.loads((folder / "manifest.json").read_text())
    first = manifest["splits"]["train"]["shards"][0]
    path = folder / first["name"]
    path.write_bytes(path.read_bytes()[:700])
    return first["samples"]


def measure_tail(url: str, samples: int, lost: int, args) -> dict:
    cfg = DataConfig(train=url, batch_size=args.batch, num_workers=0, streams=args.streams,
                     shuffle_buffer=args.shuffle_buffer, load_size=8, crop_size=8, flip=False)
    loader = data.TrainLoader(cfg, data.list_shards(url, "train"), rank=0, world_size=1, seed=0,
                              in_channels=3, out_channels=3, have_batch_all_ranks=None)
    handed, start, times = 0, time.perf_counter(), {}
    while loader.epoch == 0:
        update = next(loader)
        if update.epoch != 0:
            break
        if loader.in_tail and "tail" not in times:
            times["tail"], at, before = time.perf_counter(), handed, rss_mb()
        handed += sum(len(batch["key"]) for batch in update.batches)
    end = time.perf_counter()
    return {"samples": samples, "good": samples - lost, "handed_out": handed,
            "before_sps": round(at / (times["tail"] - start), 1), "tail_samples": handed - at,
            "tail_sps": round((handed - at) / (end - times["tail"]), 1),
            "tail_mb": round(rss_mb() - before, 1)}


def measure_boundary(url: str, samples: int, args) -> dict:
    """Seconds the trainer waits for the first update of an epoch, beyond an ordinary
    update's wait, with a null model (args.step_ms of sleep an update, no compute)."""
    cfg = DataConfig(train=url, batch_size=args.batch, num_workers=args.workers, streams=args.streams,
                     shuffle_buffer=args.shuffle_buffer, load_size=8, crop_size=8, flip=False)
    loader = data.TrainLoader(cfg, data.list_shards(url, "train"), rank=0, world_size=1, seed=0,
                              in_channels=3, out_channels=3, have_batch_all_ranks=None)
    waits = []  # (epoch of the update, seconds waited for it)
    for _ in range(args.epochs * loader.steps_per_epoch + 1):
        start = time.perf_counter()
        epoch = next(loader).epoch
        waits.append((epoch, time.perf_counter() - start))
        time.sleep(args.step_ms / 1000)
    firsts = [w for i, (e, w) in enumerate(waits) if i and e != waits[i - 1][0]]
    steady = sorted(w for i, (e, w) in enumerate(waits) if i and e == waits[i - 1][0])
    median = steady[len(steady) // 2]
    return {"samples": samples, "workers": args.workers, "step_ms": args.step_ms,
            "steps_per_epoch": loader.steps_per_epoch, "boundaries": len(firsts),
            "first_update_s": round(waits[0][1], 3), "update_wait_ms": round(median * 1000, 2),
            "boundary_wait_s": round(sum(firsts) / len(firsts), 3),
            "lost_per_boundary_s": round(sum(firsts) / len(firsts) - median, 3)}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(url: str, samples: int, args) -> dict:
    cfg = DataConfig(train=url, batch_size=args.batch, num_workers=0, streams=args.streams,
                     shuffle_buffer=args.shuffle_buffer, load_size=8, crop_size=8, flip=False)
    start = time.perf_counter()
    shards = data.list_shards(url, "train")
    listed, before = time.perf_counter(), rss_mb()  # the S3 client is loaded by now
    loader = data.TrainLoader(cfg, shards, rank=0, world_size=1, seed=0, in_channels=3,
                              out_channels=3, have_batch_all_ranks=None)
    next(loader)
    first = time.perf_counter()
    for _ in range(-(-args.streams // args.batch) - 1):
        next(loader)
    every = time.perf_counter()
    for _ in range(args.steps):
        next(loader)
    end = time.perf_counter()
    return {"samples": samples, "shards": len(shards), "streams": args.streams,
            "list_s": round(listed - start, 3), "first_batch_s": round(first - listed, 3),
            "all_streams_s": round(every - listed, 3),
            "steady_sps": round(args.steps * args.batch / (end - every), 1),
            "buffer_mb": round(rss_mb() - before, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def boundary_rows(url: str, samples: int, source: str, args) -> list[dict]:
    return [{"source": source, **measure_boundary(url, samples, argparse.Namespace(
        **{**vars(args), "workers": workers, "step_ms": step_ms}))}
        for workers in args.workers for step_ms in args.step_ms]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--shard-samples", type=int, default=10_000)
    parser.add_argument("--streams", type=int, default=12)
    parser.add_argument("--shuffle-buffer", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--local", action="store_true", help="read a local folder, not S3")
    parser.add_argument("--tail", action="store_true", help="also read an epoch with one shard cut")
    parser.add_argument("--boundary", action="store_true",
                        help="only the seconds lost per epoch boundary, with a null model")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="--boundary's num_workers")
    parser.add_argument("--epochs", type=int, default=4, help="--boundary's epochs")
    parser.add_argument("--step-ms", type=float, nargs="+", default=[0.0, 20.0],
                        help="--boundary: the null model's milliseconds an update")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows, server = [], None
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as scratch:
        if not args.local:
            from bench_data import start_moto
            server, bucket = start_moto()
        try:
            for samples in args.samples:
                folder = Path(scratch) / f"n{samples}"
                t = time.perf_counter()
                write_shards(folder, samples, args.shard_samples)
                url = str(folder) if args.local else upload(folder, bucket, f"n{samples}")
                print(f"{samples} samples written in {time.perf_counter() - t:.0f} s", file=sys.stderr)
                source = "local" if args.local else "s3 (moto, loopback)"
                if args.boundary:
                    rows += boundary_rows(url, samples, source, args)
                    continue
                rows.append({"source": source, **measure(url, samples, args)})
                if args.tail:
                    lost = cut_one_shard(folder)
                    url = str(folder) if args.local else upload(folder, bucket, f"n{samples}-cut")
                    rows.append({"source": source, "case": "one shard cut",
                                 **measure_tail(url, samples, lost, args)})
        finally:
            if server is not None:
                server.terminate()
    report("streams", rows, {"shuffle_buffer": args.shuffle_buffer, "batch": args.batch,
                             "shard_samples": args.shard_samples})
    return 0


if __name__ == "__main__":
    sys.exit(main())
