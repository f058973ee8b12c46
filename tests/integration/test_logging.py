"""One logging set-up for every process (pipeline/cli.py): a 2-process run's lines carry
their rank, and INFO lines from the data stream (which had no handler before) are seen."""
import re

import pytest

from tests.helpers.trainer_runs import accelerate, cpu_env, explain, gloo_env, run, single, train_args


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_log_with_their_rank_and_the_data_streams_info(demo_shards, tmp_path):
    args = train_args(tmp_path / "run", demo_shards, "--train.max_steps=2", "--log.tracker=none")
    result = run(accelerate(args, processes=2), gloo_env())
    assert result.returncode == 0, explain(result)
    out = result.stdout.splitlines()
    for rank in (0, 1):  # every rank's own data stream says what its epoch plans
        assert any(re.fullmatch(rf"\[rank {rank}\] data: epoch 0 plans \d+ steps on each of 2 rank\(s\) "
                                r"from \d+ streams",
                                line) for line in out), explain(result)
    assert any(line.startswith("[rank 0] replicas agree") for line in out), explain(result)
    # the trainer's own lines are never unprefixed in a multi-process run
    ours = [line for line in out if "replicas agree" in line or "data: epoch" in line]
    assert ours and all(line.startswith("[rank ") for line in ours)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_log_level_from_the_config_hides_info(demo_shards, tmp_path):
    args = train_args(tmp_path / "run", demo_shards, "--train.max_steps=1", "--log.tracker=none",
                      "--log.level=warning")
    result = run(single(args), cpu_env())
    assert result.returncode == 0, explain(result)
    assert "data: epoch 0 plans" not in result.stdout and "replicas agree" not in result.stdout
