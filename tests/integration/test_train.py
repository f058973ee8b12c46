"""The trainer, launched for real: 1 process, 2 processes, 2 "nodes", bf16, exact
resume, stop signals and start-up refusals. Tiny models on tiny demo shards, CPU, gloo."""
import json
import signal
import subprocess
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import ModelConfig
from pipeline.distributed import free_port
from pipeline.models import build_generator
from tests.helpers.runs import DECAY, LOSSES, losses_by_step, resume_from, run_then_resume, wait_for_step
from tests.helpers.trainer_runs import (
    ROOT,
    accelerate,
    cpu_env,
    explain,
    gloo_env,
    latest,
    run,
    single,
    step_log,
    train_args,
)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_one_process_leaves_checkpoint_logs_samples_and_an_export(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    result = run(single(train_args(run_dir, demo_shards, "--train.max_steps=6",
                                   "--train.ckpt_every=2", "--train.keep_last=2",
                                   "--train.eval_every=3", "--log.sample_every=3")), cpu_env())
    assert result.returncode == 0, explain(result)
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["latest", "step_00000004", "step_00000006"]  # rotated to 2
    assert latest(run_dir) == "step_00000006"
    assert list((run_dir / "logs").rglob("events.out.tfevents.*")), "no TensorBoard log"
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "step_00000003.png", "step_00000006.png"]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 3, 6] and metrics[-1]["images"] == 6
    assert [r["step"] for r in step_log(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor([r[k] for k in LOSSES])).all() for r in step_log(run_dir))
    assert "final val: L1" in result.stdout and "replicas agree" in result.stdout
    # the generator export loads without the trainer
    export = run_dir / "checkpoints" / "step_00000006"
    meta = json.loads((export / "generator.json").read_text())
    generator = build_generator(ModelConfig(**meta["model"]))
    generator.load_state_dict(load_file(export / "generator.safetensors"))
    assert meta["data"]["direction"] == "AtoB" and (run_dir / "config.yaml").exists()


@pytest.fixture(scope="module")
def two_process_run(demo_shards, tmp_path_factory):
    """8 steps on 2 processes with a decaying lr: the uninterrupted reference run (its
    step-4 checkpoint is what the resume test starts from)."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    result = run(accelerate(train_args(run_dir, demo_shards, "--train.max_steps=8",
                                       "--train.ckpt_every=4", "--data.num_workers=1", *DECAY)),
                 gloo_env())
    return run_dir, result


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_keep_g_and_d_bitwise_equal(two_process_run):
    run_dir, result = two_process_run
    assert result.returncode == 0, explain(result)
    assert "replicas agree: G and D digest" in result.stdout and "on 2 rank(s)" in result.stdout
    assert "[rank 0] exiting with code 0" in result.stderr
    assert "[rank 1] exiting with code 0" in result.stderr
    assert all(torch.isfinite(torch.tensor([r[k] for k in LOSSES])).all() for r in step_log(run_dir))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_replica_check_fails_when_d_gradients_are_not_all_reduced(demo_shards, tmp_path):
    helper = str(ROOT / "tests" / "helpers" / "train_without_d_allreduce.py")
    result = run(accelerate(train_args(tmp_path / "run", demo_shards, "--train.max_steps=3"),
                            script=helper), gloo_env())
    assert result.returncode != 0
    assert "replicas diverged" in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lr_follows_the_schedule_the_same_with_1_and_2_processes(two_process_run, demo_shards, tmp_path):
    one = run(single(train_args(tmp_path / "one", demo_shards, "--train.max_steps=8", *DECAY)), cpu_env())
    assert one.returncode == 0, explain(one)
    lrs_one = [r["train/lr"] for r in step_log(tmp_path / "one")]
    lrs_two = [r["train/lr"] for r in step_log(two_process_run[0])]
    # logged after step k's update: lr for step k+1 = 2e-4 * (1 - (k+1-2)/5), from step 2 on
    expected = [2e-4 * min(1.0, max(0.0, 1 - (k - 2) / 5)) for k in range(1, 9)]
    assert lrs_one == pytest.approx(expected) and lrs_two == pytest.approx(expected)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_nodes_on_loopback_train_as_one_world(demo_shards, tmp_path):
    port, args = free_port(), train_args(tmp_path / "run", demo_shards, "--train.max_steps=3")
    nodes = [subprocess.Popen(accelerate(args, processes=2, machines=2, machine_rank=rank, port=port),
                              cwd=ROOT, env=gloo_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=240) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert '"world_size": 2' in outputs[0][0]
    assert "replicas agree: G and D digest" in outputs[0][0]
    assert "[rank 1] exiting with code 0" in outputs[1][1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_folder_must_be_shared_by_every_node(demo_shards, tmp_path):
    port = free_port()
    nodes = [subprocess.Popen(
        accelerate(train_args(tmp_path / f"node{rank}", demo_shards, "--train.max_steps=2"),
                   processes=2, machines=2, machine_rank=rank, port=port),
        cwd=ROOT, env=gloo_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)]
    outputs = [node.communicate(timeout=240) for node in nodes]
    assert all(node.returncode != 0 for node in nodes)
    assert "is not shared" in outputs[0][1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_process_resume_reproduces_the_uninterrupted_losses(demo_shards, tmp_path):
    extra = ("--data.num_workers=2", *DECAY)
    whole = run(single(train_args(tmp_path / "whole", demo_shards, "--train.max_steps=8", *extra)),
                cpu_env())
    assert whole.returncode == 0, explain(whole)
    resumed = run_then_resume(single, cpu_env(), tmp_path / "resumed", demo_shards, 4, 8, *extra)
    expected = losses_by_step(step_log(tmp_path / "whole"))
    got = losses_by_step(resumed)
    assert sorted(got) == list(range(1, 9))  # no step lost or repeated
    for step in range(5, 9):
        assert got[step] == expected[step], f"step {step} differs after resume"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_process_resume_reproduces_the_uninterrupted_losses(two_process_run, demo_shards, tmp_path):
    resumed = resume_from(lambda args: accelerate(args), gloo_env(), two_process_run[0],
                          tmp_path / "resumed", demo_shards, 4, 8, "--data.num_workers=1", *DECAY)
    expected = losses_by_step(step_log(two_process_run[0]))
    got = losses_by_step(resumed)
    for step in range(5, 9):
        assert got[step] == expected[step], f"step {step} differs after resume"


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_stop_signal_checkpoints_at_a_step_boundary_and_exits_0(sig, demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(single(train_args(run_dir, demo_shards, "--train.max_steps=100000")),
                               cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for_step(run_dir, 2, process)
    sent = time.monotonic()
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-3000:]
    assert time.monotonic() - sent < 30
    last_step = step_log(run_dir)[-1]["step"]
    assert latest(run_dir) == f"step_{last_step:08d}"
    assert f"stop requested ({sig.name})" in stdout


def start_endless_two_process_run(run_dir, shards) -> subprocess.Popen:
    """A 2-process launch that trains until stopped; returns once step 2 is logged."""
    launcher = subprocess.Popen(accelerate(train_args(run_dir, shards, "--train.max_steps=100000")),
                                cwd=ROOT, env=gloo_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    wait_for_step(run_dir, 2, launcher, timeout=200)
    return launcher


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_stop_together_on_sigusr1_to_the_workers(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    launcher = start_endless_two_process_run(run_dir, demo_shards)
    workers = psutil.Process(launcher.pid).children()
    assert len(workers) == 2
    for worker in workers:  # what Slurm's --signal=USR1 does: every task gets it
        worker.send_signal(signal.SIGUSR1)
    stdout, stderr = launcher.communicate(timeout=60)
    assert "[rank 0] exiting with code 0" in stderr and "[rank 1] exiting with code 0" in stderr
    last_step = step_log(run_dir)[-1]["step"]
    assert latest(run_dir) == f"step_{last_step:08d}"
    ckpt = run_dir / "checkpoints" / latest(run_dir)
    assert (ckpt / "rank_00000.json").exists() and (ckpt / "rank_00001.json").exists()


@pytest.mark.timeout(120)
def test_syncbatch_is_refused_on_cpu_at_start_up(demo_shards, tmp_path):
    result = run(single(train_args(tmp_path / "run", demo_shards, "--model.norm=syncbatch")), cpu_env())
    assert result.returncode == 2
    assert "model.norm: syncbatch needs >= 2 CUDA processes" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.timeout(200)
def test_independent_world_size_1_runs_are_refused(demo_shards, tmp_path):
    # --multi_gpu on CPU without ACCELERATE_USE_CPU: two processes that each think they
    # are alone (accelerate starts N independent world-size-1 runs): train.py must refuse.
    result = run(accelerate(train_args(tmp_path / "run", demo_shards)), cpu_env())
    assert result.returncode != 0
    assert "but the launcher started WORLD_SIZE=2" in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bf16_learns_as_well_as_fp32_on_the_demo_data(demo_shards, tmp_path):
    final_l1 = {}
    for precision in ("no", "bf16"):
        run_dir = tmp_path / precision
        result = run(single(train_args(run_dir, demo_shards, "--train.max_steps=40")),
                     cpu_env(ACCELERATE_MIXED_PRECISION=precision))
        assert result.returncode == 0, explain(result)
        assert f'"mixed_precision": "{precision}"' in result.stdout
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert metrics[-1]["step"] == 40 and metrics[-1]["l1"] < metrics[0]["l1"]
        final_l1[precision] = metrics[-1]["l1"]
    assert abs(final_l1["bf16"] - final_l1["no"]) <= 0.05 * final_l1["no"], final_l1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_to_the_launcher_stops_both_workers_cleanly(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    launcher = start_endless_two_process_run(run_dir, demo_shards)
    launcher.send_signal(signal.SIGTERM)  # the agent forwards it to the workers
    stdout, stderr = launcher.communicate(timeout=60)
    # the launcher's own exit code is torchrun's business; the workers' is ours
    assert "[rank 0] exiting with code 0" in stderr and "[rank 1] exiting with code 0" in stderr
    assert latest(run_dir) == f"step_{step_log(run_dir)[-1]['step']:08d}"
