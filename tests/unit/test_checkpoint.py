"""pipeline.checkpoint in-process: a save that must not commit is refused, and the
previous checkpoint stays the newest (the faults a real run meets:
tests/integration/test_faults_train.py)."""
import os

import pytest
import torch

from pipeline import checkpoint
from pipeline.config import Config, to_dict


def checkpoints(run_dir) -> list[str]:
    return sorted(os.listdir(run_dir / "checkpoints"))


def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path):
    ranks = checkpoint.Ranks(rank=0, world_size=1, barrier=lambda: None, any_rank=lambda flag: flag)

    def save(step, weight):
        snapshot = checkpoint.Snapshot(
            save_models=lambda staging, rank: None, generator_state={"w": torch.tensor([1.0, weight])},
            discriminator_state={"v": torch.ones(2)}, data_state={}, config=to_dict(Config()))
        return checkpoint.save(str(tmp_path), step, snapshot, ranks, keep_last=3)
    save(1, 2.0)
    with pytest.raises(checkpoint.CheckpointError) as refused:
        save(2, float("nan"))
    assert str(refused.value) == (
        "checkpoint at step 2 refused: non-finite weights (generator.w); "
        f"the previous one (step 1, {tmp_path}/checkpoints/step_00000001) is intact")
    assert checkpoints(tmp_path) == ["latest", "step_00000001"]
