"""What one validation image costs at each recipe's size: seconds per image of the
trainer's evaluation (pipeline/evaluate.py: one forward per image, train mode, seeded
dropout, then L1/PSNR/SSIM), on this machine's device, fp32 and bf16 where the hardware
computes it. Multiply by eval.max_images (default 200) for one validation on one process;
N processes share the images.

    python benchmarks/bench_eval.py [--images 4] [--configs configs/demo.yaml ...]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.report import report  # noqa: E402
from pipeline import precision  # noqa: E402
from pipeline.config import load_yaml  # noqa: E402
from pipeline.evaluate import evaluate  # noqa: E402
from pipeline.models import build_generator  # noqa: E402

RECIPES = ("configs/demo.yaml", "configs/custom.yaml", "configs/hd_512.yaml", "configs/hd_1024.yaml")


def seconds_per_image(config: str, images: int, bf16: bool, device: torch.device) -> float:
    cfg = load_yaml(config)
    generator = build_generator(cfg.model).to(device).train()
    size, model = cfg.data.crop_size, cfg.model
    x = torch.rand(images, model.in_channels, size, size, device=device) * 2 - 1
    y = torch.rand(images, model.out_channels, size, size, device=device) * 2 - 1
    batches = [(x[i:i + 1], y[i:i + 1], [f"k{i}"]) for i in range(images)]
    autocast = (lambda: torch.autocast(device.type, torch.bfloat16)) if bf16 else contextlib.nullcontext
    evaluate(generator, batches[:1], device, autocast)  # warm-up: allocations, kernel choices
    start = time.perf_counter()
    evaluate(generator, batches, device, autocast)
    return (time.perf_counter() - start) / images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4, help="images per timing (default: 4)")
    parser.add_argument("--configs", nargs="+", default=list(RECIPES), help="recipes to time")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kinds = [False, True] if precision.native_bf16(device.type) else [False]
    rows = []
    for config in args.configs:
        cfg = load_yaml(config)
        for bf16 in kinds:
            seconds = seconds_per_image(config, args.images, bf16, device)
            rows.append({"config": config, "generator": cfg.model.generator, "size": cfg.data.crop_size,
                         "precision": "bf16" if bf16 else "fp32", "s_per_image": round(seconds, 4),
                         "s_per_200": round(200 * seconds, 1)})
    report("bench_eval", rows, {"images": args.images, "device": str(device)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
