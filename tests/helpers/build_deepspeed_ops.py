"""Compile DeepSpeed's JIT ops that CPU launches load (the shared-memory comm op, ~25 s)
once, into TORCH_EXTENSIONS_DIR (default: tests.helpers.trainer_runs.TORCH_EXTENSIONS_DIR), so
that no test, and no pair of ranks racing each other, pays for it:

    python -m tests.helpers.build_deepspeed_ops
"""
import os

from tests.helpers.trainer_runs import TORCH_EXTENSIONS_DIR

if __name__ == "__main__":
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", TORCH_EXTENSIONS_DIR)
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()  # a no-op where the accelerator needs no such op (e.g. CUDA)
    print(f"DeepSpeed ops ready in {os.environ['TORCH_EXTENSIONS_DIR']}")
