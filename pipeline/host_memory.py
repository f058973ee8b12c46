"""Host memory of CPU runs: keep freed large blocks in the process.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB) with a fresh
mmap and unmaps it on free, so a CPU step that allocates such tensors page-faults them in
anew on every step: unet_256's three 1024x512x4x4 fp32 weight gradients are 32 MiB plus
alignment, cast back from bf16 each step, and larger batches add activations. On the
2-core VMs measured here that cost ~0.1 s of a 0.47 s bf16 step at batch 1 and ~0.15 s of
an fp32 one. mallopt(M_MMAP_MAX, 0) serves them from the heap instead, and a high
M_TRIM_THRESHOLD keeps the heap's freed top from being returned and faulted in again.
jemalloc or tcmalloc through LD_PRELOAD (what Intel recommends for PyTorch on CPU) do the
same, but are system packages a pip install cannot bring; this is two mallopt calls.
Elsewhere than glibc it does nothing, and says so by its return value.
"""
from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
TRIM_THRESHOLD = 2**31 - 1  # an int: the largest mallopt takes


def apply(cfg, device_type: str) -> bool:
    """What every CPU process of the trainer does at start-up (train.keep_freed_memory);
    the benchmarks call it too, so that they measure the trainer's process."""
    return device_type == "cpu" and cfg.train.keep_freed_memory and keep_freed_memory()


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks of any size; False where there is none."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    kept = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    log.debug("malloc keeps freed blocks: %s", kept)
    return kept
