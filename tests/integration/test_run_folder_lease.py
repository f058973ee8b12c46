"""One writer per run folder (pipeline/lease.py), with real trainer processes: two started
together, a second started while the first checkpoints, a requeued job's successor, a
holder killed by SIGKILL; and the expiry of a holder on another host, in-process."""
import json
import os
import signal
import socket
import subprocess
import time

import pytest

from pipeline import lease
from tests.helpers.runs import assert_newest_checkpoint_loads, wait_for_step
from tests.helpers.trainer_runs import ROOT, cpu_env, explain, run, single, step_log, train_args


def start(run_dir, shards, *extra, env=None) -> subprocess.Popen:
    return subprocess.Popen(single(train_args(run_dir, shards, *extra)), cwd=ROOT, env=env or cpu_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(process, timeout=240) -> tuple[int, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out + err


def refused_in_one_line(said: str) -> bool:
    return "is in use by" in said and "Traceback" not in said and said.count("error:") == 1


@pytest.mark.timeout(300)
def test_two_trainers_started_together_one_runs_the_other_is_refused(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    both = [start(run_dir, demo_shards, "--train.max_steps=3", f"--train.seed={seed}") for seed in (1, 2)]
    (code_a, said_a), (code_b, said_b) = (finish(p) for p in both)
    assert sorted([code_a, code_b]) == [0, 2], said_a + said_b
    assert refused_in_one_line(said_b if code_b == 2 else said_a)
    assert [r["step"] for r in step_log(run_dir)] == [1, 2, 3]  # one run's rows only
    winner = 1 if code_a == 0 else 2
    assert f"seed: {winner}" in (run_dir / "config.yaml").read_text()
    assert not (run_dir / lease.FILE).exists()  # released at the end


@pytest.mark.timeout(300)
def test_a_second_start_is_refused_while_the_first_runs_and_takes_over_once_it_is_killed(
        demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    first = start(run_dir, demo_shards, "--train.max_steps=400", "--train.ckpt_every=1")
    wait_for_step(run_dir, 3, first)
    second = run(single(train_args(run_dir, demo_shards, "--train.max_steps=400",
                                   "--train.resume=auto")), cpu_env(), timeout=120)
    assert second.returncode == 2 and refused_in_one_line(second.stdout + second.stderr), explain(second)
    assert "heartbeat" in second.stderr and f"pid {first.pid}" in second.stderr
    os.killpg(first.pid, signal.SIGKILL)  # its lease stays behind, its flock does not
    first.wait(timeout=30)
    stopped_at = assert_newest_checkpoint_loads(run_dir)
    third = run(single(train_args(run_dir, demo_shards, f"--train.max_steps={stopped_at + 2}",
                                  "--train.ckpt_every=1", "--train.resume=auto")), cpu_env())
    assert third.returncode == 0, explain(third)
    assert f"pid {first.pid}" in third.stderr and "is gone: taking the run folder over" in third.stderr
    assert f"at step {stopped_at}" in third.stdout + third.stderr
    assert assert_newest_checkpoint_loads(run_dir) == stopped_at + 2


@pytest.mark.timeout(300)
def test_a_requeued_job_waits_for_its_predecessor_then_resumes_where_it_stopped(demo_shards, tmp_path):
    """A Slurm requeue that overlaps the old job (the same job id, a higher
    SLURM_RESTART_COUNT): the successor waits until the old one has checkpointed and
    released the folder, then continues from its checkpoint."""
    run_dir = tmp_path / "run"
    old = start(run_dir, demo_shards, "--train.max_steps=400", "--train.ckpt_every=1000",
                env=cpu_env(SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="0"))
    wait_for_step(run_dir, 2, old)
    said = tmp_path / "new.log"
    with open(said, "w") as log:
        new = subprocess.Popen(single(train_args(run_dir, demo_shards, "--train.max_steps=400",
                                                 "--train.resume=auto")),
                               cwd=ROOT, env=cpu_env(SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="1"),
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while "waiting up to 70 s for slurm job 4242" not in said.read_text():
        assert new.poll() is None and time.monotonic() < deadline, said.read_text()  # not refused
        time.sleep(0.2)
    os.killpg(old.pid, signal.SIGTERM)  # the old job's end: checkpoint at the next step, release
    assert finish(old)[0] == 0
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step_"))
    wait_for_step(run_dir, stopped_at + 1, new)
    os.killpg(new.pid, signal.SIGTERM)
    assert new.wait(timeout=120) == 0, said.read_text()
    resumed = f"resumed from {run_dir}/checkpoints/step_{stopped_at:08d} at step {stopped_at}"
    assert resumed in said.read_text()


def test_a_holder_on_another_host_is_waited_for_until_its_heartbeat_expires(tmp_path):
    """What no single machine can do for real: the holder's host differs (its flock, if
    any, is not ours to see); a fresh heartbeat refuses, an expired one is taken over."""
    path = tmp_path / lease.FILE
    holder = {"host": "node-b", "pid": 4321, "job": "slurm job 7", "generation": [0, 0]}
    path.write_text(json.dumps({**holder, "heartbeat": time.time()}))
    with pytest.raises(lease.UserError, match="in use by slurm job 7 .pid 4321 on node-b"):
        lease.Lease(str(tmp_path), seconds=30).acquire()
    path.write_text(json.dumps({**holder, "heartbeat": time.time() - 31}))
    held = lease.Lease(str(tmp_path), seconds=30)
    held.acquire()
    try:
        assert json.loads(path.read_text())["host"] == socket.gethostname()
    finally:
        held.release()
    assert not path.exists()
