"""launch/slurm/ on a real Slurm cluster (two nodes on 127.0.0.1, see tests/helpers/slurm_cluster.py):
2-node training as one world, preemption warning -> checkpoint -> requeue -> resume with
no step lost or repeated, and the sharding job array against a single run."""
import json
import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from data_tools.make_demo import main as make_demo
from data_tools.shard import main as shard
from pipeline.distributed import free_port
from tests.helpers.trainer_runs import ROOT, TINY, cpu_env, latest, step_log

# Slurm jobs of the real trainer and shard.py: 11-60 s each on 2 cores
pytestmark = pytest.mark.slow

TRAIN_SBATCH = str(ROOT / "launch" / "slurm" / "train.sbatch")
SHARD_SBATCH = str(ROOT / "launch" / "slurm" / "shard.sbatch")


def job_env(cluster, run_dir) -> dict:
    """What a user sets before `sbatch launch/slurm/train.sbatch`: the training config,
    the run folder, fp32 (quicker than bf16 on this CPU); gloo on loopback."""
    return cpu_env(**cluster.env, PROJECT_DIR=str(ROOT), TRAIN_CONFIG="configs/demo.yaml",
                   RUN_DIR=str(run_dir), LAUNCH_ARGS="--mixed_precision no",
                   MAIN_PORT=str(free_port()))


def trainer_args(shards, *extra) -> list[str]:
    return [f"--data.train={shards}", f"--data.val={shards}", *TINY, *extra]


def output(tmp_path, job_id) -> str:
    return (tmp_path / f"slurm-pix2pix-{job_id}.out").read_text()


def explain(cluster, tmp_path, job_id) -> str:
    return f"job {job_id}: {cluster.job(job_id)}\n{output(tmp_path, job_id)[-8000:]}\n{cluster.logs(15)}"


@pytest.mark.timeout(300)
def test_train_sbatch_on_two_nodes_trains_one_world(slurm_cluster, demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    job_id = slurm_cluster.sbatch("--nodes=2", TRAIN_SBATCH,
                                  *trainer_args(demo_shards, "--train.max_steps=3"),
                                  env=job_env(slurm_cluster, run_dir), cwd=tmp_path)
    job = slurm_cluster.wait_until_done(job_id, timeout=240)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", \
        explain(slurm_cluster, tmp_path, job_id)
    assert job["NodeList"] == "n[1-2]" and job["NumNodes"] == "2"
    log = output(tmp_path, job_id)
    assert "2 node(s) x 1 process(es), main 127.0.0.1:" in log and "cpu=1" in log
    assert '"world_size": 2' in log  # rank 0's environment line: one world over both nodes
    assert "0: [rank 0] exiting with code 0" in log and "1: [rank 1] exiting with code 0" in log
    assert "replicas agree: G and D digest" in log and "on 2 rank(s)" in log
    assert [r["step"] for r in step_log(run_dir)] == [1, 2, 3]
    assert latest(run_dir) == "step_00000003"
    assert "requeueing" not in log and job["Restarts"] == "0"


def wait_for_steps(cluster, job_id, run_dir: Path, steps: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    log = run_dir / "train_log.jsonl"
    while time.monotonic() < deadline:
        assert cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING")
        if log.exists() and len(log.read_text().splitlines()) >= steps:
            return
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id}: no step {steps} within {timeout} s")


def requeued_on_one_node(cluster, job_id) -> None:
    """While the requeued job waits to run again, as `scontrol update` lets a user (or a
    job submitted with `-N 1-2` gets when one node is left): one node instead of two."""
    deadline = time.monotonic() + 60
    while cluster.job(job_id)["JobState"] != "PENDING":
        assert time.monotonic() < deadline, f"job {job_id} was not requeued"
        time.sleep(0.2)
    # min-max (NumNodes=1 alone still lets it take both), and the tasks and CPUs of one node
    cluster.run("scontrol", "update", f"JobId={job_id}", "NumNodes=1-1", "NumTasks=1", "NumCPUs=1")


@pytest.mark.timeout(420)
def test_time_limit_warning_checkpoints_requeues_and_resumes_on_one_node_mid_epoch(
        slurm_cluster, demo_shards, tmp_path):
    """What `#SBATCH --signal=USR1@180` does before the time limit, done now: `scancel
    --signal=USR1 JOB` signals every process of the job's steps but not the batch shell,
    the same delivery as the warning. The job must checkpoint within the trainer's 30 s,
    requeue itself and, given one node of its two, resume from the checkpoint mid-epoch
    and finish: no step lost or repeated, every epoch's samples each seen once."""
    run_dir, total = tmp_path / "run", 30  # 24 samples, global batch 4: 6 steps an epoch
    job_id = slurm_cluster.sbatch("--nodes=2", TRAIN_SBATCH,
                                  *trainer_args(demo_shards, f"--train.max_steps={total}",
                                                "--data.record_keys=true"),
                                  env=job_env(slurm_cluster, run_dir), cwd=tmp_path)
    wait_for_steps(slurm_cluster, job_id, run_dir, 3, timeout=240)
    slurm_cluster.run("scancel", "--signal=USR1", job_id)
    signalled = time.monotonic()
    marker = run_dir / "checkpoints" / "latest"
    while not marker.exists() and time.monotonic() - signalled < 60:
        time.sleep(0.2)
    checkpointed = time.monotonic() - signalled
    assert marker.exists() and checkpointed < 30, f"no checkpoint {checkpointed:.0f} s after USR1"
    stopped_at = int(latest(run_dir).removeprefix("step_"))
    assert stopped_at < total, "the job finished before the signal: nothing was tested"
    requeued_on_one_node(slurm_cluster, job_id)

    job = slurm_cluster.wait_until_done(job_id, timeout=300)
    log = output(tmp_path, job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", \
        explain(slurm_cluster, tmp_path, job_id)
    assert job["Restarts"] == "1" and job["NumNodes"] == "1", explain(slurm_cluster, tmp_path, job_id)
    # every node's task got the warning, rank 0 stopped on it, the batch shell requeued
    assert "0: [slurm] node 0: SIGUSR1" in log and "1: [slurm] node 1: SIGUSR1" in log
    assert f"step {stopped_at}: stop requested (SIGUSR1)" in log
    assert f"requeueing job {job_id}" in log and "(restart 1): 1 node(s)" in log
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at:08d} at step {stopped_at}" in log
    assert "it was saved with 2 processes, this run has 1: the data stream continues epoch" in log
    assert "global batch 4 kept as data.batch_size=2 x train.grad_accum=2 x 1" in log
    # both ranks of the 2-node run ended cleanly (a 1-process run prints no rank line)
    assert log.count("[rank 0] exiting with code 0") == log.count("[rank 1] exiting with code 0") == 1
    steps = [r["step"] for r in step_log(run_dir)]
    assert steps == list(range(1, total + 1)), "a step was lost or repeated"
    assert latest(run_dir) == f"step_{total:08d}"
    assert "training ended with exit code 0" in log
    epochs = {}
    for path in (run_dir / "keys").glob("rank*.jsonl"):
        for record in map(json.loads, path.read_text().splitlines()):
            epochs.setdefault(record["epoch"], []).extend(record["keys"])
    assert sorted(epochs) == list(range(5))
    for keys in epochs.values():  # the epoch cut by the requeue too
        assert len(keys) == len(set(keys)) == 24


def rank_process(run_dir: Path, rank: int) -> psutil.Process:
    for process in psutil.process_iter(["cmdline"]):
        try:
            if (f"--train.run_dir={run_dir}" in (process.info["cmdline"] or [])
                    and process.environ().get("RANK") == str(rank)):
                return process
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise LookupError(f"no rank {rank} process for {run_dir}")


@pytest.mark.timeout(300)
def test_one_dead_rank_ends_the_job_instead_of_hanging_it(slurm_cluster, demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    job_id = slurm_cluster.sbatch("--nodes=2", TRAIN_SBATCH,
                                  *trainer_args(demo_shards, "--train.max_steps=100000"),
                                  env=job_env(slurm_cluster, run_dir), cwd=tmp_path)
    wait_for_steps(slurm_cluster, job_id, run_dir, 2, timeout=240)
    rank_process(run_dir, 1).send_signal(signal.SIGKILL)  # node 2's training process dies
    killed = time.monotonic()
    job = slurm_cluster.wait_until_done(job_id, timeout=120)
    assert time.monotonic() - killed < 90
    assert job["JobState"] == "FAILED" and job["Restarts"] == "0", explain(slurm_cluster, tmp_path, job_id)
    log = output(tmp_path, job_id)
    assert "srun: error: n2: task 1: Exited with exit code 1" in log
    assert "Terminating StepId" in log  # --kill-on-bad-exit ended node 1's task too
    assert "requeueing" not in log


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.timeout(240)
def test_shard_job_array_then_merge_matches_a_single_run(slurm_cluster, tmp_path):
    raw = tmp_path / "raw"
    make_demo([str(raw), "--train", "40", "--val", "10", "--size", "64"])
    options = ["--max-samples", "5", "--workers", "1"]
    assert shard([str(raw), str(tmp_path / "single"), "--quiet", *options]) == 0

    env = dict(slurm_cluster.env, PROJECT_DIR=str(ROOT), SLICES="3",
               SBATCH_ARGS="--cpus-per-task=1")
    submitted = slurm_cluster.run("bash", SHARD_SBATCH, str(raw), str(tmp_path / "array"),
                                  *options, env=env, cwd=tmp_path).stdout
    ids = re.search(r"slices (\d+) \(array 0-2\), merge (\d+)", submitted)
    assert ids, submitted
    array_id, merge_id = ids.groups()
    merge = slurm_cluster.wait_until_done(merge_id, timeout=200)
    slices = slurm_cluster.jobs(array_id)
    assert sorted(s["ArrayTaskId"] for s in slices) == ["0", "1", "2"]
    assert all(s["JobState"] == "COMPLETED" for s in slices), slices
    assert merge["JobState"] == "COMPLETED", (merge, slurm_cluster.logs(15))
    # the merge ran after the last slice had ended (afterok on the whole array)
    assert merge["StartTime"] >= max(s["EndTime"] for s in slices)
    for task in range(3):  # every slice packed its share
        log = (tmp_path / f"slurm-pix2pix-shard-{array_id}_{task}.out").read_text()
        assert re.search(r"this run packed [1-9]\d* shards", log), log

    single, array = tree(tmp_path / "single"), tree(tmp_path / "array")
    assert "manifest.json" in array and sum(n.endswith(".tar") for n in array) == 16
    assert sorted(array) == sorted(single)
    for name in single:
        assert array[name] == single[name], f"{name} differs from the single run's"
