"""What each validation metric costs: seconds per 100 images (output + target pairs), on
this machine's device, through pipeline/realism.py and evaluate.per_image_metrics.

    python benchmarks/bench_metrics.py [--images 20] [--size 256] [--weights-dir DIR]

Without --weights-dir it writes substitute weights (tests/helpers/substitute_weights.py:
the real architectures, so the real cost) into a temp folder. FID and KID share one
Inception pass: `fid+kid` is their cost together (the targets' features once, as the
trainer's first validation; later validations reuse them and cost about half). The
generator's own forward is not counted.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.report import report  # noqa: E402
from pipeline import realism  # noqa: E402
from pipeline.evaluate import per_image_metrics  # noqa: E402
from tests.helpers.substitute_weights import generated_images, write  # noqa: E402


def seconds_per_100(fn, images: int) -> float:
    fn()  # warm-up: first-call allocations and kernel choices
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) / images * 100


def measure(names: list[str], root: str, targets: torch.Tensor, outputs: torch.Tensor,
            device: torch.device) -> float:
    keys = [f"k{i:05d}" for i in range(len(targets))]
    meter = realism.Realism(names, device, root)

    def once():
        meter.real_features.clear()
        meter.add(keys, outputs, targets)
        meter.result()
    return seconds_per_100(once, len(targets))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20, help="pairs per timing (default: 20)")
    parser.add_argument("--size", type=int, default=256, help="image side, pixels (default: 256)")
    parser.add_argument("--weights-dir", default="",
                        help="real weights (default: substitutes in a temp folder)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    targets = generated_images(args.images, args.size, seed=1)
    outputs = generated_images(args.images, args.size, seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.weights_dir or str(write(tmp))
        signed = lambda t: t.to(device).float() / 127.5 - 1
        rows = [{"metric": "l1+psnr+ssim", "s_per_100": seconds_per_100(
            lambda: per_image_metrics(signed(outputs), signed(targets)), args.images)}]
        rows += [{"metric": "+".join(names), "s_per_100": measure(names, root, targets, outputs, device)}
                 for names in (["fid", "kid"], ["lpips"])]
    report("bench_metrics", rows, {"images": args.images, "size": args.size, "device": str(device),
                                   "weights": args.weights_dir or "substitutes (the real architectures)"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
