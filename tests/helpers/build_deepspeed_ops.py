"""Compile DeepSpeed's JIT ops that CPU launches load (the shared-memory comm op, ~25 s)
once, into TORCH_EXTENSIONS_DIR (default: tests.helpers.trainer_runs.TORCH_EXTENSIONS_DIR, one
folder per torch version), so that no test, and no pair of ranks racing each other, pays for it:

    python -m tests.helpers.build_deepspeed_ops

torch's extension builder waits, without a limit, for the `lock` file a build leaves while it
runs; a killed build leaves it for ever. A lock older than STALE_LOCK_S is removed (a build
takes under a minute here), a younger one is waited for that long at most.
"""
import os
import sys
import time
from pathlib import Path

from tests.helpers.trainer_runs import TORCH_EXTENSIONS_DIR

STALE_LOCK_S = 180


def clear_stale_locks(root: Path, stale_s: float = STALE_LOCK_S) -> None:
    deadline = time.monotonic() + stale_s
    for lock in root.glob("*/lock"):
        while lock.exists():
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                break
            if age > stale_s or time.monotonic() > deadline:
                print(f"removing the stale build lock {lock} ({age:.0f} s old)", file=sys.stderr)
                lock.unlink(missing_ok=True)
                break
            time.sleep(1)


if __name__ == "__main__":
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", TORCH_EXTENSIONS_DIR)
    clear_stale_locks(Path(os.environ["TORCH_EXTENSIONS_DIR"]))
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()  # a no-op where the accelerator needs no such op (e.g. CUDA)
    print(f"DeepSpeed ops ready in {os.environ['TORCH_EXTENSIONS_DIR']}")
