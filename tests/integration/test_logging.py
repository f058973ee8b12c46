"""One logging set-up for every process (pipeline/cli.py): a 2-process run's lines carry
their rank, each line of a multi-line message too, and INFO lines from the data stream
(which had no handler before) are seen. Progress written to a file is plain lines, there
while the run goes on (pipeline/progress.py)."""
import re
import subprocess
import sys
import time

import pytest

from pipeline.distributed import free_port
from pipeline.progress import INTERVAL_ENV
from tests.helpers.trainer_runs import ROOT, cpu_env, explain, gloo_env, run, single, train_args

STEPS = 8


def p2p_train_into_a_file(args: list[str], env: dict, log_path) -> tuple[subprocess.Popen, str]:
    """p2p-train of 2 CPU ranks, its stdout and stderr redirected to one file as a user's
    `> log 2>&1` does; (the process, the first progress line, read while it runs)."""
    command = [sys.executable, "-m", "pipeline.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
               "--mixed_precision", "no", "--", *args]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline, pattern = time.monotonic() + 200, re.compile(rf"\[rank 0\] step \d+/{STEPS} \(.*ETA")
    while process.poll() is None and time.monotonic() < deadline:
        if found := [line for line in log_path.read_text().splitlines() if pattern.match(line)]:
            return process, found[0]
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"no progress line while p2p-train ran (exit {process.wait()}):\n"
                f"{log_path.read_text()[-3000:]}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_log_with_their_rank_and_progress_lines_reach_a_file(demo_shards, tmp_path):
    args = train_args(tmp_path / "run", demo_shards, f"--train.max_steps={STEPS}", "--log.tracker=none",
                      "--log.progress=true")
    log_path = tmp_path / "train.log"
    process, first = p2p_train_into_a_file(args, gloo_env(**{INTERVAL_ENV: "0.3"}), log_path)
    step = int(re.match(r"\[rank 0\] step (\d+)/", first).group(1))
    assert process.poll() is None and step < STEPS, first  # read while the run goes on
    assert process.wait(timeout=200) == 0, log_path.read_text()[-3000:]
    text = log_path.read_text()
    out = text.splitlines()
    assert "\r" not in text  # no bar off a terminal
    assert re.fullmatch(rf"\[rank 0\] step {STEPS}/{STEPS} \([\d.]+ steps/s, ETA 0:00:00\) D=[\d.]+ G=.*",
                        [line for line in out if re.match(r"\[rank 0\] step \d+/", line)][-1]), text
    for rank in (0, 1):  # every rank's own data stream says what its epoch plans
        assert any(re.fullmatch(rf"\[rank {rank}\] data: epoch 0 plans \d+ steps on each of 2 rank\(s\) "
                                r"from \d+ streams",
                                line) for line in out), text
    assert any(line.startswith("[rank 0] replicas agree") for line in out), text
    assert "[rank 0] config:" in out and "[rank 0]   generator: unet_128" in out  # the dump, each line
    # every line of the run is a rank's own: nothing unprefixed in a multi-process run
    assert out and all(line.startswith("[rank ") for line in out), text


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_log_level_from_the_config_hides_info(demo_shards, tmp_path):
    args = train_args(tmp_path / "run", demo_shards, "--train.max_steps=1", "--log.tracker=none",
                      "--log.level=warning")
    result = run(single(args), cpu_env())
    assert result.returncode == 0, explain(result)
    assert "data: epoch 0 plans" not in result.stdout and "replicas agree" not in result.stdout
