"""pipeline.checkpoint in-process: a save that must not commit is refused, and the
previous checkpoint stays the newest (the faults a real run meets:
tests/integration/test_faults_train.py); the global batch a resume keeps; the latest
checkpoint found in one place; what the start-up gate checks of a checkpoint to resume."""
import json
import os
import re

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


# ----------------------------------------------------------------------- the global batch

def saved_on(tmp_path, world_size: int, batch_size: int, grad_accum: int) -> str:
    """A checkpoint folder holding only its trainer.json, as checkpoint.save writes it."""
    cfg = Config()
    cfg.data.batch_size, cfg.train.grad_accum = batch_size, grad_accum
    folder = tmp_path / "step_00000010"
    folder.mkdir()
    info = checkpoint.TrainerInfo(10, world_size, to_dict(cfg), "bf16")
    (folder / checkpoint.TRAINER).write_text(json.dumps(info.to_json()))
    assert checkpoint.read_trainer(str(folder)) == info
    return str(folder)


@pytest.mark.parametrize("saved,world,expected", [
    ((4, 1, 2), 2, (1, 4)),  # 1 x 2 x 4 processes = 8 on 2: accumulation doubles
    ((1, 2, 2), 2, (2, 1)),  # 2 x 2 x 1 = 4 on 2: accumulation halves
    ((2, 3, 1), 3, (2, 1)),  # 3 x 1 x 2 = 6 on 3: not by accumulation (6 / 9), by the batch
])
def test_a_resume_on_another_world_keeps_the_global_batch(tmp_path, saved, world, expected):
    from pipeline.elastic import keep_global_batch
    saved_world, batch, accum = saved
    path = saved_on(tmp_path, saved_world, batch, accum)
    cfg = Config()
    cfg.data.batch_size, cfg.train.grad_accum = batch, accum
    layout = keep_global_batch(cfg, world, path)
    assert layout.global_batch == saved_world * batch * accum and layout.world_size == world
    assert (layout.batch_size, layout.grad_accum) == expected
    assert (cfg.data.batch_size, cfg.train.grad_accum) == expected  # what the loaders read


def test_a_global_batch_that_cannot_be_kept_is_refused_unless_allowed(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.elastic import keep_global_batch
    path = saved_on(tmp_path, 2, 1, 1)  # 2 samples per update: 3 processes cannot make it
    with pytest.raises(ConfigError, match=r"from 2 \(1 x 1 x 2 processes\) to 3 \(1 x 1 x 3 processes\)"):
        keep_global_batch(Config(), 3, path)
    allowed = Config()
    allowed.train.allow_batch_change = True
    assert keep_global_batch(allowed, 3, path).global_batch == 3


# ----------------------------------------------------------------------- the latest, found once

def test_every_reader_finds_the_same_latest_checkpoint(tmp_path):
    """checkpoint.latest is the one place `latest` is read: a resume (which also verifies
    it), resolve, generator_folder (a run folder or its marker) and the trainer's messages
    all take it, the `.old` copy that a crash inside the commit leaves included."""
    from pipeline import resume

    ranks = checkpoint.Ranks(rank=0, world_size=1, barrier=lambda: None, any_rank=lambda flag: flag)
    for step in (1, 2):
        snapshot = checkpoint.Snapshot(
            save_models=lambda staging, rank: None, generator_state={"w": torch.ones(2)},
            discriminator_state={"v": torch.ones(2)}, data_state={}, config=to_dict(Config()))
        checkpoint.save(str(tmp_path), step, snapshot, ranks, keep_last=3)
    root = tmp_path / "checkpoints"
    os.replace(root / "step_00000002", root / "step_00000002.old")  # the crash, mid-commit
    newest = str(root / "step_00000002.old")
    assert checkpoint.latest(str(tmp_path)) == newest
    assert checkpoint.resolve(str(tmp_path), "auto") == newest
    assert checkpoint.generator_folder(str(tmp_path)) == newest
    assert checkpoint.generator_folder(str(root / "latest")) == newest
    assert resume.choose(str(tmp_path), "auto") == newest
    assert checkpoint.latest(str(tmp_path / "elsewhere")) is None


# ----------------------------------------------------------------------- what a resume must match

def launch(engine: str = "ddp", used: str = "no"):
    from pipeline import precision, startup
    return startup.Launch(engine, precision.Precision(used, used, "a test"), ())


@pytest.mark.parametrize("engine,deepspeed_folders,message", [
    ("deepspeed", False, "no DeepSpeed checkpoint (saved without DeepSpeed? resume it without DeepSpeed)"),
    ("ddp", True, "is a DeepSpeed checkpoint: resume it with DeepSpeed"),
])
def test_a_checkpoint_of_the_other_engine_kind_is_refused_at_start_up(tmp_path, engine,
                                                                       deepspeed_folders, message):
    from pipeline import startup
    from pipeline.errors import CheckpointMismatch
    path = saved_on(tmp_path, 1, 1, 1)
    if deepspeed_folders:
        os.makedirs(os.path.join(path, "G"))
    with pytest.raises(CheckpointMismatch, match=re.escape(message)):
        startup.check_resume(Config(), path, launch(engine), main_process=True)


def test_another_architecture_is_refused_and_another_precision_warned_at_start_up(tmp_path, caplog):
    from pipeline import startup
    from pipeline.errors import CheckpointMismatch
    path = saved_on(tmp_path, 1, 1, 1)  # trained in bf16
    other = Config()
    other.model.g_filters = 32
    with pytest.raises(CheckpointMismatch, match="model.g_filters 64 -> 32"):
        startup.check_resume(other, path, launch(), main_process=True)
    with caplog.at_level("WARNING", logger="pipeline.startup"):
        saved = startup.check_resume(Config(), path, launch(used="no"), main_process=True)
    assert saved.step == 10 and "was trained in bf16, this run continues in fp32" in caplog.text
