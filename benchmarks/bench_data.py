"""Input pipeline throughput per CPU core, against a naive per-file PIL loader.

    python benchmarks/bench_data.py --pairs 400 --size 256
    python benchmarks/bench_data.py --pairs 100 --pair-size 1200x600 --pre-resize png jpeg  # maps

Makes an aligned A|B JPEG folder (the reference pix2pix layout), packs it with
data_tools/shard.py (and with --pre-resize once more with `shard.py --load-size`, each
pair stored already resized to the load size), then measures on one thread
(torch.set_num_threads(1)), as pairs per CPU-second (process time: the honest per-core
figure on a shared machine):
  jpeg_*       the JPEG decoder alone on the same bytes: PIL against simplejpeg
  naive        PIL open + split + bicubic resize to load_size + crop + flip + to tensor,
               one file at a time (the reference's aligned dataset)
  decode       shard read + decode of both halves (no augmentation)
  worker       the training loader, augment_on=worker (decode + resize + crop + flip)
  device       the training loader, augment_on=device, plus to_device on the CPU
               (the batched resize/crop/flip counted as CPU time too)
  *_s3         the same from a moto S3 server on loopback (its own process: not counted)
  read_only    tar streaming without decoding, local and S3: S3 CPU-s per GB read
  *_preresized_{png,jpeg}  decode, worker and device from the pre-resized shards
Then one train step (pipeline.gan, fp32, batch 1, all cores) for the keeps-up ratio, and
the step's demand at the GPU target (unet_256 at the crop size, `--target-mfu` of a
`--gpu-tflops` bf16 peak): pairs/s per GPU, and the loader cores per GPU that feed it.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from report import report  # noqa: E402  benchmarks/ is on the path when run as a script

from pipeline import data, storage  # noqa: E402
from pipeline.config import DataConfig  # noqa: E402
from pipeline.distributed import free_port  # noqa: E402


def make_source(folder: Path, pairs: int, width: int, height: int, grain: float) -> None:
    """width x height A|B JPEGs (q 90) of smooth random scenes with grain (std `grain`
    levels): grain 8 gives ~42 KB per 512x256 pair, like photos; JPEG decode time grows
    with it."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(pairs):
        coarse = rng.uniform(0, 255, (8, 16, 3)).astype(np.uint8)
        scene = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
        noise = rng.normal(0, grain, scene.shape)
        Image.fromarray(np.clip(scene + noise, 0, 255).astype(np.uint8)).save(
            folder / f"{i:05d}.jpg", quality=90)


def naive_pair(path: Path, load: int, crop: int, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's aligned loader without torchvision: PIL all the way."""
    ab = Image.open(path).convert("RGB")
    w, h = ab.size
    halves = [ab.crop((0, 0, w // 2, h)), ab.crop((w // 2, 0, w, h))]
    top, left = rng.integers(0, load - crop + 1, size=2)
    flip = rng.random() < 0.5
    out = []
    for im in halves:
        im = im.resize((load, load), Image.BICUBIC).crop((left, top, left + crop, top + crop))
        im = im.transpose(Image.FLIP_LEFT_RIGHT) if flip else im
        out.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div(127.5).sub(1))
    return out[0], out[1]


def timed(fn) -> dict:
    """Run fn() -> pairs; wall and CPU seconds of this process."""
    cpu, wall = time.process_time(), time.perf_counter()
    pairs = fn()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"pairs": pairs, "wall_s": wall, "cpu_s": cpu, "pairs_per_cpu_s": pairs / cpu,
            "pairs_per_s": pairs / wall}


def run_naive(source: Path, cfg: DataConfig) -> int:
    rng = np.random.default_rng(0)
    files = sorted(source.glob("*.jpg"))
    for path in files:
        naive_pair(path, cfg.load_size, cfg.crop_size, rng)
    return len(files)


def run_decode(cfg: DataConfig) -> int:
    pairs = 0
    for record in data.read_entries(data.list_shards(cfg.train, cfg.train_split)):
        if isinstance(record, data.Entry):
            data.decode_sample(record.parts, cfg, 3, 3)
            pairs += 1
    return pairs


def run_jpeg(source: Path, library: str) -> int:
    """Decode every A|B JPEG from memory: the decoder alone (pipeline/data/decode.py keeps the faster)."""
    import io

    import simplejpeg
    blobs = [path.read_bytes() for path in sorted(source.glob("*.jpg"))]
    for blob in blobs:
        if library == "simplejpeg":
            simplejpeg.decode_jpeg(blob, colorspace="RGB")
        else:
            np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    return len(blobs)


def run_read_only(cfg: DataConfig) -> int:
    shards = data.list_shards(cfg.train, cfg.train_split)
    return sum(1 for _ in data.read_entries(shards))


def run_loader(cfg: DataConfig, device: str = "cpu") -> int:
    loader = data.make_train_loader(cfg, rank=0, world_size=1, seed=0, in_channels=3,
                                    out_channels=3)
    pairs = 0
    for _ in range(loader.steps_per_epoch):
        for batch in next(loader).batches:
            x, y = data.to_device(batch, device, cfg=cfg, channels_last=False)
            pairs += len(x)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return pairs


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    storage.clear_cache()
    import boto3
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for _ in range(100):
        try:
            client.create_bucket(Bucket="bench")
            return server, "s3://bench"
        except Exception:  # noqa: BLE001 - any failure to reach it means: not ready yet
            time.sleep(0.1)
    raise RuntimeError("moto server did not start")


def train_step_seconds(steps: int, size: int) -> float:
    import bench_train
    torch.set_num_threads(os.cpu_count())
    seconds = bench_train.measure("fp32", 1, f"unet_{size}", size, steps, warmup=1)["s_per_step"]
    torch.set_num_threads(1)
    return seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--size", type=int, default=256, help="crop size")
    parser.add_argument("--pair-size", type=pair_size, default=None, metavar="WxH",
                        help="synthetic A|B JPEG size, e.g. 1200x600 (default: halves of the "
                             "crop size, 2*size x size)")
    parser.add_argument("--load-size", type=int, default=None,
                        help="resize before cropping (default: size x 286/256, the reference's)")
    parser.add_argument("--pre-resize", nargs="*", choices=("png", "jpeg"), default=None,
                        help="also measure shards stored at the load size (shard.py --load-size), "
                             "re-encoded in these formats (none named: both)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--grain", type=float, default=8.0, help="image noise (std levels)")
    parser.add_argument("--source", help="an existing aligned A|B JPEG folder to measure instead "
                                         "(e.g. datasets/facades; its train/ split is used)")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 measurements")
    parser.add_argument("--device", default="cpu",
                        help="where the `device` path resizes, crops and flips (cpu, cuda)")
    parser.add_argument("--step-steps", type=int, default=2, help="train steps timed (0: skip)")
    parser.add_argument("--gpu-tflops", type=float, default=790.0,
                        help="bf16 peak of the GPU to feed (H200 measured by a matmul: ~790)")
    parser.add_argument("--target-mfu", type=float, default=0.4, help="the step's MFU target there")
    args = parser.parse_args(argv)
    args.pair_size = args.pair_size or (2 * args.size, args.size)
    args.load_size = args.load_size or round(args.size * 286 / 256)
    if args.pre_resize is not None:  # named twice: measured once
        args.pre_resize = list(dict.fromkeys(args.pre_resize or ["png", "jpeg"]))
    args.pre_resize = args.pre_resize or []
    return args


def pair_size(text: str) -> tuple[int, int]:
    """`1200x600` -> (1200, 600): an A|B image, two halves side by side."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 1200x600") from None
    return width, height


def pack(source: Path, shards: Path, load_size: int | None = None, encode: str = "png") -> None:
    resize = ["--load-size", str(load_size), "--encode", encode] if load_size else []
    subprocess.run([sys.executable, "data_tools/shard.py", str(source), str(shards),
                    "--min-shards", "4", "--workers", "1", "--quiet", *resize], cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    source = Path(args.source) if args.source else work / "source"
    if not args.source:
        make_source(source, args.pairs, *args.pair_size, args.grain)
    pack(source, work / "shards")
    if (source / "train").is_dir():
        source = source / "train"  # the split the shards' "train" holds
    cfg = DataConfig(train=str(work / "shards"), load_size=args.load_size,
                     crop_size=args.size, batch_size=args.batch, num_workers=0,
                     shuffle_buffer=64)
    shard_bytes = sum(s.stat().st_size for s in (work / "shards").glob("*.tar"))
    runs = {"jpeg_pil": lambda: run_jpeg(source, "pil"),
            "jpeg_simplejpeg": lambda: run_jpeg(source, "simplejpeg"),
            "naive": lambda: run_naive(source, cfg),
            **loader_runs(cfg, args.device),
            "read_only": lambda: run_read_only(cfg)}
    for encode in args.pre_resize:  # PNG: shard.py's lossless default; JPEG q95: decodes faster
        shards = work / f"preresized_{encode}"
        pack(Path(args.source) if args.source else source, shards, args.load_size, encode)
        runs.update(loader_runs(replace(cfg, train=str(shards)), args.device, f"_preresized_{encode}"))
    server = None
    if not args.no_s3:
        server, bucket = start_moto()
        for path in sorted((work / "shards").glob("*")):
            if path.is_file():
                storage.put(str(path), f"{bucket}/shards/{path.name}")
        s3 = replace(cfg, train=f"{bucket}/shards")
        runs.update({"read_only_s3": lambda: run_read_only(s3),
                     "worker_s3": lambda: run_loader(s3)})
    rows = []
    try:
        run_decode(cfg)  # warm the page cache and imports
        for name, fn in runs.items():
            rows.append({"path": name, **timed(fn)})
    finally:
        if server:
            server.terminate()
    figures = summarise({row["path"]: row for row in rows}, shard_bytes, args)
    return report("bench_data", rows, figures)


def loader_runs(cfg: DataConfig, device: str, suffix: str = "") -> dict:
    """decode, worker and device paths over cfg's shards."""
    return {f"decode{suffix}": lambda: run_decode(cfg),
            f"worker{suffix}": lambda: run_loader(cfg),
            f"device{suffix}": lambda: run_loader(replace(cfg, augment_on="device"), device)}


def summarise(by: dict[str, dict], shard_bytes: int, args: argparse.Namespace) -> dict:
    """The figures docs/performance.md quotes, from the rows by path."""
    figures = {"simplejpeg_vs_pil": by["jpeg_simplejpeg"]["pairs_per_cpu_s"] /
               by["jpeg_pil"]["pairs_per_cpu_s"],
               "decode_pairs_per_core_s": by["decode"]["pairs_per_cpu_s"],
               "worker_pairs_per_core_s": by["worker"]["pairs_per_cpu_s"],
               "device_pairs_per_core_s": by["device"]["pairs_per_cpu_s"],
               "naive_pairs_per_core_s": by["naive"]["pairs_per_cpu_s"],
               "full_vs_naive": max(by["worker"]["pairs_per_cpu_s"],
                                    by["device"]["pairs_per_cpu_s"]) / by["naive"]["pairs_per_cpu_s"],
               "shard_MB": shard_bytes / 2**20,
               "images": args.source or f"synthetic {args.pair_size[0]}x{args.pair_size[1]} A|B, "
                                        f"grain {args.grain}",
               "load_crop": f"{args.load_size}/{args.size}"}
    if "read_only_s3" in by:
        gb = shard_bytes / 2**30
        figures["local_read_cpu_s_per_GB"] = by["read_only"]["cpu_s"] / gb
        figures["s3_read_cpu_s_per_GB"] = by["read_only_s3"]["cpu_s"] / gb
        figures["s3_overhead_cpu_s_per_GB"] = (by["read_only_s3"]["cpu_s"] - by["read_only"]["cpu_s"]) / gb
    if args.step_steps:
        step = train_step_seconds(args.step_steps, args.size)
        figures["train_step_s_batch1_all_cores"] = step
        # one loader core's pairs/s over the pairs/s one (all-core) train step consumes
        figures["loader_core_vs_step"] = by["worker"]["pairs_per_cpu_s"] * step
    figures.update(gpu_demand(by, args))
    return figures


def gpu_demand(by: dict[str, dict], args: argparse.Namespace) -> dict:
    """Pairs/s one GPU's step eats at the target MFU, and the loader cores that feed it
    per path (their pairs per CPU-second against that demand)."""
    import bench_train

    from pipeline.models import UNET_DOWNS
    if args.size % 2 ** UNET_DOWNS["unet_256"]:
        return {}  # below unet_256's smallest crop (tiny dry runs)
    flops = bench_train.flops_per_sample("unet_256", args.size)
    demand = args.target_mfu * args.gpu_tflops * 1e12 / flops
    paths = [p for p in by if p.startswith(("worker", "device")) and not p.endswith("_s3")]
    return {"gpu_demand_pairs_per_s": demand,
            **{f"cores_per_gpu_{p}": demand / by[p]["pairs_per_cpu_s"] for p in paths}}


if __name__ == "__main__":
    main()
