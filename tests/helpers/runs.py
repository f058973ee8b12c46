"""Reading what a trainer run left behind: its per-step losses, a run stopped and resumed,
waiting for a step while it trains, and the newest checkpoint loaded as a resume would."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline import checkpoint
from tests.helpers.trainer_runs import explain, run, step_log, train_args

LOSSES = ("train/loss_D", "train/loss_G", "train/loss_G_gan", "train/loss_G_l1")
DECAY = ["--optim.constant_steps=2", "--optim.decay_steps=5"]  # lr decays from step 2 to 7


def losses_by_step(records) -> dict[int, list[float]]:
    return {r["step"]: [r[k] for k in LOSSES] for r in records}


def run_then_resume(launch, env, run_dir, shards, stop_at, total, *extra) -> list[dict]:
    """Train to `stop_at`, then resume (resume=auto) to `total` with the same launcher;
    returns the run's step log."""
    first = run(launch(train_args(run_dir, shards, f"--train.max_steps={stop_at}", *extra)), env)
    assert first.returncode == 0, explain(first)
    second = run(launch(train_args(run_dir, shards, f"--train.max_steps={total}",
                                   "--train.resume=auto", *extra)), env)
    assert second.returncode == 0, explain(second)
    assert "resumed from" in second.stdout and f"at step {stop_at}" in second.stdout
    return step_log(run_dir)


def resume_from(launch, env, whole_dir, run_dir, shards, stop_at, total, *extra) -> list[dict]:
    """Resume the checkpoint an uninterrupted run wrote at `stop_at` (train.ckpt_every) in a
    fresh run folder and train to `total`: one launch fewer than run_then_resume, and it
    resumes a checkpoint written mid-run, as preemption leaves one. Returns the step log
    (steps stop_at + 1 .. total)."""
    checkpoint_dir = Path(whole_dir) / "checkpoints" / checkpoint.step_name(stop_at)
    second = run(launch(train_args(run_dir, shards, f"--train.max_steps={total}",
                                   f"--train.resume={checkpoint_dir}", *extra)), env)
    assert second.returncode == 0, explain(second)
    assert "resumed from" in second.stdout and f"at step {stop_at}" in second.stdout
    return step_log(run_dir)


def wait_for_step(run_dir: Path, step: int, process, timeout: float = 120) -> None:
    """Returns once the running trainer has logged `step`; fails if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "trainer ended before the signal"
        log = run_dir / "train_log.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= step:
            return
        time.sleep(0.2)
    raise TimeoutError(f"no step {step} within {timeout} s")


def assert_newest_checkpoint_loads(run_dir: Path) -> int | None:
    """Every committed step_N/ is whole and the marker's one loads as a resume would
    read it; returns its step (None before the first commit)."""
    root = Path(checkpoint.checkpoints_dir(str(run_dir)))
    for name in checkpoint.committed(str(root)):
        files = {p.name for p in (root / name).iterdir()}
        assert {"trainer.json", "generator.safetensors", "discriminator.safetensors",
                "optimizers.pt", "rank_00000.json", "rank_00000_rng.pt"} <= files, (name, files)
    path = checkpoint.resolve(str(run_dir), "auto")
    if path is None:
        assert not checkpoint.committed(str(root))  # a committed step has a marker
        return None
    checkpoint.load_generator(path)
    load_file(Path(path) / "discriminator.safetensors")
    torch.load(Path(path) / "optimizers.pt", weights_only=True)
    json.loads((Path(path) / "rank_00000.json").read_text())
    return json.loads((Path(path) / "trainer.json").read_text())["step"]


STAGED = ("--model.norm=instance", "--model.dropout=false", "--data.num_workers=1", "--log.tracker=none")


def staged_runs_args(tmp_path, shards) -> tuple[list[str], list[str]]:
    """pix2pixHD's staged training as two runs' arguments: a global run (2 steps), then a
    local run around its G (init_from) with the global part frozen for 2 of 3 steps."""
    first = train_args(tmp_path / "global", shards, "--model.generator=global", "--model.g_filters=8",
                       "--train.max_steps=2", *STAGED)
    second = train_args(tmp_path / "local", shards, "--model.generator=local", "--model.g_filters=4",
                        f"--model.init_from={tmp_path / 'global'}", "--train.freeze_global_steps=2",
                        "--train.max_steps=3", "--train.ckpt_every=2", *STAGED)
    return first, second


def assert_global_part_held_then_trained(tmp_path) -> None:
    """The local run's exports: its global part equals the global run's G after the frozen
    steps, bit for bit, and differs after the next."""
    source = load_file(str(tmp_path / "global" / "checkpoints" / "step_00000002" / "generator.safetensors"))
    at = lambda step: load_file(str(tmp_path / "local" / "checkpoints" / checkpoint.step_name(step) /
                                    "generator.safetensors"))
    held, trained = at(2), at(3)
    mapped = {k.replace("model.", "global_part.", 1): v for k, v in source.items()
              if k.replace("model.", "global_part.", 1) in held}
    assert len(mapped) > 10
    assert all(held[k].equal(v) for k, v in mapped.items())  # held still while frozen
    assert not all(trained[k].equal(v) for k, v in mapped.items())  # then trained
