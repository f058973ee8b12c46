"""Peak memory per rank of real GAN steps under DDP, ZeRO-1 and ZeRO-2 (bf16), with and
without activation checkpointing, 2 processes, through the trainer's own engines.

    python benchmarks/bench_memory.py                      # every variant, a table + JSON
    python benchmarks/bench_memory.py --models unet_256@512 --batch 4 --engines ddp zero2
    python benchmarks/bench_memory.py --recipe configs/hd_512.yaml --models resnet_9blocks@512 \
        --engines ddp zero2 --precision no     # the HD recipe; fp32 on CPUs without bf16
    python benchmarks/bench_memory.py --recipe configs/hd_global_1024x512.yaml \
        --models global@1024x512 --engines ddp --act-ckpt off   # a non-square size

Each variant is its own `accelerate launch` (peak memory never goes down in a process):
the DDP ones with launch/accelerate/cpu_2proc.yaml, the ZeRO ones with
launch/accelerate/deepspeed_zero{1,2}.yaml. A rank reports its peak resident memory
(CPU: ru_maxrss; CUDA: max_memory_allocated) and the part above what it held before the
models were built ("training"), i.e. weights, gradients, optimiser states, activations.
--recipe starts from a config file (the HD recipes: multiscale D, feature matching, EMA)
instead of the defaults; its objective is the trainer's own (train.make_objective). A
model's size is WxH, width first as the manifest writes sizes (global@1024x512: 1024 wide,
512 high), or N for N x N.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

from estimate_memory import size_arg
from report import report  # benchmarks/ is on the path when run as a script

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = {"ddp": "cpu_2proc.yaml", "zero1": "deepspeed_zero1.yaml", "zero2": "deepspeed_zero2.yaml"}
MARK = "bench_memory rank:"


def peak_mb() -> float:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(args) -> None:
    """One rank: the trainer's engines, `steps` GAN steps on random data, then report."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from pipeline import host_memory
    from pipeline.config import from_cli
    from pipeline.distributed import launched_with_deepspeed
    from pipeline.engines import make_engines
    from pipeline.gan import train_step
    from pipeline.train import make_objective

    group = {"backend": "gloo"} if launched_with_deepspeed() and not torch.cuda.is_available() else {}
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(**group)])
    cfg, _ = from_cli(["--config", args.recipe] if args.recipe else [])
    (h, w), cfg.model.generator = args.crop, args.generator
    cfg.data.crop_size, cfg.data.crop_height = w, h if h != w else 0
    cfg.model.activation_checkpointing = args.checkpointing
    host_memory.apply(cfg, accelerator.device.type)  # the trainer's process
    before = peak_mb()
    engines = make_engines(cfg, accelerator)
    x = torch.rand(args.batch, 3, h, w, device=accelerator.device) * 2 - 1
    objective = make_objective(cfg, accelerator.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(engines.G, engines.D, engines.opt_G, engines.opt_D, x, x.flip(-1), objective,
                   engines.hooks)
        engines.update_ema()
    seconds = (time.perf_counter() - start) / args.steps
    peak = peak_mb()
    print(MARK, json.dumps({"rank": accelerator.process_index, "peak_mb": round(peak),
                            "training_mb": round(peak - before), "s_per_step": round(seconds, 2)}),
          flush=True)
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()
    os._exit(0)  # gloo may abort at interpreter exit (pytorch issue 190489)


def variant(kind: str, model: str, checkpointing: bool, args) -> dict:
    """One `accelerate launch` of 2 ranks for `model` (GENERATOR@SIZE) under `kind`."""
    generator, crop = model.split("@")
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    env.pop("ACCELERATE_USE_CPU", None)  # it would silently drop DeepSpeed
    if kind == "ddp" and not _cuda():
        env["ACCELERATE_USE_CPU"] = "1"  # the only real multi-process CPU DDP launch
    command = ["accelerate", "launch", "--config_file", str(ROOT / "launch" / "accelerate" / LAUNCH[kind]),
               "--num_processes", "2", "--mixed_precision", args.precision, __file__, "--worker",
               "--generator", generator, "--crop", crop, "--steps", str(args.steps),
               "--batch", str(args.batch), "--recipe", args.recipe]
    command += ["--checkpointing"] if checkpointing else []
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    # the two ranks share one stdout: their lines may interleave
    ranks = [json.loads(found) for found in re.findall(MARK + r" (\{[^}]*\})", result.stdout)]
    if result.returncode != 0 or len(ranks) != 2:
        raise RuntimeError(f"{kind} {model}: exit {result.returncode}\n{result.stderr[-3000:]}")
    return {"model": model, "batch": args.batch, "engines": kind, "act_ckpt": checkpointing,
            "peak_mb": max(r["peak_mb"] for r in ranks),
            "training_mb": max(r["training_mb"] for r in ranks),
            "s_per_step": max(r["s_per_step"] for r in ranks)}


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def savings(rows: list[dict]) -> dict:
    """Per model and checkpointing setting: each ZeRO stage's training memory vs DDP's."""
    base = {(r["model"], r["act_ckpt"]): r["training_mb"] for r in rows if r["engines"] == "ddp"}
    return {f'{r["model"]} {r["engines"]}{" +ckpt" if r["act_ckpt"] else ""}':
            round(1 - r["training_mb"] / base[r["model"], r["act_ckpt"]], 3)
            for r in rows if r["engines"] != "ddp" and (r["model"], r["act_ckpt"]) in base}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["unet_256@256", "unet_256@512", "unet_512@512"],
                        help="GENERATOR@SIZE pairs, SIZE as WxH (width first, e.g. 1024x512) or N")
    parser.add_argument("--engines", nargs="+", default=list(LAUNCH), choices=list(LAUNCH))
    parser.add_argument("--steps", type=int, default=2, help="GAN steps per variant (>= 2: "
                        "the optimiser states exist from the first step on)")
    parser.add_argument("--batch", type=int, default=1, help="batch per process")
    parser.add_argument("--recipe", default="", help="a config file to start from (default: the "
                        "defaults, the pix2pix recipe), e.g. configs/hd_512.yaml")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "no"],
                        help="no: fp32 (CPUs that only emulate bf16 take minutes a step)")
    parser.add_argument("--act-ckpt", choices=["off", "on", "both"], default="both",
                        help="activation checkpointing off, on, or both variants")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--generator", help=argparse.SUPPRESS)
    parser.add_argument("--crop", type=size_arg, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
    for model in args.models:  # refused here in one line, not in the launched ranks
        try:
            size_arg(model.partition("@")[2])
        except argparse.ArgumentTypeError as error:
            parser.error(f"--models {model}: expected GENERATOR@SIZE: {error}")
    rows = []
    for model in args.models:
        for checkpointing in {"off": (False,), "on": (True,), "both": (False, True)}[args.act_ckpt]:
            for kind in args.engines:
                rows.append(variant(kind, model, checkpointing, args))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress
    return report("bench_memory", rows, {"training_memory_saved_vs_ddp": savings(rows), "processes": 2,
                                         "precision": args.precision, "recipe": args.recipe or "defaults"})


if __name__ == "__main__":
    main()
