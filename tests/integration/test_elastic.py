"""Elastic runs, launched for real (CPU, gloo): a checkpoint of 2 processes resumed on 1
and of 1 on 2 continues the epoch at the next global batch (data.record_keys shows every
step's keys), and a worker killed under `--max_restarts` is restarted by the agent and
resumes by itself."""
import json
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from pipeline import checkpoint
from pipeline.distributed import free_port
from tests.helpers.images import write_dataset
from tests.helpers.runs import losses_by_step
from tests.helpers.trainer_runs import (
    ROOT,
    TRAIN,
    accelerate,
    cpu_env,
    explain,
    gloo_env,
    run,
    single,
    step_log,
    train_args,
)

pytestmark = pytest.mark.slow  # trainer launches: 10-30 s each on 2 cores

STREAMS = ["--data.streams=8", "--data.record_keys=true", "--data.num_workers=1",
           "--train.ckpt_every=3", "--data.batch_size=2"]
BAD = "s01n003"  # a corrupt input image: its stream refills it, then runs dry a round early


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[str, list[str]]:
    """32 listed pairs in 4 shards (one corrupt) and 2 val pairs; returns (folder, good keys)."""
    folder = tmp_path_factory.mktemp("elastic") / "shards"
    keys = write_dataset(folder, [8, 8, 8, 8], corrupt=(BAD,))
    write_dataset(folder, [2], split="val", prefix="v")
    return str(folder), [k for k in keys if k != BAD]


def global_batches(run_dir) -> dict[int, tuple[int, frozenset]]:
    """step -> (epoch, every rank's keys of that step), from RUN/keys/rank*.jsonl."""
    steps = defaultdict(lambda: (None, frozenset()))
    for path in sorted(Path(run_dir, "keys").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            epoch, keys = steps[record["step"]]
            assert epoch in (None, record["epoch"]), record
            assert not keys & set(record["keys"]), f"step {record['step']}: a key on two ranks"
            steps[record["step"]] = (record["epoch"], keys | set(record["keys"]))
    return dict(steps)


def launch(processes):
    return (lambda args: accelerate(args, processes=2)) if processes == 2 else single


def train(processes, run_dir, shards, *extra):
    result = run(launch(processes)(train_args(run_dir, shards, *STREAMS, *extra)),
                 gloo_env() if processes == 2 else cpu_env())
    assert result.returncode == 0, explain(result)
    return result


@pytest.fixture(scope="module")
def whole(shards, tmp_path_factory) -> Path:
    """The uninterrupted run: 2 processes, 8 steps of a global batch of 4."""
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    train(2, run_dir, shards[0], "--train.max_steps=8")
    return run_dir


@pytest.mark.timeout(400)
def test_resume_on_another_world_size_continues_the_epoch(shards, whole, tmp_path):
    folder, good = shards
    expected = global_batches(whole)
    assert sorted(expected) == list(range(1, 9))
    epoch0 = [k for step in range(1, 8) for k in expected[step][1]]
    assert {expected[s][0] for s in range(1, 8)} == {0} and expected[8][0] == 1
    # 31 good samples in 8 streams: the corrupt one's stream runs dry after 3 rounds of 8
    # (6 steps of 4); the other streams' 7 left make the epoch's tail: one step, and 3
    # samples (less than a global batch) wait for the next epoch
    assert len(epoch0) == len(set(epoch0)) == 28 and set(epoch0) <= set(good)

    # 2 -> 1: the checkpoint at step 3 (mid-epoch) resumed by one process, same flags:
    # the global batch is kept by train.grad_accum=2
    two_to_one = tmp_path / "two_to_one"
    resumed = train(1, two_to_one, folder, "--train.max_steps=8",
                    f"--train.resume={whole / 'checkpoints' / checkpoint.step_name(3)}")
    said = resumed.stderr + resumed.stdout
    assert "global batch 4 kept as data.batch_size=2 x train.grad_accum=2 x 1" in said
    assert "continues epoch 0 at global sample 12" in said
    got = global_batches(two_to_one)
    assert {s: expected[s] for s in range(4, 9)} == got

    # 1 -> 2: one process (grad_accum 2) through the tail to step 7, whose checkpoint is
    # inside it, then two processes in the same run folder: the 3 left end epoch 0 there
    one_to_two = tmp_path / "one_to_two"
    train(1, one_to_two, folder, "--train.max_steps=7", "--train.grad_accum=2")
    (one_to_two / "keys" / "rank0.jsonl").write_text(  # a record past the checkpoint: dropped
        (one_to_two / "keys" / "rank0.jsonl").read_text() + json.dumps(
            {"step": 8, "epoch": 0, "keys": ["stale"]}) + "\n")
    train(2, one_to_two, folder, "--train.max_steps=8", "--train.resume=auto")
    assert global_batches(one_to_two) == expected


@pytest.mark.timeout(120)
def test_a_global_batch_that_cannot_be_kept_is_refused(shards, whole, tmp_path):
    folder, _ = shards
    step3 = f"--train.resume={whole / 'checkpoints' / checkpoint.step_name(3)}"
    args = lambda *extra: single(train_args(tmp_path / "run", folder, *STREAMS, "--train.max_steps=4",
                                            step3, "--data.batch_size=3", *extra))
    refused = run(args(), cpu_env())
    assert refused.returncode == 2, explain(refused)
    message = refused.stderr.strip().splitlines()[-1]
    assert "the global batch would change from 4 (2 x 1 x 2 processes) to 3 (3 x 1 x 1 processes)" in message
    assert "--train.allow_batch_change=true" in message
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before anything was written
    allowed = run(args("--train.allow_batch_change=true"), cpu_env())
    assert allowed.returncode == 0, explain(allowed)
    assert "step 4: checkpoint" in allowed.stdout + allowed.stderr


def p2p_train(run_dir, folder, restarts: int, fault: str, *extra):
    """p2p-train of 2 CPU processes under torchrun's elastic agent, a worker SIGKILLed at
    the fault point (P2P_FAULT, pipeline/faults.py) in every start."""
    launcher = ["--config_file", str(ROOT / "launch" / "accelerate" / "cpu_2proc.yaml"),
                "--main_process_port", str(free_port()), "--mixed_precision", "no",
                "--max_restarts", str(restarts), "--monitor_interval", "0.5"]
    command = [sys.executable, "-m", "pipeline.launch", *launcher, "--",
               *train_args(run_dir, folder, *STREAMS, *extra)]
    return run(command, gloo_env(P2P_FAULT=fault), timeout=300)


def last_records(run_dir) -> list[dict]:
    """The step log, each step's last record (a restarted group logs some steps again)."""
    return list({r["step"]: r for r in step_log(run_dir)}.values())


@pytest.mark.timeout(400)
def test_a_killed_worker_is_restarted_and_the_run_resumes_by_itself(shards, whole, tmp_path):
    run_dir = tmp_path / "run"
    # rank 1 dies at its 5th step; the restarted group resumes from step 4 (ckpt_every=2),
    # so the new rank 1 never reaches a 5th step
    result = p2p_train(run_dir, shards[0], 1, "train.step:5@1", "--train.max_steps=8",
                       "--train.ckpt_every=2")
    assert result.returncode == 0, explain(result)
    said = result.stdout + result.stderr
    assert "restart 1 by the elastic agent: resuming from the latest checkpoint" in said
    assert "the elastic agent restarts the group from the newest checkpoint (restart 1 of 1)" in said
    assert "resumed from" in said and "at step 4" in said
    got, expected = losses_by_step(last_records(run_dir)), losses_by_step(step_log(whole))
    assert sorted(got) == list(range(1, 9))
    for step in range(5, 9):
        assert got[step] == expected[step], f"step {step} differs after the restart"
    assert global_batches(run_dir) == global_batches(whole)  # steps 5.. recorded once, as before


@pytest.mark.timeout(300)
def test_a_restart_loop_ends_after_max_restarts_in_one_line(shards, tmp_path):
    result = p2p_train(tmp_path / "run", shards[0], 1, "train.step:1@1", "--train.max_steps=4")
    assert result.returncode == 1, explain(result)
    assert result.stderr.strip().splitlines()[-1] == (
        "p2p-train: the run failed again after 1 restart(s) by the elastic agent (--max_restarts): "
        "the newest checkpoint stays; --train.resume=auto continues from it")
    assert "ChildFailedError" not in result.stderr


# what a multi-node elastic run needs (accelerate's default rendezvous is static, and a
# c10d agent restarted by another node's failure counts no restart: --train.resume=auto)
ELASTIC = ["--rdzv_backend", "c10d", "--max_restarts", "1", "--monitor_interval", "0.5"]
FRESH_STORES = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # p2p-train sets it itself


def wait_for_port(port: int, process, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {port}")


@pytest.mark.timeout(400)
def test_two_nodes_restart_together_through_a_c10d_rendezvous(shards, whole, tmp_path):
    """2 loopback "nodes" of 1 process: node 1's worker dies; both agents restart their
    workers, which meet again at the c10d rendezvous and resume from the checkpoint."""
    run_dir, port = tmp_path / "run", free_port()
    args = train_args(run_dir, shards[0], *STREAMS, "--train.max_steps=8", "--train.ckpt_every=2",
                      "--train.resume=auto")
    def node(rank):
        command = accelerate(args, processes=2, machines=2, machine_rank=rank, port=port)
        at = command.index(TRAIN)
        return subprocess.Popen(command[:at] + ELASTIC + command[at:], cwd=ROOT, text=True,
                                env=gloo_env(P2P_FAULT="train.step:5@1", **FRESH_STORES),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    nodes = [node(0)]
    wait_for_port(port, nodes[0])  # node 0's agent hosts the rendezvous: 127.0.0.1 is both's
    nodes.append(node(1))
    outputs = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs
    assert "resumed from" in outputs[0][0] + outputs[0][1] and "at step 4" in outputs[0][0] + outputs[0][1]
    got, expected = losses_by_step(last_records(run_dir)), losses_by_step(step_log(whole))
    for step in range(5, 9):
        assert got[step] == expected[step], f"step {step} differs after the restart"
