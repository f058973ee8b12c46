"""What every network here is built from (pure torch): the norm and init registries,
convolution biases, activation checkpointing, the test-time modes and the moving average
of weights. pipeline/models.py builds the generators and discriminators from them and
re-exports them (`from pipeline.models import init_weights` keeps working). Nothing here
knows about devices, distribution or files.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

# The norm and init registries (the networks' are pipeline/models.py's): each choice is
# defined here once; the config validates against these and --help lists them from here.
NORMS = {"batch": "BatchNorm (the reference's; statistics per process)",
         "instance": "InstanceNorm, no affine parameters (the reference's 'instance')",
         "none": "no normalisation",
         "syncbatch": "BatchNorm with statistics across processes (>= 2 CUDA processes)"}
INITS = ("normal", "xavier", "kaiming")


def norm_layer(norm: str, channels: int) -> nn.Module:
    """The normalisation the reference uses for `norm`.

    `syncbatch` builds plain BatchNorm here; the trainer converts it with
    nn.SyncBatchNorm.convert_sync_batchnorm on CUDA (SyncBatchNorm refuses CPU modules).
    """
    if norm in ("batch", "syncbatch"):
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}: expected one of {', '.join(NORMS)}")


def conv_bias(norm: str) -> bool:
    """Convs followed by an affine norm need no bias (the norm's shift replaces it).

    The reference also drops the bias for norm 'none', leaving those convs without any
    shift; we keep it there, which changes nothing for batch/instance counts.
    """
    return norm in ("instance", "none")


def checkpointed(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) under activation checkpointing: its activations are recomputed in the
    backward pass instead of kept. The recompute leaves BatchNorm's running statistics as
    the first forward left them; dropout masks are replayed by checkpoint's RNG-state
    preservation."""
    calls = 0

    def run(x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:
            return module(x)
        buffers = list(module.buffers())
        saved = [b.clone() for b in buffers]
        try:  # checkpoint may stop a recompute early by raising: restore regardless
            return module(x)
        finally:
            with torch.no_grad():
                for buffer, value in zip(buffers, saved):
                    buffer.copy_(value)
    return checkpoint(run, x, use_reentrant=False)


def init_weights(module: nn.Module, kind: str = "normal", gain: float = 0.02) -> nn.Module:
    """The reference init: conv weights N(0, gain) (or xavier/kaiming), biases 0,
    BatchNorm weights N(1, gain) and biases 0."""
    inits = {  # the keys are INITS
        "normal": lambda w: nn.init.normal_(w, 0.0, gain),
        "xavier": lambda w: nn.init.xavier_normal_(w, gain=gain),
        "kaiming": lambda w: nn.init.kaiming_normal_(w, a=0, mode="fan_in"),
    }
    if kind not in inits:
        raise ValueError(f"unknown init {kind!r}: expected one of {', '.join(inits)}")
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            inits[kind](m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)
    return module


def set_test_mode(module: nn.Module, dropout: bool, batch_stats: bool) -> nn.Module:
    """Inference with the test-time behaviour chosen explicitly: the paper keeps dropout
    and batch statistics at test time (dropout=True, batch_stats=True, i.e. train mode);
    plain eval() is (False, False). Batch statistics are of the batch that runs, so give
    one image per forward to get the paper's per-image statistics."""
    module.eval()
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.train(dropout)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(batch_stats)
    return module


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay x ema + (1 - decay) x model for the parameters; buffers (BatchNorm's
    running statistics) copied, so the averaged weights meet statistics of their scale."""
    for averaged, current in zip(ema.parameters(), model.parameters()):
        averaged.lerp_(current, 1.0 - decay)
    for averaged, current in zip(ema.buffers(), model.buffers()):
        averaged.copy_(current)


@dataclass(frozen=True)
class Choice:
    """A registered network: how to build it from a ModelConfig, and what --help says."""
    build: Callable[..., nn.Module]
    help: str
    size_multiple: int = 1  # input height and width must be multiples of this
