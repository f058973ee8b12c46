"""The process group a restarted worker group makes, on a GPU machine as accelerate makes a
first start's; and NCCL failures that reach Python instead of killing the process. The
CUDA condition is reproduced on the CPU (torch.cuda.is_available reporting a GPU): no
collective runs here, only the choice that a GPU machine would make."""
import os

import pytest
import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType

from pipeline import distributed


def accelerates_backend(cpu: bool) -> str:
    """The backend accelerate's own start-up picks for a launched rank (LOCAL_RANK set)."""
    backend, kind = PartialState._prepare_backend(object.__new__(PartialState), cpu=cpu)
    assert kind in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
    return backend


@pytest.mark.parametrize("forced_cpu", [False, True])
def test_a_restarted_group_uses_the_backend_of_the_first_start(monkeypatch, forced_cpu):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    if forced_cpu:
        monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    else:
        monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert distributed.default_backend() == accelerates_backend(cpu=forced_cpu)
    assert distributed.default_backend() == ("gloo" if forced_cpu else "nccl")  # never a mixed group


def test_nccl_errors_are_raised_in_python_unless_the_user_chose(monkeypatch):
    name, value = distributed.NCCL_ERROR_HANDLING
    monkeypatch.delenv(name, raising=False)
    distributed.raise_nccl_errors()
    assert (name, value) == ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")  # CleanUpOnly: no abort
    assert os.environ[name] == "2"
    monkeypatch.setenv(name, "3")
    distributed.raise_nccl_errors()
    assert os.environ[name] == "3"
