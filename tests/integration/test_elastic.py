"""Elastic runs, launched for real (CPU, gloo): a checkpoint of 2 processes resumed on 1
and of 1 on 2 continues the epoch at the next global batch (data.record_keys shows every
step's keys), and a worker killed under `--max_restarts` is restarted by the agent and
resumes by itself."""
import json
from collections import defaultdict
from pathlib import Path

import pytest

from pipeline import checkpoint
from tests.helpers.images import write_dataset
from tests.helpers.trainer_runs import accelerate, cpu_env, explain, gloo_env, run, single, train_args

pytestmark = pytest.mark.slow  # trainer launches: 10-30 s each on 2 cores

STREAMS = ["--data.streams=8", "--data.record_keys=true", "--data.num_workers=1",
           "--train.ckpt_every=3", "--data.batch_size=2"]
BAD = "s01n003"  # a corrupt input image: its stream refills it, then ends epoch 0 a round early


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


@pytest.mark.timeout(400)
def test_resume_on_another_world_size_continues_the_epoch(shards, tmp_path):
    folder, good = shards
    whole = tmp_path / "whole"  # 2 processes, 8 steps of a global batch of 4
    train(2, whole, folder, "--train.max_steps=8")
    expected = global_batches(whole)
    assert sorted(expected) == list(range(1, 9))
    epoch0 = [k for step in range(1, 7) for k in expected[step][1]]
    assert {expected[s][0] for s in range(1, 7)} == {0} and expected[7][0] == 1
    # 31 good samples in 8 streams: the corrupt one's stream has 3 good, so epoch 0 is
    # 3 rounds of 8 = 6 steps of 4; the other 7 wait for the next epoch (the stated tail)
    assert len(epoch0) == len(set(epoch0)) == 24 and set(epoch0) <= set(good)

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

    # 1 -> 2: one process (grad_accum 2) to step 3, then two processes in the same run folder
    one_to_two = tmp_path / "one_to_two"
    train(1, one_to_two, folder, "--train.max_steps=3", "--train.grad_accum=2")
    (one_to_two / "keys" / "rank0.jsonl").write_text(  # a record past the checkpoint: dropped
        (one_to_two / "keys" / "rank0.jsonl").read_text() + json.dumps(
            {"step": 4, "epoch": 0, "keys": ["stale"]}) + "\n")
    train(2, one_to_two, folder, "--train.max_steps=8", "--train.resume=auto")
    assert global_batches(one_to_two) == expected


@pytest.mark.timeout(120)
def test_a_global_batch_that_cannot_be_kept_is_refused(shards, tmp_path):
    folder, _ = shards
    run_dir = tmp_path / "run"
    train(1, run_dir, folder, "--train.max_steps=3")
    refused = run(single(train_args(run_dir, folder, *STREAMS, "--train.max_steps=4",
                                    "--train.resume=auto", "--data.batch_size=3")), cpu_env())
    assert refused.returncode == 2, explain(refused)
    message = refused.stderr.strip().splitlines()[-1]
    assert "the global batch would change from 2 (2 x 1 x 1 processes) to 3" in message
    assert "--train.allow_batch_change=true" in message
    allowed = run(single(train_args(run_dir, folder, *STREAMS, "--train.max_steps=4",
                                    "--train.resume=auto", "--data.batch_size=3",
                                    "--train.allow_batch_change=true")), cpu_env())
    assert allowed.returncode == 0, explain(allowed)
