"""Nothing lost to a damaged run folder: what a kill, a full disk or a second job leaves
behind, met by the next run of the same folder (real trainer processes)."""
import json
import os
import shutil
import signal
import subprocess

import pytest

from tests.helpers.shard_trees import SHARD_PY, make_aligned
from tests.helpers.trainer_runs import cpu_env, explain, run, single, step_log, train_args


@pytest.fixture(scope="module")
def three_checkpoints(demo_shards, tmp_path_factory):
    """A run folder with checkpoints at steps 2, 4 and 6 (latest: 6)."""
    run_dir = tmp_path_factory.mktemp("three") / "run"
    result = run(single(train_args(run_dir, demo_shards, "--train.ckpt_every=2", "--train.max_steps=6")),
                 cpu_env())
    assert result.returncode == 0, explain(result)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == \
        ["latest", "step_00000002", "step_00000004", "step_00000006"]
    return run_dir


def resume_copy(base, tmp_path, shards, damage) -> tuple:
    """A copy of `base` damaged by damage(checkpoints folder), resumed to step 8."""
    run_dir = tmp_path / "run"
    shutil.copytree(base, run_dir)
    damage(run_dir / "checkpoints")
    result = run(single(train_args(run_dir, shards, "--train.ckpt_every=2", "--train.max_steps=8",
                                   "--train.resume=auto")), cpu_env())
    assert result.returncode == 0, explain(result)
    assert "Traceback" not in result.stderr
    return run_dir / "checkpoints", result.stdout + result.stderr


def flip_a_bit(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.timeout(240)
def test_damaged_newest_checkpoints_are_set_aside_and_the_newest_intact_one_resumes(
        three_checkpoints, demo_shards, tmp_path):
    """The marker deleted (step folders copied into a new run), the newest checkpoint
    missing a member file, the next one with a flipped bit in G's weights: both set aside
    as .damaged with the file and why, the run resumes from step 2 and overwrites nothing."""
    def damage(root):
        (root / "latest").unlink()
        (root / "step_00000006" / "discriminator.safetensors").unlink()
        flip_a_bit(root / "step_00000004" / "generator.safetensors")

    root, said = resume_copy(three_checkpoints, tmp_path, demo_shards, damage)
    assert "latest is missing: resuming from" in said
    assert "discriminator.safetensors: missing: set aside as" in said
    assert "generator.safetensors: its content changed since it was written" in said
    assert "at step 2" in said
    assert {"step_00000006.damaged", "step_00000004.damaged"} <= {p.name for p in root.iterdir()}
    assert (root / "latest").read_text() == "step_00000008"


@pytest.mark.timeout(240)
def test_a_marker_naming_nothing_a_cut_json_and_cut_log_lines_lose_nothing(
        three_checkpoints, demo_shards, tmp_path):
    """`latest` names a deleted folder and the newest checkpoint's trainer.json is cut; the
    next one was written before checkpoints had digests (no digests.json) and resumes. The
    last lines of metrics.jsonl and train_log.jsonl were cut by a kill mid-append (the run
    reads metrics.jsonl at its end): read past with a warning, the next append on a new line."""
    cut = '{"step": 7, "l1": 0.2'  # no newline: the process died mid-write

    def damage(root):
        (root / "latest").write_text("step_00000010")
        trainer = root / "step_00000006" / "trainer.json"
        trainer.write_bytes(trainer.read_bytes()[:40])
        (root / "step_00000004" / "digests.json").unlink()
        for name in ("metrics.jsonl", "train_log.jsonl"):
            with open(root.parent / name, "a") as f:
                f.write(cut)

    root, said = resume_copy(three_checkpoints, tmp_path, demo_shards, damage)
    assert "names step_00000010, which is not intact: resuming from" in said
    assert "trainer.json: 40 bytes" in said and "at step 4" in said
    assert (root / "step_00000006.damaged").is_dir()
    assert "metrics.jsonl: line" in said and "not a whole JSON record" in said
    steps = {}
    for name in ("metrics.jsonl", "train_log.jsonl"):
        lines = (root.parent / name).read_text().splitlines()
        assert cut in lines  # the fragment on its own line, not glued to the next record
        steps[name] = [json.loads(line)["step"] for line in lines if line != cut]
    assert steps == {"metrics.jsonl": [0, 6, 8], "train_log.jsonl": [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]}


@pytest.mark.timeout(240)
def test_a_resume_on_other_data_restarts_the_epoch_instead_of_reusing_its_positions(
        three_checkpoints, demo_shards, tmp_path):
    """--data.train changed between runs: the saved per-stream byte positions belong to
    other tars; the resume says so and starts the epoch of the new data from its
    beginning, reading every sample cleanly."""
    from data_tools.make_demo import main as make_demo
    from data_tools.shard import main as shard

    make_demo([str(tmp_path / "raw"), "--train", "30", "--val", "2", "--size", "64", "--seed", "5"])
    assert shard([str(tmp_path / "raw"), str(tmp_path / "other"), "--quiet", "--workers", "1"]) == 0
    run_dir = tmp_path / "run"
    shutil.copytree(three_checkpoints, run_dir)
    args = train_args(run_dir, demo_shards, "--train.max_steps=9", "--train.resume=auto")
    result = run(single([*args, f"--data.train={tmp_path / 'other'}"]), cpu_env())
    assert result.returncode == 0, explain(result)
    assert "the training data changed" in result.stderr and "restarting epoch 0" in result.stderr
    resumed = [r for r in step_log(run_dir) if r["step"] > 6]
    assert [r["step"] for r in resumed] == [7, 8, 9]
    assert all(not key.startswith("data/skipped_") or value == 0 for r in resumed for key, value in r.items())


@pytest.mark.timeout(120)
def test_resharding_other_data_into_a_folder_drops_its_old_manifest_before_the_first_tar(tmp_path):
    """shard.py into a folder holding another dataset's shards, cut short: no manifest is
    left listing a mix of both, so a training run refuses the folder instead of reading it."""
    make_aligned(tmp_path / "a", {"train": 20, "val": 4})
    make_aligned(tmp_path / "b", {"train": 30, "val": 4}, size=(48, 24))
    dest = tmp_path / "shards"
    options = ["--workers", "1", "--max-samples", "5", "--quiet"]
    subprocess.run(SHARD_PY + [str(tmp_path / "a"), str(dest), *options], check=True, timeout=60)
    assert (dest / "manifest.json").exists()
    rerun = subprocess.run(SHARD_PY + [str(tmp_path / "b"), str(dest), *options], timeout=60,
                           env=dict(os.environ, P2P_FAULT="shard.after_tar:2"))
    assert rerun.returncode == -signal.SIGKILL
    assert not (dest / "manifest.json").exists()
    refused = run(single(train_args(tmp_path / "run", dest)), cpu_env(), timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, explain(refused)
    assert not (tmp_path / "run" / "train_log.jsonl").exists()
