"""CPU runs keep freed large blocks: the step's large tensors stop page-faulting anew."""
import subprocess
import sys

import pytest

# the step's pattern: a bf16 gradient cast back to a 33 MiB fp32 tensor, freed after use;
# after a warm-up, print the minor page faults of 5 more
FAULTS = """
import resource, sys, torch
from pipeline import host_memory
kept = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else None
grad = torch.ones(33 * 2**18, dtype=torch.bfloat16)
for _ in range(10):
    grad.float()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    grad.float()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[str, int]:
    run = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
    kept, count = run.stdout.split()
    return kept, int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_blocks_are_reused_instead_of_faulted_in_on_every_allocation():
    _, default = faults("glibc")
    kept, reused = faults("keep")
    assert kept == "True"
    assert default >= 5 * 8448  # glibc: each 33 MiB block mmapped and faulted in again
    assert reused < default / 20
