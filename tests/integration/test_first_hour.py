"""The first hour of a new user, each step as the user takes it (real processes, real
signals to a process group with SIGINT at its default as at a terminal, a real umask)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.distributed import free_port
from tests.helpers.trainer_runs import (
    ROOT,
    cpu_env,
    explain,
    gloo_env,
    run,
    single,
    step_log,
    train_args,
)

QUIET = ("--log.tracker=none", "--data.num_workers=1")


def tree(folder: Path) -> dict[str, tuple[int, float]]:
    """{relative path: (size, mtime)} of every file: what "touching nothing" compares."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, explain(result)
    return lines[0]


# ----------------------------------------------------------------- 1. a second run

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_second_run_into_a_used_run_folder_is_refused_touching_nothing(demo_shards, tmp_path):
    args = train_args(tmp_path / "run", demo_shards, "--train.max_steps=2", *QUIET)
    first = run(single(args), cpu_env())
    assert first.returncode == 0, explain(first)
    before = tree(tmp_path / "run")
    second = run(single(args), cpu_env())
    assert second.returncode == 2
    line = one_line(second)
    assert "already holds a run" in line and "--train.resume=auto" in line
    assert "--train.overwrite=true" in line and "another --train.run_dir" in line
    assert tree(tmp_path / "run") == before  # not a byte, not a timestamp changed


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_overwrite_moves_the_old_run_aside_and_an_elastic_restart_resumes(demo_shards, tmp_path):
    args = train_args(tmp_path / "run", demo_shards, "--train.max_steps=2", *QUIET)
    assert run(single(args), cpu_env()).returncode == 0
    old = tree(tmp_path / "run")
    again = run(single([*args, "--train.overwrite=true"]), cpu_env())
    assert again.returncode == 0, explain(again)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and tree(aside[0]) == old  # kept whole, never deleted
    assert "moved to" in again.stderr
    longer = [a.replace("--train.max_steps=2", "--train.max_steps=3") for a in args]
    restarted = run(single(longer), cpu_env(TORCHELASTIC_RESTART_COUNT="1"))
    assert restarted.returncode == 0, explain(restarted)
    assert "resumed from" in restarted.stdout and "at step 2" in restarted.stdout


# ----------------------------------------------------------------- 2-3. p2p-train

def start_p2p_train(args: list[str], env: dict) -> subprocess.Popen:
    """p2p-train as a terminal starts a foreground job: its own process group, SIGINT
    at its default (a background job of a non-interactive shell inherits it ignored)."""
    def as_at_a_terminal():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.setpgrp()
    return subprocess.Popen([sys.executable, "-m", "pipeline.launch", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_at_a_terminal)


def wait_for_training(run_dir: Path, process: subprocess.Popen, timeout: float = 200) -> None:
    deadline = time.time() + timeout
    while not (run_dir / "train_log.jsonl").exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)


def trainers_left(run_dir: Path) -> list[str]:
    found = subprocess.run(["pgrep", "-af", str(run_dir)], capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if "pgrep" not in line]


def launch_options(processes: int) -> list[str]:
    if processes == 1:
        return ["--config_file", str(ROOT / "accelerate_config.yaml"), "--mixed_precision", "no"]
    return ["--config_file", str(ROOT / "launch" / "accelerate" / "cpu_2proc.yaml"),
            "--main_process_port", str(free_port()), "--mixed_precision", "no"]


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("processes", [1, 2])
def test_ctrl_c_through_p2p_train_checkpoints_and_exits_0(demo_shards, tmp_path, processes):
    run_dir = tmp_path / "run"
    args = [*launch_options(processes), "--", *train_args(run_dir, demo_shards,
                                                          "--train.max_steps=5000", *QUIET)]
    env = gloo_env() if processes == 2 else cpu_env()
    process = start_p2p_train(args, env)
    wait_for_training(run_dir, process)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
    out, err = process.communicate(timeout=180)
    assert process.returncode == 0, f"exit {process.returncode}\n{out[-2000:]}\n{err[-3000:]}"
    assert "stop requested (SIGINT); checkpointing" in out and "Traceback" not in err
    stopped = int((run_dir / "checkpoints" / "latest").read_text().split("_")[1])
    assert stopped == step_log(run_dir)[-1]["step"] > 0  # the step it stopped at, saved
    assert not trainers_left(run_dir)  # no rank, no loader worker outlives p2p-train


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_second_ctrl_c_stops_at_once_and_says_what_it_skipped(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    # a slow checkpoint (large models) so that the second Ctrl-C lands while it is written
    args = [*launch_options(1), "--", *train_args(run_dir, demo_shards, "--train.max_steps=5000",
                                                  *QUIET), "--model.g_filters=64", "--model.d_filters=64"]
    process = start_p2p_train(args, cpu_env())
    wait_for_training(run_dir, process, timeout=300)
    os.killpg(process.pid, signal.SIGINT)
    time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, f"{out[-2000:]}\n{err[-3000:]}"
    assert "SIGINT again: killing the run now" in err and "newest complete one stays" in err
    assert "Traceback" not in err
    assert not trainers_left(run_dir)
    assert not list((run_dir / "checkpoints").glob("step_*[0-9]")) or \
        (run_dir / "checkpoints" / "latest").exists()  # nothing half-committed


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_errors_through_p2p_train_are_the_trainers_line_and_code(demo_shards, tmp_path):
    user = run([sys.executable, "-m", "pipeline.launch", *launch_options(1), "--",
                "--optim.learning_rate=1"], cpu_env())
    assert user.returncode == 2
    assert one_line(user).startswith("p2p-train: error: unknown config key 'optim.learning_rate'")
    nan = run([sys.executable, "-m", "pipeline.launch", *launch_options(1), "--",
               *train_args(tmp_path / "run", demo_shards, "--train.max_steps=3", *QUIET)],
              cpu_env(P2P_FAULT="train.nonfinite_batch:2"))
    assert nan.returncode == 1
    assert one_line(nan).startswith("p2p-train: error: step 2: non-finite")


# ----------------------------------------------------------------- 4. precision

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_start_up_says_the_precision_and_where_it_came_from(demo_shards, tmp_path):
    args = train_args(tmp_path / "run", demo_shards, "--train.max_steps=2", *QUIET)
    env = cpu_env()
    env.pop("ACCELERATE_MIXED_PRECISION")
    plain = run(single(args), env)
    assert plain.returncode == 0, explain(plain)
    assert "precision: fp32 (requested no by no launcher setting (plain python runs in fp32" in plain.stdout
    resumed = run(single([a.replace("max_steps=2", "max_steps=3") for a in args] +
                         ["--train.resume=auto"]),
                  cpu_env(ACCELERATE_MIXED_PRECISION="bf16"))
    assert resumed.returncode == 0, explain(resumed)
    assert "precision: bf16 autocast (requested bf16 by accelerate launch" in resumed.stdout
    assert "was trained in fp32, this run continues in bf16" in resumed.stderr  # a warning


# ----------------------------------------------------------------- 5. export

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_export_without_options_writes_what_the_installed_packages_allow(trained_run, tmp_path):
    # a fresh interpreter in which onnxscript cannot be imported (as on a plain install)
    code = ("import sys; sys.modules['onnxscript'] = None; from pipeline.export import main; "
            f"sys.exit(main(['--checkpoint', {trained_run['checkpoint']!r}, '--out', {str(tmp_path)!r}]))")
    result = run([sys.executable, "-c", code], cpu_env())
    assert result.returncode == 0, explain(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generator.json", "generator.pt2",
                                                          "generator.safetensors"]
    skipped = [line for line in result.stderr.splitlines() if "skipped onnx" in line]
    assert len(skipped) == 1 and "onnxscript not installed" in skipped[0] and ".[export]" in skipped[0]


# ----------------------------------------------------------------- 6. permissions

@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_every_file_gets_the_permissions_the_umask_gives(tmp_path, umask, mode):
    from tests.helpers.shard_trees import make_aligned
    make_aligned(tmp_path / "src", {"train": 8, "val": 2})
    with_umask = lambda: os.umask(umask)  # noqa: E731 - a real umask, in the child
    shard = subprocess.run([sys.executable, str(ROOT / "data_tools" / "shard.py"), str(tmp_path / "src"),
                            str(tmp_path / "shards"), "--quiet", "--workers", "1"], cwd=ROOT,
                           env=cpu_env(), preexec_fn=with_umask, capture_output=True, text=True)
    assert shard.returncode == 0, shard.stderr
    args = train_args(tmp_path / "run", tmp_path / "shards", "--train.max_steps=2", "--log.sample_every=1",
                      "--train.eval_every=1", *QUIET)
    train = subprocess.run(single(args), cwd=ROOT, env=cpu_env(), preexec_fn=with_umask,
                           capture_output=True, text=True, timeout=240)
    assert train.returncode == 0, train.stderr[-3000:]
    files = [p for folder in ("shards", "run") for p in (tmp_path / folder).rglob("*") if p.is_file()]
    assert any(p.suffix == ".tar" for p in files) and any(p.suffix == ".safetensors" for p in files)
    assert any(p.suffix == ".png" for p in files) and any(p.name == "manifest.json" for p in files)
    wrong = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != mode}
    assert not wrong, f"umask {oct(umask)}: files not {oct(mode)}: {wrong}"


# ----------------------------------------------------------------- 7. A|B in translate

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_translate_takes_the_input_half_of_an_a_b_image(trained_run, tmp_path):
    pair = sorted((trained_run["raw"] / "val").glob("*.png"))[0]  # 256 wide x 128 high
    whole = np.asarray(Image.open(pair))
    half = tmp_path / "half"
    half.mkdir()
    Image.fromarray(whole[:, :whole.shape[1] // 2]).save(half / "a.png")
    (tmp_path / "pair").mkdir()
    shutil.copy(pair, tmp_path / "pair" / "a.png")
    outputs = {}
    for name in ("half", "pair"):
        result = run([sys.executable, str(ROOT / "pipeline" / "translate.py"), "--checkpoint",
                      trained_run["checkpoint"], "--out", str(tmp_path / f"out_{name}"),
                      str(tmp_path / name), "--quiet"], cpu_env())
        assert result.returncode == 0, explain(result)
        outputs[name] = np.asarray(Image.open(tmp_path / f"out_{name}" / "a.png"))
        if name == "pair":
            said = result.stdout + result.stderr  # a warning: no one asked for the split
            assert "1 image(s) were taken for A|B pairs" in said and "left (A) half" in said
    assert outputs["pair"].shape == outputs["half"].shape == (128, 128, 3)
    assert np.array_equal(outputs["pair"], outputs["half"])


# ----------------------------------------------------------------- 8. evaluation

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_evaluate_py_and_the_trainers_validation_agree_on_1_and_2_processes(demo_shards, tmp_path):
    from tests.helpers.trainer_runs import accelerate
    numbers = {}
    for processes in (1, 2):
        run_dir = tmp_path / f"run{processes}"
        args = train_args(run_dir, demo_shards, "--train.max_steps=4", "--data.batch_size=3",
                          "--data.load_size=128", *QUIET)
        launch = single(args) if processes == 1 else accelerate(args, processes=2)
        trained = run(launch, gloo_env())
        assert trained.returncode == 0, explain(trained)
        final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
        numbers[f"trainer, {processes}"] = final
        evaluate = [str(ROOT / "pipeline" / "evaluate.py"), "--checkpoint", str(run_dir), "--data",
                    demo_shards, "--out", str(tmp_path / f"report{processes}")]
        eval_processes = 3 - processes  # each on the other count: trained on 1, evaluated on 2
        command = [sys.executable, *evaluate] if eval_processes == 1 else \
            accelerate(evaluate[1:], processes=2, script=evaluate[0])
        result = run(command, gloo_env())
        assert result.returncode == 0, explain(result)
        numbers[f"evaluate.py on {eval_processes}, trained on {processes}"] = json.loads(
            (tmp_path / f"report{processes}" / "metrics.json").read_text())
    for processes in (1, 2):
        trainer = numbers[f"trainer, {processes}"]
        tool = numbers[f"evaluate.py on {3 - processes}, trained on {processes}"]
        assert tool["images"] == trainer["images"] == 6
        for metric in ("l1", "psnr", "ssim"):
            assert tool[metric] == pytest.approx(trainer[metric], rel=1e-6, abs=1e-7), (metric, numbers)


# ----------------------------------------------------------------- 9-10. data mistakes

@pytest.mark.timeout(300)
def test_raw_images_given_as_shards_get_the_shard_command(tmp_path):
    from tests.helpers.shard_trees import make_aligned
    make_aligned(tmp_path / "photos", {None: 3})
    result = run(single([f"--data.train={tmp_path / 'photos'}", f"--train.run_dir={tmp_path / 'run'}"]),
                 cpu_env())
    assert result.returncode == 2
    line = one_line(result)
    assert line.startswith("train.py: error: data.train: ") and "holds images, not shards" in line
    assert f"data_tools/shard.py {tmp_path / 'photos'} {tmp_path / 'photos'}_shards" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(300)
def test_shard_py_missing_source_bad_images_and_strict(tmp_path):
    shard_py = [sys.executable, str(ROOT / "data_tools" / "shard.py")]
    missing = run([*shard_py, str(tmp_path / "nope"), str(tmp_path / "out")], cpu_env())
    (tmp_path / "empty").mkdir()
    empty = run([*shard_py, str(tmp_path / "empty"), str(tmp_path / "out")], cpu_env())
    assert missing.returncode == empty.returncode == 2
    assert "no such folder or list file" in one_line(missing)
    assert "no image pairs found" in one_line(empty)
    source = tmp_path / "src" / "train"
    source.mkdir(parents=True)
    for i in range(5):
        Image.fromarray(np.full((16, 32, 3), 40 * i, np.uint8)).save(source / f"{i}.png")
    (source / "broken.png").write_bytes(b"\x89PNG not really")
    strict = run([*shard_py, str(tmp_path / "src"), str(tmp_path / "strict"), "--quiet", "--strict",
                  "--workers", "1"], cpu_env())
    assert strict.returncode == 2 and "--strict" in strict.stderr.splitlines()[-1]
    assert not (tmp_path / "strict" / "manifest.json").exists()  # not a finished dataset
    rows = [json.loads(line) for line in (tmp_path / "strict" / "rejected.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rows] == ["not_an_image"] and "object at 0x" not in rows[0]["detail"]
    relaxed = run([*shard_py, str(tmp_path / "src"), str(tmp_path / "strict"), "--quiet",
                   "--workers", "1"], cpu_env())
    assert relaxed.returncode == 0 and "1 shards hold no sample" in relaxed.stderr


# ----------------------------------------------------------------- 11-12. logs, small ones

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resuming_adds_no_tensorboard_runs_and_no_duplicate_rows(demo_shards, tmp_path):
    args = train_args(tmp_path / "run", demo_shards, "--train.max_steps=2", "--train.eval_every=1",
                      "--data.num_workers=1", "--log.tracker=tensorboard")
    for _ in range(2):  # the second resumes with nothing left to do
        result = run(single([*args, "--train.resume=auto"]), cpu_env())
        assert result.returncode == 0, explain(result)
    assert "nothing left to train" in result.stdout
    logs = tmp_path / "run" / "logs"
    assert [p for p in logs.rglob("*") if p.is_dir()] == []  # no timestamped sub-runs
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in metrics]
    assert steps == [0, 1, 2]
    assert '"distributed_type": "NO"' in result.stdout  # a value, not an enum repr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_report_path_is_clean_when_out_ends_with_a_slash(trained_run, tmp_path):
    result = run([sys.executable, str(ROOT / "pipeline" / "evaluate.py"), "--checkpoint",
                  trained_run["checkpoint"], "--data", trained_run["shards"], "--out", f"{tmp_path}/report/"],
                 cpu_env())
    assert result.returncode == 0, explain(result)
    assert f"report in {tmp_path}/report/index.html" in result.stdout and "//" not in result.stdout
