"""Time the full pix2pix training step (D update + G update) exactly as the trainer runs
it, variant by variant, side by side: samples/s, peak memory, and the L1 loss reached, so
that speed never hides a broken step.

    python benchmarks/bench_train.py --batch 1 4 --steps 5
    python benchmarks/bench_train.py --batch 1 16 64 --variants fp32 bf16+cl bf16+cl+compile
    python benchmarks/bench_train.py --recipe configs/hd_512.yaml --generator resnet_9blocks --size 512
    python benchmarks/bench_train.py --recipe configs/hd_global_1024x512.yaml --generator global \
        --size 1024x512 --batch 1 --variants fp32 default --steps 2 --warmup 1

A variant is `default` (exactly what the trainer picks on this machine: bf16 where the
hardware computes it, else fp32, and the config's defaults: the layout per hardware and
batch, the `layout` column says which) or a precision (fp32: the
reference's arithmetic, TF32 off on CUDA; bf16: autocast) plus options: cl
(channels_last), fused / foreach (the Adam kernel), compile (torch.compile), mmap (on CPU,
glibc's default malloc instead of the trainer's train.keep_freed_memory: the reference's
process; `fp32+mmap` is the reference's step as it runs there). Each
(variant, batch) runs in a fresh process, built by the trainer's own code (config ->
Accelerator -> engines -> gan.train_step) on the same seeded synthetic pairs, so peak
memory is its own and the losses are comparable. --recipe starts from a config file (the
HD recipes: their D, losses, norm and EMA) instead of the defaults. --size is the size the
networks see: WxH, width first as the manifest writes sizes (1024x512: 1024 wide), or N
for N x N; bench_peak's columns are square-only, so a non-square size leaves them out.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from estimate_memory import size_arg
from report import report  # benchmarks/ is on the path when run as a script
from train_setup import Size, fp32_step, parse_variant, synthetic_pairs, trainer_config, trainer_step

from pipeline.data.format import size_name
from pipeline.models import GENERATORS

DEFAULT_VARIANTS = ["fp32", "default", "bf16", "bf16+cl", "bf16+fused", "bf16+cl+fused",
                    "bf16+fused+compile"]
# Dense peak TFLOP/s per precision, for the model FLOPs utilisation (SXM parts)
PEAK_TFLOPS = {"H100": {"bf16": 989.0, "fp32": 67.0}, "H200": {"bf16": 989.0, "fp32": 67.0},
               "A100": {"bf16": 312.0, "fp32": 19.5}}


def measure(variant: str, batch: int, generator: str, size: Size, steps: int, warmup: int,
            recipe: str = "") -> dict:
    """One variant in this process: seconds per step, peak memory and L1 losses."""
    from accelerate import Accelerator

    from pipeline import data, host_memory
    from pipeline.engines import make_engines

    precision, _ = parse_variant(variant)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    cfg = trainer_config(variant, generator, batch, recipe, size)
    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no")
    host_memory.apply(cfg, accelerator.device.type)
    engines = make_engines(cfg, accelerator)
    pairs = [data.to_device({"input": x, "target": y}, accelerator.device, cfg=cfg.data,
                            channels_last=engines.channels_last)
             for x, y in synthetic_pairs(4, batch, size)]
    step_on = trainer_step(cfg, engines, accelerator.device)
    step = lambda i: step_on(*pairs[i % len(pairs)])
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    l1 = [step(i)["loss_G_l1"] for i in range(warmup)]
    warmup_s = time.perf_counter() - start  # +compile: compiling G and D happens here
    start = time.perf_counter()
    l1 += [step(i)["loss_G_l1"] for i in range(warmup, warmup + steps)]  # each syncs on its losses
    seconds = (time.perf_counter() - start) / steps
    return {"variant": variant, "batch": batch, "s_per_step": seconds,
            "layout": "channels_last" if engines.channels_last else "nchw",
            "samples_per_s": batch / seconds, "warmup_s": warmup_s,
            "peak_mem_mib": peak_memory_mib(accelerator.device),
            "l1_first": l1[0], "l1_last": sum(l1[-steps:]) / steps}


def peak_memory_mib(device: torch.device) -> float:
    """The device's peak allocation on CUDA; the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def flops_per_sample(generator: str, size: Size, recipe: str = "") -> float:
    """FLOPs of one step (G forward, D on fake and real, D backward, D on G's fake,
    G backward) per sample, by torch's FLOP counter on train_setup's batch-1 fp32 CPU step."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fp32_step(generator, 1, size, recipe)
    return float(counter.get_total_flops())


def run_child(variant: str, batch: int, args) -> dict:
    """measure() in a fresh process: its own peak memory, compile caches and OOMs."""
    command = [sys.executable, __file__, "--child", variant, "--batch", str(batch),
               "--generator", args.generator, "--size", size_name(*args.size),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--recipe", args.recipe]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        reason = "out of memory" if "out of memory" in result.stderr.lower() \
            else result.stderr.strip().splitlines()[-1:]
        return {"variant": variant, "batch": batch, "error": str(reason)}
    return json.loads(result.stdout.strip().splitlines()[-1])


def add_comparisons(rows: list[dict], flops: float, device_name: str, peak_override: float | None) -> None:
    """Speed-up and L1 against fp32 at the same batch, achieved TFLOP/s and MFU."""
    fp32 = {row["batch"]: row for row in rows if row["variant"] == "fp32" and "error" not in row}
    for row in rows:
        if "error" in row:
            continue
        base = fp32.get(row["batch"])
        row["speedup"] = base and base["s_per_step"] / row["s_per_step"]
        row["l1_vs_fp32"] = base and row["l1_last"] / base["l1_last"] - 1
        row["tflops"] = flops * row["samples_per_s"] / 1e12
        peak = peak_override or next((p[parse_variant(row["variant"])[0]] for name, p in PEAK_TFLOPS.items()
                                      if name in device_name), None)
        row["mfu"] = peak and row["tflops"] / peak


def add_peak_fractions(rows: list[dict], args, device: str) -> None:
    """fraction_of_peak: the step's convolution-bound time (bench_peak: each of its
    convolutions alone, at its best layout, in the variant's precision) over the step time;
    attainable_fraction: what the parameter-bound work (bench_peak) leaves of it at best;
    gemm_fraction: achieved TFLOP/s over this device's dense matmul peak, for information."""
    from bench_peak import matmul_peak_tflops, peak_rows

    ok = [row for row in rows if "error" not in row]
    precisions = sorted({parse_variant(row["variant"])[0] for row in ok})
    gemm = {p: matmul_peak_tflops(p, args.gemm_size, device) for p in precisions}
    bound = {(r["precision"], r["batch"]): r for r in peak_rows(
        args.generator, args.size[0], sorted({row["batch"] for row in ok}), precisions, device, args.recipe)}
    for row in ok:
        precision = parse_variant(row["variant"])[0]
        limits = bound[precision, row["batch"]]
        row["conv_bound_s"], row["param_bound_s"] = limits["conv_bound_s"], limits["param_bound_s"]
        row["fraction_of_peak"] = row["conv_bound_s"] / row["s_per_step"]
        row["attainable_fraction"] = limits["attainable_fraction"]
        row["gemm_fraction"] = row["tflops"] / gemm[precision]


def summary(rows: list[dict], flops: float, device_name: str, size: tuple[int, int]) -> dict:
    """The headline figures: the best variant at the largest batch against fp32 there,
    and against fp32 at batch 1 (the reference's setting)."""
    ok = [row for row in rows if "error" not in row]
    largest = max(row["batch"] for row in ok)
    best = max((row for row in ok if row["batch"] == largest), key=lambda row: row["samples_per_s"])
    fp32_b1 = next((row for row in ok if row["variant"] == "fp32" and row["batch"] == 1), None)
    return {"device": device_name, "size": size_name(*size), "gflop_per_sample": flops / 1e9,
            "largest_batch": largest,
            "best_variant": best["variant"], "best_samples_per_s": best["samples_per_s"],
            "best_speedup_vs_fp32_same_batch": best["speedup"],
            "best_l1_vs_fp32": best["l1_vs_fp32"],
            "best_vs_fp32_batch1": fp32_b1 and best["samples_per_s"] / fp32_b1["samples_per_s"],
            "best_mfu": best["mfu"], "best_fraction_of_peak": best.get("fraction_of_peak")}


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--generator", default="unet_256", choices=list(GENERATORS))
    parser.add_argument("--recipe", default="", help="a config file to start from (default: the "
                        "defaults, the pix2pix recipe), e.g. configs/hd_512.yaml")
    parser.add_argument("--size", type=size_arg, default="256", help="the size the networks "
                        "see: WxH (width first, e.g. 1024x512) or N for N x N")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                        help="precision[+cl][+fused|+foreach][+compile]; fp32 is the baseline")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile happens here)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, for MFU "
                        "(default: known for H100/H200/A100; none on CPUs)")
    parser.add_argument("--no-peak", action="store_true", help="skip bench_peak's convolution-bound "
                        "time and matmul peak (fraction_of_peak, gemm_fraction)")
    parser.add_argument("--gemm-size", type=int, default=4096, help="matmul operand size for the peak")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure one variant
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.batch[0], args.generator, args.size, args.steps,
                                 args.warmup, args.recipe)))
        return None
    for variant in args.variants:
        parse_variant(variant)
    device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    flops = flops_per_sample(args.generator, args.size, args.recipe)
    rows = [run_child(variant, batch, args) for batch in args.batch for variant in args.variants]
    add_comparisons(rows, flops, device_name, args.peak_tflops)
    if args.size[0] != args.size[1] and not args.no_peak:
        print(f"bench_train.py: bench_peak is square-only: no peak columns at {size_name(*args.size)}",
              file=sys.stderr)
    elif not args.no_peak:
        add_peak_fractions(rows, args, "cuda" if torch.cuda.is_available() else "cpu")
    return report("bench_train", rows, summary(rows, flops, device_name, args.size))


if __name__ == "__main__":
    main()
