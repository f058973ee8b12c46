"""A user's first day with their own data: evaluations they can bound and stop, a start
they stopped that does not block the same command again (real processes, real signals)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.trainer_runs import (
    ROOT,
    accelerate,
    cpu_env,
    explain,
    gloo_env,
    single,
    step_log,
    train_args,
)

QUIET = ("--log.tracker=none", "--data.num_workers=1")
# each val batch of 2 images takes 1.5 s more: an evaluation long enough to stop inside
SLOW_EVAL = "eval.batch~1.5"


def start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(single(args), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_until(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def interrupt(process: subprocess.Popen) -> tuple[subprocess.CompletedProcess, float]:
    """SIGINT now: (the finished process, seconds until it exited)."""
    sent = time.time()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err), time.time() - sent


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_stop_during_evaluation_is_honoured_in_seconds_and_never_blocks_a_rerun(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = train_args(run_dir, demo_shards, "--train.max_steps=50", "--train.eval_every=2",
                      "--eval.max_images=4", *QUIET)
    env = cpu_env(P2P_FAULT=SLOW_EVAL)

    # 1. Ctrl-C during the step-0 evaluation: nothing trained, nothing to checkpoint
    first = start(args, env)
    wait_until(lambda: (run_dir / "config.yaml").exists(), first)  # written just before it
    stopped, seconds = interrupt(first)
    assert stopped.returncode == 0 and seconds < 15, explain(stopped)
    assert "evaluation abandoned" in stopped.stdout, explain(stopped)
    assert not (run_dir / "checkpoints").exists() and metrics(run_dir) == []

    # 2. the same command again: the stopped start is set aside, not "already holds a run";
    # Ctrl-C during the step-2 evaluation checkpoints step 2
    second = start(args, env)
    wait_until(lambda: (run_dir / "train_log.jsonl").exists() and step_log(run_dir)[-1]["step"] == 2,
               second)
    stopped, seconds = interrupt(second)
    assert stopped.returncode == 0 and seconds < 15, explain(stopped)
    assert "ended before its first checkpoint" in stopped.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    assert [(r["step"], r["images"]) for r in metrics(run_dir)] == [(0, 4)]  # capped, 6 in the split

    # 3. it resumes from there and evaluates again, saying how far it is (output to a pipe:
    # progress lines, not a bar)
    done = subprocess.run(single([*args, "--train.resume=auto", "--train.max_steps=4",
                                  "--log.progress=true"]), cwd=ROOT, env=cpu_env(),
                          capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, explain(done)
    assert [(r["step"], r["images"]) for r in metrics(run_dir)] == [(0, 4), (4, 4)]
    assert "step 4/4 (" in done.stdout and "eval at step 4: 4/4 (" in done.stdout, explain(done)

    # 4. p2p-evaluate given the run's cap takes the trainer's own subset: the same numbers,
    # in the precision the run validated in (its trainer.json), said in every output
    out = tmp_path / "report"
    env = {k: v for k, v in cpu_env().items() if k != "ACCELERATE_MIXED_PRECISION"}  # no launcher
    report = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--checkpoint", str(run_dir),
                             "--data", demo_shards, "--out", str(out), "--max-images", "4",
                             "--num-workers", "0"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=200)
    assert report.returncode == 0, explain(report)
    measured, trainer = json.loads((out / "metrics.json").read_text()), metrics(run_dir)[-1]
    assert measured["images"] == 4
    for key in ("l1", "psnr", "ssim"):
        assert measured[key] == pytest.approx(trainer[key], rel=1e-9), key
    assert measured["precision"]["used"] == "fp32" and "trainer.json" in measured["precision"]["why"]
    assert "in fp32" in report.stdout and "trainer.json" in (out / "index.html").read_text()


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("config,processes", [("custom.yaml", 1), ("facades.yaml", 2)])
def test_the_shipped_recipes_train_as_they_are_once_given_the_data(demo_shards, tmp_path, config, processes):
    """configs/custom.yaml and configs/facades.yaml, data paths given (and one step, not a
    schedule's worth): trained, evaluated, checkpointed; facades on two processes (it once
    pinned one stream, which two processes cannot read), custom on one (any count: auto)."""
    run_dir = tmp_path / "run"
    args = ["--config", str(ROOT / "configs" / config), f"--data.train={demo_shards}",
            f"--data.val={demo_shards}", f"--train.run_dir={run_dir}", "--train.max_steps=1",
            "--train.eval_at_start=false", "--log.tracker=none", "--log.progress=false"]
    command = single(args) if processes == 1 else accelerate(args, processes=processes)
    done = subprocess.run(command, cwd=ROOT, env=gloo_env() if processes > 1 else cpu_env(),
                          capture_output=True, text=True, timeout=360)
    assert done.returncode == 0, explain(done)
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000001"
    assert [(r["step"], r["images"]) for r in metrics(run_dir)] == [(1, 6)]
