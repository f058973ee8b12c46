"""CUDA's view of autocast, on a CPU: put this folder on PYTHONPATH and every Python
process started with it (each rank of a launch too) answers `torch.is_autocast_enabled()`
with no argument True inside any autocast, the CPU one included.

Why: torch answers the no-argument call for CUDA's autocast only, and DeepSpeed's
`engine.forward` asks exactly that to decide whether to switch autocast off inside the
engine (deepspeed/runtime/torch_autocast.py, `autocast_if_enabled`). On a GPU it does; on
a CPU it never sees our `torch.autocast("cpu")`, so a CPU test would pass where a CUDA run
fails. tests.helpers.trainer_runs.deepspeed_env() adds this folder to every DeepSpeed launch.
"""
import torch

_is_autocast_enabled = torch.is_autocast_enabled


def is_autocast_enabled(device_type=None) -> bool:
    """As torch's, except that no device means any device (CUDA's answer on a GPU run)."""
    if device_type is not None:
        return _is_autocast_enabled(device_type)
    return _is_autocast_enabled("cuda") or _is_autocast_enabled("cpu")


torch.is_autocast_enabled = is_autocast_enabled
