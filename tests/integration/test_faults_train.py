"""Failures a long run meets, each caused for real: a full disk during a checkpoint, NaN
batches under both train.on_nonfinite policies, a rank that dies or freezes on one
machine and across two "nodes" on 127.0.0.1 (the survivor must fail by itself within
train.collective_timeout, never hang)."""
import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from pipeline.distributed import free_port
from tests.helpers.runs import LOSSES, assert_newest_checkpoint_loads, wait_for_step
from tests.helpers.trainer_runs import (
    ROOT,
    accelerate,
    cpu_env,
    deepspeed,
    deepspeed_env,
    explain,
    gloo_env,
    latest,
    run,
    single,
    step_log,
    train_args,
)

QUIET = ("--log.tracker=none", "--data.num_workers=1")


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(os.listdir(run_dir / "checkpoints"))


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# --------------------------------------------------------------------------- disk full

def file_size_limit(limit: int):
    """preexec_fn: no file of the process may grow past `limit` bytes, as a full disk
    would stop it; with SIGXFSZ ignored the write fails with EFBIG instead of killing."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = train_args(run_dir, demo_shards, "--train.ckpt_every=2", "--train.resume=auto", *QUIET)
    first = run(single([*args, "--train.max_steps=2"]), cpu_env(), timeout=120)
    assert first.returncode == 0, explain(first)
    largest = max(p.stat().st_size for p in (run_dir / "checkpoints" / "step_00000002").iterdir())
    full = subprocess.run(single([*args, "--train.max_steps=4"]), cwd=ROOT, env=cpu_env(),
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=file_size_limit(largest - 1))
    assert full.returncode == 1, explain(full)
    message = last_line(full.stderr)
    assert message.startswith("train.py: error: checkpoint at step 4 failed ([Errno 27] File too large)")
    assert message.endswith(f"the previous one (step 2, {run_dir}/checkpoints/step_00000002) is intact")
    assert checkpoints(run_dir) == ["latest", "step_00000002"]  # no step_4, no step_4.tmp
    assert latest(run_dir) == "step_00000002" and assert_newest_checkpoint_loads(run_dir) == 2


# --------------------------------------------------------------------------- NaN / inf

NAN_RUN = ("--train.max_steps=5", "--train.ckpt_every=1", "--train.keep_last=10", *QUIET)


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    folder = run_dir / "checkpoints" / f"step_{step:08d}"
    return {**{f"G.{k}": v for k, v in load_file(folder / "generator.safetensors").items()},
            **{f"D.{k}": v for k, v in load_file(folder / "discriminator.safetensors").items()}}


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_skip_policy_drops_the_nan_step_and_trains_on(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    result = run(single(train_args(run_dir, demo_shards, *NAN_RUN, "--train.on_nonfinite=skip")),
                 cpu_env(P2P_FAULT="train.nonfinite_batch:3"), timeout=120)
    assert result.returncode == 0, explain(result)
    assert "step 3: non-finite loss or gradients; updates skipped: D, G (train.on_nonfinite=skip)" \
        in result.stdout
    records = {r["step"]: r for r in step_log(run_dir)}
    assert records[3]["skipped"] == ["D", "G"] and records[3]["train/skipped_updates"] == 2
    assert all(torch.isfinite(torch.tensor([records[s][k] for k in LOSSES])).all() for s in (1, 2, 4, 5))
    # no update and no BatchNorm statistic from the NaN batch; the steps around it train
    same = lambda s, t: all(torch.equal(a, b) for a, b in zip(weights(run_dir, s).values(),
                                                              weights(run_dir, t).values()))
    assert same(2, 3)
    assert not same(3, 4)
    assert all(torch.isfinite(w).all() for step in range(1, 6) for w in weights(run_dir, step).values())


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_stop_policy_exits_1_before_applying_the_nan_step(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    result = run(single(train_args(run_dir, demo_shards, *NAN_RUN)),  # stop is the default
                 cpu_env(P2P_FAULT="train.nonfinite_batch:3"), timeout=120)
    assert result.returncode == 1, explain(result)
    assert last_line(result.stderr) == (
        "train.py: error: step 3: non-finite gradients in D; stopped before applying them "
        f"(train.on_nonfinite=stop); the newest checkpoint is {run_dir}/checkpoints/step_00000002")
    assert checkpoints(run_dir) == ["latest", "step_00000001", "step_00000002"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_nan_on_one_rank_is_skipped_by_both(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    result = run(accelerate(train_args(run_dir, demo_shards, "--train.max_steps=4", *QUIET,
                                       "--train.on_nonfinite=skip")),
                 gloo_env(P2P_FAULT="train.nonfinite_batch:3@1"))  # rank 1's 3rd batch only
    assert result.returncode == 0, explain(result)
    step_3 = step_log(run_dir)[2]
    # rank 0's own batch was fine, but the all-reduced gradients were not: both skipped
    assert step_3["skipped"] == ["D", "G"]
    assert all(torch.isfinite(torch.tensor([step_3[k] for k in LOSSES])))
    assert "replicas agree: G and D digest" in result.stdout and "on 2 rank(s)" in result.stdout


@pytest.mark.timeout(200)
def test_skip_policy_is_refused_under_deepspeed(demo_shards, tmp_path):
    result = run(deepspeed(train_args(tmp_path / "run", demo_shards, "--train.on_nonfinite=skip"),
                           processes=1), deepspeed_env(), timeout=180)
    assert result.returncode != 0
    assert "train.py: error: train.on_nonfinite: 'skip' is not supported under DeepSpeed" in result.stderr


# --------------------------------------------------------------------------- a rank dies

TIMEOUT = 20  # train.collective_timeout for these runs, seconds
ENDLESS = ("--train.max_steps=100000", f"--train.collective_timeout={TIMEOUT}", *QUIET)


def worker(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    """The training process of `rank` among the launcher's children."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        if child.environ().get("RANK") == str(rank) and "train.py" in " ".join(child.cmdline()):
            return child
    raise LookupError(f"no rank {rank} worker under launcher {launcher.pid}")


def start(command, run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, env=gloo_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_rank_ends_the_job_with_an_error_not_a_hang(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    launcher = start(accelerate(train_args(run_dir, demo_shards, *ENDLESS)), run_dir)
    wait_for_step(run_dir, 2, launcher, timeout=200)
    worker(launcher, 1).kill()
    killed = time.monotonic()
    _, stderr = launcher.communicate(timeout=TIMEOUT + 60)
    assert launcher.returncode != 0
    assert time.monotonic() - killed < TIMEOUT + 30, "the surviving rank hung"
    assert "train.py: error: rank 0 lost contact with another rank" in stderr, stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_frozen_rank_fails_the_other_after_the_collective_timeout(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    launcher = start(accelerate(train_args(run_dir, demo_shards, *ENDLESS)), run_dir)
    wait_for_step(run_dir, 2, launcher, timeout=200)
    frozen, survivor = worker(launcher, 1), worker(launcher, 0)
    frozen.suspend()  # SIGSTOP: its sockets stay open, only the timeout can end the wait
    stopped = time.monotonic()
    survivor.wait(timeout=TIMEOUT + 60)
    waited = time.monotonic() - stopped
    frozen.kill()
    _, stderr = launcher.communicate(timeout=60)
    assert TIMEOUT - 2 < waited < TIMEOUT + 30, waited
    assert "[rank 0] exiting with code 1" in stderr
    assert "train.py: error: rank 0 lost contact with another rank" in stderr, stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_surviving_node_fails_by_itself_when_the_other_nodes_rank_dies(demo_shards, tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    args = train_args(run_dir, demo_shards, *ENDLESS)
    nodes = [start(accelerate(args, processes=2, machines=2, machine_rank=rank, port=port), run_dir)
             for rank in (0, 1)]
    wait_for_step(run_dir, 2, nodes[0], timeout=200)
    worker(nodes[1], 1).kill()
    killed = time.monotonic()
    _, stderr = nodes[0].communicate(timeout=TIMEOUT + 60)
    assert time.monotonic() - killed < TIMEOUT + 30, "node 0 hung"
    assert nodes[0].returncode != 0 and nodes[1].wait(timeout=60) != 0
    assert "train.py: error: rank 0 lost contact with another rank" in stderr, stderr[-3000:]
