"""Weak scaling of the training step: 1 process, N processes on one machine, and 2
"nodes" (two launchers on 127.0.0.1), each process with the same batch and the same
compute (one GPU, or --threads CPU threads): step time, all-reduce time, efficiency.

    python benchmarks/bench_scaling.py                       # this machine: 1, 2, 2 nodes
    python benchmarks/bench_scaling.py --processes 1 8       # a GPU node: 1 and 8 GPUs

On a cluster, run the measuring side under your own launcher on every node; rank 0
prints the row:  accelerate launch --multi_gpu ... benchmarks/bench_scaling.py --worker

Efficiency = samples/s of the world / (world size x samples/s of 1 process). The
all-reduce time is that of one buffer as large as G's and D's gradients: what DDP must
move each step (it overlaps most of it with the backward pass).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import torch
from report import report  # benchmarks/ is on the path when run as a script
from train_setup import parse_variant

from pipeline.distributed import free_port


def measure_world(args) -> dict | None:
    """Under a launcher: time steps of the trainer's engines, then the gradient all-reduce."""
    from accelerate import Accelerator
    from train_setup import synthetic_pairs, trainer_config, trainer_step

    from pipeline import data, host_memory
    from pipeline.engines import make_engines

    precision, _ = parse_variant(args.variant)
    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no")
    cfg = trainer_config(args.variant, args.generator, args.batch)
    host_memory.apply(cfg, accelerator.device.type)  # the trainer's process
    engines = make_engines(cfg, accelerator)
    x, y = data.to_device(dict(zip(("input", "target"), synthetic_pairs(1, args.batch, args.size)[0])),
                          accelerator.device, cfg=cfg.data, channels_last=engines.channels_last)
    step_on = trainer_step(cfg, engines, accelerator.device)
    step = lambda: step_on(x, y)
    for _ in range(args.warmup):
        step()
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    accelerator.wait_for_everyone()
    seconds = (time.perf_counter() - start) / args.steps
    row = {"world": accelerator.num_processes, "nodes": int(os.environ.get("P2P_BENCH_NODES", "1")),
           "s_per_step": seconds, "samples_per_s": args.batch * accelerator.num_processes / seconds,
           "allreduce_s": allreduce_seconds(engines, accelerator)}
    return row if accelerator.is_main_process else None


def allreduce_seconds(engines, accelerator) -> float:
    """One all-reduce of a buffer the size of G's and D's gradients (0 on one process)."""
    if accelerator.num_processes == 1:
        return 0.0
    numel = sum(p.numel() for module in engines.modules() for p in module.parameters())
    buffer = torch.ones(numel, device=accelerator.device)
    torch.distributed.all_reduce(buffer)  # warm the connection up
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    for _ in range(3):
        torch.distributed.all_reduce(buffer)
    if buffer.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / 3


def launch(processes: int, nodes: int, args) -> dict:
    """`processes` in all (accelerate counts them over every machine) under `nodes`
    launchers on 127.0.0.1; rank 0's row."""
    port, precision = free_port(), {"fp32": "no", "bf16": "bf16"}[parse_variant(args.variant)[0]]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), GLOO_SOCKET_IFNAME="lo",
               P2P_BENCH_NODES=str(nodes), PYTHONUNBUFFERED="1")
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
    worker = [__file__, "--worker", *child_options(args)]
    multi = ["--multi_gpu"] if processes > 1 else []
    commands = [["accelerate", "launch", *multi, "--num_processes", str(processes),
                 "--num_machines", str(nodes),
                 "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                 "--main_process_port", str(port), "--mixed_precision", precision, *worker]
                for rank in range(nodes)]
    launchers = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for c in commands]
    outputs = [p.communicate(timeout=args.timeout) for p in launchers]
    if any(p.returncode for p in launchers):
        raise SystemExit(f"bench_scaling.py: {processes} process(es) on {nodes} node(s) failed:\n"
                         + "\n".join(err[-2000:] for _, err in outputs))
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def child_options(args) -> list[str]:
    return ["--generator", args.generator, "--size", str(args.size), "--batch", str(args.batch),
            "--variant", args.variant, "--steps", str(args.steps), "--warmup", str(args.warmup)]


def add_efficiency(rows: list[dict]) -> None:
    single = next(row for row in rows if row["world"] == 1)
    for row in rows:
        row["efficiency"] = row["samples_per_s"] / (row["world"] * single["samples_per_s"])
        row["step_overhead_s"] = row["s_per_step"] - single["s_per_step"]


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--generator", default="unet_256", choices=["unet_128", "unet_256", "unet_512"])
    parser.add_argument("--size", type=int, default=256, help="crop size")
    parser.add_argument("--batch", type=int, default=1, help="batch per process (weak scaling)")
    parser.add_argument("--variant", default="bf16+fused",
                        help="as bench_train.py's; the default is the trainer's defaults")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--processes", type=int, nargs="+", help="world sizes on this machine "
                        "(default: 1 and every GPU, or 1 and 2 on a CPU)")
    parser.add_argument("--no-nodes", action="store_true", help="skip the 2-node launch on 127.0.0.1")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per launch")
    parser.add_argument("--worker", action="store_true", help="measure under a launcher (rank 0 prints)")
    args = parser.parse_args(argv)
    if args.worker:
        from pipeline.distributed import finish
        row = measure_world(args)
        if row is not None:
            print(json.dumps(row))
        finish(0)  # gloo can abort at interpreter exit: leave as the trainer does
    largest = max(torch.cuda.device_count(), 2)
    worlds = args.processes or [1, largest]
    rows = [launch(world, 1, args) for world in worlds]
    if not args.no_nodes:
        rows.append(launch(largest, 2, args))
    add_efficiency(rows)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() \
        else f"cpu, {args.threads} thread(s)/process"
    return report("bench_scaling", rows, {"device": device, "batch_per_process": args.batch,
                                          "variant": args.variant, "generator": args.generator,
                                          "min_efficiency": min(r["efficiency"] for r in rows)})


if __name__ == "__main__":
    main()
