"""This machine's own limits for the pix2pix step, measured in the same run as the step:
the dense matmul peak (fp32 and bf16), and every convolution the step runs, timed alone.

    python benchmarks/bench_peak.py --batch 1 4
    python benchmarks/bench_peak.py --batch 16 --precisions bf16 --generator resnet_9blocks

The convolutions are recorded, not listed by hand: one fp32 step of the trainer's models
(gan.train_step, G and D of the config) runs under a dispatch mode that logs every
aten.convolution (forward, transposed included) and aten.convolution_backward (both halves,
input and weight, as the step asks for them) with its shapes. Each distinct call is then
replayed alone on random tensors of those shapes in the precision asked, in NCHW and in
channels_last, best of a few repeats; the faster layout counts. The sum over the step's
calls is the step's convolution-bound time: what the step would take if it did nothing but
its convolutions, each at its best layout. bench_train.py divides it by the measured step
time (`fraction_of_peak`). Beside it, the step's parameter-bound work timed alone (one fused
Adam update of G and D, and in bf16 autocast's weight and gradient casts): memory-bound and
the same at any batch, it caps the attainable fraction at conv / (conv + parameter-bound).
Written here because no profiler gives "this op alone at its best
layout"; the matmul peak is the MFU denominator gpu_check.py reports.
"""
from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import dataclass

import torch
from report import report  # benchmarks/ is on the path when run as a script
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.models import GENERATORS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONV_OPS = {torch.ops.aten.convolution.default: "forward",
            torch.ops.aten.convolution_backward.default: "backward"}


@dataclass(frozen=True)
class ConvCall:
    """One convolution call of the step: the op, its tensors' shapes and its other arguments."""
    kind: str  # forward | backward
    args: tuple  # in order: a _Shape for a tensor argument, else the value (lists as tuples)


@dataclass(frozen=True)
class _Shape:
    dims: tuple


def _spec(value):
    if isinstance(value, torch.Tensor):
        return _Shape(tuple(value.shape))
    return tuple(value) if isinstance(value, list) else value


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: Counter[ConvCall] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in CONV_OPS:
            self.calls[ConvCall(CONV_OPS[func], tuple(_spec(a) for a in args))] += 1
        return func(*args, **(kwargs or {}))


def step_convolutions(generator: str, batch: int, size: int, recipe: str = "") -> Counter[ConvCall]:
    """Every convolution call of one training step of the trainer's models, counted."""
    from train_setup import fp32_step

    with _Recorder() as recorder:
        fp32_step(generator, batch, size, recipe)
    return recorder.calls


def _replay(call: ConvCall, dtype: torch.dtype, layout: torch.memory_format, device: str):
    """A closure running the call once on random tensors of its shapes."""
    def value(spec):
        if not isinstance(spec, _Shape):
            return list(spec) if isinstance(spec, tuple) else spec
        t = torch.randn(spec.dims, device=device, dtype=dtype)
        return t.contiguous(memory_format=layout) if t.dim() == 4 else t
    args = [value(spec) for spec in call.args]
    op = next(op for op, kind in CONV_OPS.items() if kind == call.kind)
    return lambda: op(*args)


def time_call(call: ConvCall, dtype: torch.dtype, device: str, repeats: int) -> tuple[float, str]:
    """(best seconds, layout) of the call alone, over NCHW and channels_last (the untimed
    first call of best_seconds creates the oneDNN/cuDNN primitive)."""
    return min((best_seconds(_replay(call, dtype, layout, device), device, repeats), name)
               for name, layout in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)))


def conv_bound_seconds(calls: Counter[ConvCall], precision: str, device: str, repeats: int = 3) -> dict:
    """The step's convolution-bound time in `precision`, and how much of it is forward,
    backward, and in each layout."""
    totals = Counter(dict.fromkeys(["conv_bound_s", "forward_s", "backward_s", "best_nchw", "best_nhwc"], 0))
    for call, count in calls.items():
        seconds, layout = time_call(call, DTYPES[precision], device, repeats)
        totals["conv_bound_s"] += seconds * count
        totals[f"{call.kind}_s"] += seconds * count
        totals[f"best_{layout}"] += count
    return dict(totals)


def best_seconds(run, device: str, repeats: int) -> float:
    """The fastest of `repeats` timed calls after one untimed call."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    run()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        run()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


# casts autocast makes per step: each weight to bf16 once per autocast region that uses it
# (G: its forward; D: the D step's two forwards, then the G step's), each gradient back once
WEIGHT_CASTS = {"G": 1, "D": 2}


def parameter_bound_seconds(generator: str, precision: str, device: str, recipe: str = "",
                            repeats: int = 3) -> dict:
    """The step's work that scales with the parameters, not the batch, timed alone: one
    fused Adam update of G and one of D, and in bf16 the weight and gradient casts of
    WEIGHT_CASTS. Memory-bound (57 M parameters for unet_256 + PatchGAN): no batch size
    makes it smaller; the step's best fraction_of_peak is conv / (conv + this)."""
    from train_setup import trainer_config

    from pipeline.engines import build_models

    G, D = build_models(trainer_config("fp32", generator, 1, recipe), channels_last=False)
    totals = Counter(adam_s=0.0, cast_s=0.0)
    for name, model in (("G", G), ("D", D)):
        totals.update(_parameter_work(model, WEIGHT_CASTS[name] if precision == "bf16" else 0,
                                      device, repeats))
    return {"param_bound_s": totals["adam_s"] + totals["cast_s"], **totals}


def _parameter_work(model: torch.nn.Module, casts: int, device: str, repeats: int) -> dict:
    """One fused Adam update of the model's parameters; `casts` weight casts to bf16 and,
    with any, one cast of the gradients back to fp32."""
    params = [torch.nn.Parameter(p.detach().to(device)) for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    adam = torch.optim.Adam(params, lr=1e-4, fused=True)
    work = {"adam_s": best_seconds(adam.step, device, repeats), "cast_s": 0.0}
    if casts:
        grads = [p.grad.to(torch.bfloat16) for p in params]
        work["cast_s"] = casts * best_seconds(lambda: [p.to(torch.bfloat16) for p in params], device, repeats)
        work["cast_s"] += best_seconds(lambda: [g.float() for g in grads], device, repeats)
    return work


def matmul_peak_tflops(precision: str, size: int, device: str, repeats: int = 5) -> float:
    """The best dense matmul rate of `size` x `size` operands on the device."""
    a, b = (torch.randn(size, size, device=device, dtype=DTYPES[precision]) for _ in range(2))
    return 2 * size ** 3 / best_seconds(lambda: a @ b, device, repeats) / 1e12


def peak_rows(generator: str, size: int, batches: list[int], precisions: list[str], device: str,
              recipe: str = "", repeats: int = 3) -> list[dict]:
    """One row per (precision, batch): the step's convolution-bound time and its parts,
    its parameter-bound time, and the fraction_of_peak they leave attainable."""
    rows = []
    params = {p: parameter_bound_seconds(generator, p, device, recipe, repeats) for p in precisions}
    for batch in batches:
        calls = step_convolutions(generator, batch, size, recipe)
        for precision in precisions:
            row = {"precision": precision, "batch": batch, "conv_calls": sum(calls.values()),
                   "distinct": len(calls)}
            row.update(conv_bound_seconds(calls, precision, device, repeats))
            row.update(params[precision])
            row["attainable_fraction"] = row["conv_bound_s"] / (row["conv_bound_s"] + row["param_bound_s"])
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--generator", default="unet_256", choices=list(GENERATORS))
    parser.add_argument("--recipe", default="", help="a config file to start from, e.g. configs/hd_512.yaml")
    parser.add_argument("--size", type=int, default=256, help="crop size")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes")
    parser.add_argument("--precisions", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--gemm-size", type=int, default=4096, help="matmul operand size for the peak")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per convolution (best counts)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    figures = {f"{p}_matmul_tflops": matmul_peak_tflops(p, args.gemm_size, device) for p in args.precisions}
    rows = peak_rows(args.generator, args.size, args.batch, args.precisions, device, args.recipe,
                     args.repeats)
    return report("bench_peak", rows, figures)


if __name__ == "__main__":
    main()
