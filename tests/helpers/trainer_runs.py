"""Launching the real trainer from tests: tiny demo shards, command lines, and
processes that always run under a timeout (a hung rank fails the test, never CI)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from pipeline.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "pipeline" / "train.py")
TINY = ["--model.generator=unet_128", "--model.g_filters=8", "--model.d_filters=8",
        "--data.load_size=136", "--data.crop_size=128", "--data.batch_size=2",
        "--log.progress=false", "--log.every=1", "--train.eval_every=0", "--log.sample_every=0"]


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> str:
    """24 train + 6 val demo pairs (64x64 halves), packed by the real shard tool."""
    from data_tools.make_demo import main as make_demo
    from data_tools.shard import main as shard
    root = tmp_path_factory.mktemp("demo")
    make_demo([str(root / "raw"), "--train", "24", "--val", "6", "--size", "64"])
    assert shard([str(root / "raw"), str(root / "shards"), "--quiet", "--workers", "1"]) == 0
    return str(root / "shards")


# bf16 launches test bf16 itself, also on CPUs that only emulate it (where the trainer
# would otherwise fall back to fp32: test_precision.py covers that)
REAL_BF16 = "--train.allow_emulated_bf16=true"


def train_args(run_dir, shards, *extra) -> list[str]:
    return [f"--train.run_dir={run_dir}", f"--data.train={shards}", f"--data.val={shards}",
            *TINY, REAL_BF16, *extra]


# eval.metrics=auto measures what the weights folder holds: none, unless a test says which
NO_WEIGHTS = "/nonexistent/p2p-weights"


def cpu_env(**extra) -> dict:
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               ACCELERATE_MIXED_PRECISION="no", PYTHONUNBUFFERED="1", P2P_WEIGHTS_DIR=NO_WEIGHTS)
    env.update(extra)
    return env


def single(args) -> list[str]:
    """One process, no launcher."""
    return [sys.executable, TRAIN, *args]


def accelerate(args, processes=2, machines=1, machine_rank=0, port=None, script=TRAIN,
               precision="no") -> list[str]:
    """`accelerate launch` of CPU processes over gloo (needs gloo_env's ACCELERATE_USE_CPU)."""
    return ["accelerate", "launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", str(machines), "--machine_rank", str(machine_rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port or free_port()),
            "--mixed_precision", precision, script, *args]


def gloo_env(**extra) -> dict:
    return cpu_env(ACCELERATE_USE_CPU="1", **extra)


def run(command, env, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def explain(result) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"


def step_log(run_dir) -> list[dict]:
    with open(Path(run_dir) / "train_log.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def latest(run_dir) -> str:
    return (Path(run_dir) / "checkpoints" / "latest").read_text().strip()


# --------------------------------------------------------------------------- DeepSpeed

# DeepSpeed JIT-compiles its CPU shared-memory comm op (~25 s) on first use: into a folder
# that outlives the test run, compiled once by tests/helpers/build_deepspeed_ops.py. Keyed by
# the torch version: an op built against another torch fails to load, or hangs the ranks on
# the build lock it left behind.
TORCH_EXTENSIONS_DIR = os.environ.get(
    "TORCH_EXTENSIONS_DIR",
    str(Path.home() / ".cache" / "pix2pix-at-scale" / f"torch_extensions-{version('torch')}"))


# a sitecustomize that makes every rank see autocast as DeepSpeed sees it on a GPU
CUDA_AUTOCAST_CHECK = ROOT / "tests" / "helpers" / "cuda_autocast_check"


def deepspeed_env(**extra) -> dict:
    """CPU processes for a DeepSpeed launch: gloo, never ACCELERATE_USE_CPU (it would
    silently drop DeepSpeed), and CUDA_AUTOCAST_CHECK on PYTHONPATH (before the caller's,
    with the repo root): inside `torch.autocast("cpu")` DeepSpeed then switches autocast
    off in its engines' forward as it does on a GPU, so a bf16 test fails where CUDA would."""
    env = cpu_env(TORCH_EXTENSIONS_DIR=TORCH_EXTENSIONS_DIR, **extra)
    env.pop("ACCELERATE_USE_CPU", None)
    paths = [str(CUDA_AUTOCAST_CHECK), str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
    return env


def deepspeed(args, stage=2, processes=2, machines=1, machine_rank=0, port=None, script=TRAIN,
              precision="no") -> list[str]:
    """`accelerate launch` with one of launch/accelerate's DeepSpeed configs (ZeRO `stage`
    on one node; the multi-node config, ZeRO-2 and the standard launcher, for machines > 1)."""
    config = "deepspeed_multi_node.yaml" if machines > 1 else f"deepspeed_zero{stage}.yaml"
    return ["accelerate", "launch", "--config_file", str(ROOT / "launch" / "accelerate" / config),
            "--num_processes", str(processes), "--num_machines", str(machines),
            "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port or free_port()), "--mixed_precision", precision,
            script, *args]
