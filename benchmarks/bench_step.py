"""Time pix2pix GAN steps (D update + G update) from pipeline/gan.py on random data,
fp32 against bf16 autocast, on the CPU or the first GPU.

    python benchmarks/bench_step.py --generator unet_256 --size 256 --batch 1 --steps 5
"""
from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from report import report  # benchmarks/ is on the path when run as a script
from pipeline.gan import StepHooks, train_step
from pipeline.losses import Pix2PixObjective
from pipeline.models import PatchDiscriminator, init_weights, unet


def time_steps(precision: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    G = init_weights(unet(args.generator)).to(device)
    D = init_weights(PatchDiscriminator(6)).to(device)
    opt_G = torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_D = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999))
    x = torch.rand(args.batch, 3, args.size, args.size, device=device) * 2 - 1
    y = x.flip(-1)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    hooks = StepHooks(autocast=autocast)
    for _ in range(args.warmup):
        train_step(G, D, opt_G, opt_D, x, y, Pix2PixObjective(), hooks)
    start = time.perf_counter()
    for _ in range(args.steps):
        losses = train_step(G, D, opt_G, opt_D, x, y, Pix2PixObjective(), hooks)
    seconds = (time.perf_counter() - start) / args.steps  # train_step syncs on its losses
    return {"precision": precision, "batch": args.batch, "s_per_step": seconds,
            "samples_per_s": args.batch / seconds, "loss_G_l1": losses["loss_G_l1"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--generator", default="unet_256", choices=["unet_128", "unet_256", "unet_512"])
    parser.add_argument("--size", type=int, default=256, help="crop size")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # an honest fp32 baseline: no TF32 convolutions
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    rows = [time_steps(precision, args, device) for precision in ("fp32", "bf16")]
    speedup = rows[0]["s_per_step"] / rows[1]["s_per_step"]
    return report("bench_step", rows, {"device": device.type, "bf16_speedup": speedup,
                                       "generator": args.generator, "size": args.size})


if __name__ == "__main__":
    main()
