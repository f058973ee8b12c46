"""SIGKILL at named moments (P2P_FAULT, pipeline/faults.py) and at seeded random times:
the newest complete checkpoint always loads, `--train.resume=auto` finishes the run, and
the resumed losses equal the uninterrupted run's bit for bit (CPU); a killed shard.py
re-run gives the same bytes as an uninterrupted one."""
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.runs import LOSSES, assert_newest_checkpoint_loads, losses_by_step
from tests.helpers.shard_trees import SHARD_PY, make_aligned, tree
from tests.helpers.trainer_runs import ROOT, cpu_env, explain, latest, run, single, step_log, train_args

STEPS = 6
# ckpt_every=1 and keep_last=2: every step commits and rotates, so each point is reached
RUN = (f"--train.max_steps={STEPS}", "--train.ckpt_every=1", "--train.keep_last=2",
       "--log.tracker=none", "--data.num_workers=1")


@pytest.fixture(scope="module")
def reference(demo_shards, tmp_path_factory):
    """The uninterrupted run: step -> losses."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run(single(train_args(run_dir, demo_shards, *RUN)), cpu_env(), timeout=120)
    assert result.returncode == 0, explain(result)
    return losses_by_step(step_log(run_dir))


def assert_losses_match(run_dir: Path, reference: dict) -> None:
    """Every logged step of every segment, killed ones included, equals the reference:
    a resumed segment re-logs the steps after its checkpoint with the same numbers."""
    records = step_log(run_dir)
    assert sorted({r["step"] for r in records}) == list(range(1, STEPS + 1))
    for record in records:
        assert [record[k] for k in LOSSES] == reference[record["step"]], record["step"]


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("point", ["checkpoint.after_models:3", "checkpoint.staged:3",
                                   "checkpoint.renamed:3", "checkpoint.rotating:2"])
def test_kill_at_a_checkpoint_fault_point_then_resume(point, reference, demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    killed = run(single(train_args(run_dir, demo_shards, *RUN)), cpu_env(P2P_FAULT=point),
                 timeout=120)
    assert killed.returncode == -signal.SIGKILL, explain(killed)
    newest = assert_newest_checkpoint_loads(run_dir)
    # the 3rd save is step 3's; rotation starts at step 3 (keep_last 2), its 2nd at step 4
    assert newest == {"checkpoint.after_models:3": 2, "checkpoint.staged:3": 2,
                      "checkpoint.renamed:3": 2, "checkpoint.rotating:2": 4}[point]
    resumed = run(single(train_args(run_dir, demo_shards, *RUN, "--train.resume=auto")),
                  cpu_env(), timeout=120)
    assert resumed.returncode == 0, explain(resumed)
    assert f"at step {newest}" in resumed.stdout
    assert latest(run_dir) == f"step_{STEPS:08d}"
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["latest", "step_00000005", "step_00000006"]
    assert_losses_match(run_dir, reference)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("point", ["shard.after_tar:3", "shard.before_manifest"])
def test_kill_shard_py_at_a_commit_step_then_rerun(point, tmp_path):
    make_aligned(tmp_path / "src", {"train": 40, "val": 8})
    args = [str(tmp_path / "src"), "--workers", "1", "--max-samples", "5", "--quiet"]
    subprocess.run(SHARD_PY + [args[0], str(tmp_path / "ref")] + args[1:], check=True, timeout=60)
    dest = tmp_path / "out"
    killed = subprocess.run(SHARD_PY + [args[0], str(dest)] + args[1:], timeout=60,
                            env=dict(os.environ, P2P_FAULT=point))
    assert killed.returncode == -signal.SIGKILL
    assert not (dest / "manifest.json").exists()
    subprocess.run(SHARD_PY + [args[0], str(dest)] + args[1:], check=True, timeout=60)
    assert tree(dest) == tree(tmp_path / "ref")


# --------------------------------------------------------------------------- random kills

KILLS = int(os.environ.get("P2P_RANDOM_KILLS", "8"))  # 20, then 14, until the suite needed the time back
RANDOM_STEPS = 160
RANDOM_RUN = (f"--train.max_steps={RANDOM_STEPS}", "--train.keep_last=2", "--log.tracker=none",
              "--data.num_workers=1")


def logged_steps(run_dir: Path) -> int:
    log = run_dir / "train_log.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def run_reference(command, run_dir: Path) -> float:
    """Runs `command` to the end; returns how long its start-up took (here, now)."""
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, env=cpu_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    while not logged_steps(run_dir) and process.poll() is None:
        time.sleep(0.05)
    startup = time.monotonic() - started
    _, stderr = process.communicate(timeout=200)
    assert process.returncode == 0, stderr[-3000:]
    return startup


def kill_at_random(command, run_dir: Path, rng: random.Random, startup: float) -> None:
    """Start a segment and SIGKILL it: 1 time in 4 during start-up (imports, resume), else
    0-0.6 s after its first step (training, checkpoint writes, commits, rotation)."""
    before = logged_steps(run_dir)
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, env=cpu_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    if rng.random() < 0.25:
        deadline = started + rng.uniform(0.3, 1.0) * startup
    else:
        while logged_steps(run_dir) == before and process.poll() is None:
            time.sleep(0.02)
        deadline = time.monotonic() + rng.uniform(0.0, 0.6)
    try:
        process.wait(timeout=max(0.0, deadline - time.monotonic()))
        pytest.fail("a segment finished the run before its kill: raise RANDOM_STEPS")
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_seeded_random_kills_never_lose_a_checkpoint_or_change_the_losses(demo_shards, tmp_path):
    """One run (checkpoint every 2 steps) SIGKILLed KILLS times at seeded random moments,
    resumed with resume=auto each time, then left to finish: after each kill the newest
    checkpoint loads and none is lost; every logged step of every segment, killed ones
    included, equals the uninterrupted run's."""
    startup = run_reference(single(train_args(tmp_path / "whole", demo_shards, *RANDOM_RUN)),
                            tmp_path / "whole")
    reference = losses_by_step(step_log(tmp_path / "whole"))
    run_dir, rng = tmp_path / "run", random.Random(10)
    command = single(train_args(run_dir, demo_shards, *RANDOM_RUN, "--train.ckpt_every=2",
                                "--train.resume=auto"))
    newest, resumed_at = None, []
    for kill in range(KILLS):
        kill_at_random(command, run_dir, rng, startup)
        step = assert_newest_checkpoint_loads(run_dir)
        assert newest is None or step >= newest, f"kill {kill + 1} lost a committed checkpoint"
        newest = step
        resumed_at.append(step)
    final = run(command, cpu_env(), timeout=200)
    assert final.returncode == 0, explain(final)
    records = step_log(run_dir)
    assert sorted({r["step"] for r in records}) == list(range(1, RANDOM_STEPS + 1))
    for record in records:
        assert [record[k] for k in LOSSES] == reference[record["step"]], record["step"]
    print(f"{KILLS} kills; newest checkpoint after each: {resumed_at}; "
          f"{len(records)} step records for {RANDOM_STEPS} steps")
