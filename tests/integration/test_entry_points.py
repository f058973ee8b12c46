"""Every entry point fails the same way: a user mistake is one line and exit 2, no
traceback, under the name the user called the tool by; an internal error keeps its
traceback and exits 1 (pipeline/cli.py). Under p2p-train's 2 ranks too: once, nothing
of torchrun's failure report.

Each case runs the installed console script as a user would, in a fresh process."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.distributed import free_port
from pipeline.losses import GAN_LOSSES
from pipeline.models import GENERATORS
from tests.conftest import require_component
from tests.helpers.trainer_runs import ROOT, cpu_env

MISSING = "/no/such/path"
TOOLS = ("p2p-train", "p2p-translate", "p2p-evaluate", "p2p-export", "p2p-shard",
         "p2p-inspect-shards", "p2p-make-demo")


@pytest.fixture(scope="module")
def corrupt_checkpoint(tmp_path_factory) -> str:
    """A folder that looks like a checkpoint and an export, with garbage inside."""
    folder = tmp_path_factory.mktemp("corrupt")
    (folder / "trainer.json").write_text(json.dumps({"step": 3, "world_size": 1,
                                                     "config": {"model": {}}}))
    (folder / "generator.json").write_text(json.dumps({"format": "pix2pix-at-scale/generator",
                                                       "version": 1, "step": 3, "model": {},
                                                       "data": {}}))
    (folder / "generator.safetensors").write_bytes(b"not safetensors at all")
    return str(folder)


def user_mistakes(corrupt: str, out: str) -> list[tuple[str, list[str]]]:
    """(console script, arguments) with one mistake each."""
    bucket = "s3://unreachable-bucket/data"
    return [
        ("p2p-train", ["--optim.learning_rate=1"]),  # an unknown key
        ("p2p-train", [f"--data.train={MISSING}", f"--train.run_dir={out}/t1"]),
        ("p2p-train", [f"--data.train={MISSING}", f"--train.resume={corrupt}",
                       f"--train.run_dir={out}/t2"]),
        ("p2p-train", [f"--data.train={bucket}", f"--train.run_dir={out}/t3"]),
        ("p2p-translate", ["--checkpoint", MISSING, "--out", f"{out}/x", "a.png"]),
        ("p2p-translate", ["--checkpoint", corrupt, "--out", f"{out}/x", "a.png"]),
        ("p2p-translate", ["--checkpoint", bucket, "--out", f"{out}/x", "a.png"]),
        ("p2p-translate", ["--checkpoint", corrupt, "--tiles", "3"]),  # an unknown option
        ("p2p-evaluate", ["--checkpoint", MISSING, "--data", MISSING, "--out", f"{out}/e"]),
        ("p2p-evaluate", ["--checkpoint", corrupt, "--data", MISSING, "--out", f"{out}/e"]),
        ("p2p-evaluate", ["--checkpoint", bucket, "--data", bucket, "--out", f"{out}/e"]),
        ("p2p-export", ["--checkpoint", MISSING, "--out", f"{out}/x"]),
        ("p2p-export", ["--checkpoint", corrupt, "--out", f"{out}/x"]),
        ("p2p-export", ["--checkpoint", bucket, "--out", f"{out}/x"]),
        ("p2p-shard", [MISSING, f"{out}/s"]),
        ("p2p-shard", [bucket, f"{out}/s"]),
        ("p2p-shard", ["merge", f"{out}/never-sharded"]),
        ("p2p-shard", [MISSING, f"{out}/s", "--max-sampels", "3"]),
        ("p2p-inspect-shards", [MISSING]),
        ("p2p-inspect-shards", [bucket]),
        ("p2p-make-demo", [f"{out}/d", "--size", "8"]),
    ]


def run(tool: str, args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which(tool), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=180)


@pytest.fixture(scope="module")
def env() -> dict:
    for tool in TOOLS:
        require_component(shutil.which(tool) is not None, f"console script {tool} (pip install -e .)")
    # an S3 endpoint where nothing listens: every s3:// URL is unreachable at once
    return cpu_env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", AWS_ACCESS_KEY_ID="test",
                   AWS_SECRET_ACCESS_KEY="secret-not-to-show", AWS_DEFAULT_REGION="us-east-1")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_user_mistake_is_one_line_and_exit_2_in_every_entry_point(env, corrupt_checkpoint, tmp_path):
    cases = user_mistakes(corrupt_checkpoint, str(tmp_path))
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda case: run(*case, env, tmp_path), cases))
    failures = []
    for (tool, args), result in zip(cases, results):
        lines = result.stderr.strip().splitlines()
        good = (result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr
                and lines[0].startswith(f"{tool}: error: ")  # as called: p2p-shard, not shard.py
                and "secret-not-to-show" not in result.stderr + result.stdout)
        if not good:
            failures.append(f"{tool} {' '.join(args)}: exit {result.returncode}\n{result.stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)
    assert not (tmp_path / "t1").exists() and not (tmp_path / "t3").exists()  # nothing created


@pytest.mark.timeout(300)
def test_an_internal_error_keeps_its_traceback_and_exits_1(env, tmp_path):
    bug = dict(env, P2P_FAULT="cli.bug")
    cases = [(tool, ["--help-is-not-reached"]) for tool in TOOLS]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda case: run(*case, bug, tmp_path), cases))
    for (tool, _), result in zip(cases, results):
        assert result.returncode == 1, f"{tool}: exit {result.returncode}\n{result.stderr}"
        assert "Traceback (most recent call last)" in result.stderr, f"{tool}:\n{result.stderr}"
        assert "injected internal error" in result.stderr


@pytest.mark.timeout(300)
def test_every_tool_has_help_and_train_runs_as_a_module_and_a_script(env):
    for tool in TOOLS:
        result = subprocess.run([shutil.which(tool) or tool, "--help"], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0 and f"usage: {tool} " in result.stdout, f"{tool}: {result.stderr}"
    as_module = subprocess.run([sys.executable, "-m", "pipeline.train", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
    as_script = subprocess.run([sys.executable, str(ROOT / "pipeline" / "train.py"), "--help"],
                               cwd=ROOT, capture_output=True, text=True, timeout=120)
    for result in (as_module, as_script):
        assert result.returncode == 0 and "usage: train.py " in result.stdout, result.stderr
        # the choices --help lists are the registries' (argparse may wrap the line)
        flat = " ".join(result.stdout.split())
        assert f"--model.generator {{{','.join(GENERATORS)}}}" in flat
        assert f"--loss.gan {{{','.join(GAN_LOSSES)}}}" in flat


@pytest.mark.timeout(180)
def test_a_mistake_every_rank_finds_is_one_line_under_p2p_train_with_2_ranks(env, tmp_path):
    """torchrun's agent inside: each rank finds the missing data itself, its failure
    report would follow; what the user reads is p2p-train's one line."""
    launch = ["--multi_gpu", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
              "--main_process_port", str(free_port()), "--mixed_precision", "no"]
    trainer = ["--config", str(ROOT / "configs" / "demo.yaml"), f"--data.train={MISSING}",
               f"--train.run_dir={tmp_path / 'run'}"]
    result = run("p2p-train", [*launch, "--", *trainer], dict(env, ACCELERATE_USE_CPU="1"), tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"[rank 0] p2p-train: error: data.train: no manifest.json at {MISSING}/manifest.json: make shards "
        "with `python data_tools/shard.py SOURCE DEST`"], result.stderr
    assert not (tmp_path / "run").exists()
