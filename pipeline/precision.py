"""Which precision a run really uses: bf16 only where the hardware computes it.

The accelerate config asks for `no` or `bf16`. bf16 autocast also runs where bf16 is
only emulated (CPUs without AVX512-BF16 or AMX, GPUs before Ampere), and there it is
far slower than fp32: convolutions ~75x on an AVX2-only CPU (measured on this
project's 2-core CI machine kind). Such a run falls back to fp32 and says so, unless
train.allow_emulated_bf16 keeps bf16 (tests of bf16 itself, or to reproduce a run).
The memory format follows the same hardware facts (channels_last()). A training run
decides its precision once (for_training: the start-up gate's RunPlan.precision).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CPU:
    """What this CPU computes natively, as torch's own probes say."""
    avx512_bf16: bool
    amx: bool

    @classmethod
    def this(cls) -> CPU:
        return cls(torch.cpu._is_avx512_bf16_supported(), torch.cpu._is_amx_tile_supported())


def launch_device_type() -> str:
    """The device accelerate will give this process, known before it is created."""
    forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    return "cuda" if torch.cuda.is_available() and not forced_cpu else "cpu"


def requested_precision() -> str:
    """What `accelerate launch` (its config or --mixed_precision) asked for."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()


def native_bf16(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    cpu = CPU.this()
    return cpu.avx512_bf16 or cpu.amx


CHANNELS_LAST_MIN_BATCH = 2  # on bf16 CPUs; below it NCHW measured as fast or faster


def channels_last(setting: str | bool, used: str, device_type: str, batch_size: int,
                  cpu: CPU | None = None) -> bool:
    """The memory format of models and batches: train.channels_last when true or false;
    `auto` decides by hardware, for bf16 runs only:
      fp32            NCHW: the reference's arithmetic bit for bit (an fp32 convolution in
                      channels_last differs by up to 4e-6 on CPU)
      bf16, CUDA      channels_last: cuDNN's tensor-core convolutions are NHWC (NVIDIA's
                      guidance; benchmarks/gpu_check.sh measures both)
      bf16 CPU        channels_last from a per-process batch of 2 on CPUs with native bf16
                      (AMX or AVX-512 BF16): oneDNN's bf16 kernels are NHWC and reorder NCHW
                      tensors around every convolution (unet_256, AMX: 1.26-1.4x at batch 4,
                      1.1x at 2; AVX-512 BF16: 1.13x at 4, 1.03x at 2); at batch 1 NCHW is
                      as fast or faster (AVX-512 BF16: 0.87x in channels_last)
      otherwise       NCHW (bf16 emulated on AVX2-only CPUs: not worth measuring)"""
    if setting != "auto":
        return setting is True
    if used != "bf16":
        return False
    if device_type == "cuda":
        return True
    cpu = cpu or CPU.this()
    return device_type == "cpu" and (cpu.amx or cpu.avx512_bf16) and batch_size >= CHANNELS_LAST_MIN_BATCH


def resolve(requested: str, device_type: str, native: bool, allow_emulated: bool,
            keep: str = "set train.allow_emulated_bf16=true") -> tuple[str, str | None]:
    """(the precision to run, a one-line notice or None); `keep` says how to keep bf16."""
    if requested != "bf16" or native:
        return requested, None
    hardware = "CPU (no AVX512-BF16 or AMX)" if device_type == "cpu" else "GPU (bf16 needs Ampere or newer)"
    if allow_emulated:
        return "bf16", f"bf16 on this {hardware} is emulated: expect it to run far slower than fp32"
    return "no", (f"bf16 was requested, but this {hardware} only emulates it, far slower than "
                  f"fp32: running in fp32 instead ({keep} to keep bf16)")


def choose(requested: str, allow_emulated: bool,
           keep: str = "set train.allow_emulated_bf16=true") -> tuple[str, str | None]:
    """resolve() for the device accelerate will give this process."""
    device_type = launch_device_type()
    return resolve(requested, device_type, native_bf16(device_type), allow_emulated, keep)


BF16_FLAG_HELP = ("bf16 autocast, also on hardware that only emulates it (default: bf16 where "
                  "the accelerate config asks for it and the hardware computes it, else fp32)")


def for_inference(force_bf16: bool, device_type: str) -> tuple[str, str | None]:
    """resolve() for translate.py and evaluate.py, whose `--bf16` (BF16_FLAG_HELP) means the
    same in both: bf16 even where emulated; without it, what accelerate was configured
    with, where the hardware computes it."""
    requested = "bf16" if force_bf16 else requested_precision()
    return resolve(requested, device_type, native_bf16(device_type), allow_emulated=force_bf16,
                   keep="pass --bf16")


def for_evaluation(force: str | None, device_type: str, trained: str | None) -> tuple[str, str]:
    """(the precision p2p-evaluate runs, why: a sentence for its console line and report).
    `force` is its --bf16/--fp32 ("bf16", "no" or None); else what accelerate launch asked
    for; else the precision the run trained and validated in (`trained`, from its
    trainer.json) where this device computes it, so that the report gives the trainer's
    numbers; else fp32."""
    native = native_bf16(device_type)
    if force:
        used, notice = resolve(force, device_type, native, allow_emulated=True, keep="")
        flag = "--bf16" if force == "bf16" else "--fp32"
        return used, f"asked for with {flag}" + (f" ({notice})" if notice else "")
    if "ACCELERATE_MIXED_PRECISION" in os.environ:
        used, notice = resolve(requested_precision(), device_type, native, allow_emulated=False,
                               keep="pass --bf16")
        return used, notice or f"asked for by {source()}"
    if trained == "bf16":
        if native:
            return "bf16", "the run trained and validated in bf16 (its trainer.json): the trainer's numbers"
        return "no", ("the run validated in bf16, which this device only emulates: fp32 (pass --bf16 "
                      "for the trainer's numbers, slowly)")
    if trained == "no":
        return "no", "the run trained and validated in fp32 (its trainer.json)"
    return "no", "the checkpoint does not record its precision (an export): fp32 (--bf16 for bf16)"


def source() -> str:
    """Where the requested precision came from, for the run's start-up line."""
    if "ACCELERATE_MIXED_PRECISION" in os.environ:
        return "accelerate launch (its --mixed_precision, else its config file's mixed_precision)"
    return ("no launcher setting (plain python runs in fp32; `accelerate launch --config_file "
            "accelerate_config.yaml` asks for bf16)")


@dataclass(frozen=True)
class Precision:
    """A training run's precision, decided once at start-up (the run plan's): what it
    computes in, what the launcher asked for and where that came from, and the line
    saying why they differ (None where they do not)."""
    used: str  # "no" (fp32) or "bf16"
    requested: str  # the launcher's request: "no", "bf16", or what the trainer refuses
    source: str  # where the request came from (source())
    notice: str | None = None

    def describe(self) -> str:
        """`precision: bf16 autocast (requested bf16 by ...)`, one line."""
        name = "bf16 autocast" if self.used == "bf16" else "fp32"
        return f"precision: {name} (requested {self.requested} by {self.source})"


def for_training(allow_emulated: bool) -> Precision:
    """What a training process of this launch computes in: choose() on the launcher's request."""
    requested = requested_precision()
    used, notice = choose(requested, allow_emulated)
    return Precision(used, requested, source(), notice)
