"""train.compile=true through the real trainer on 2 processes: checkpoints stay plain
(the export loads in p2p-translate, resumes cross between compiled and eager runs) and
grad_accum's micro-steps still skip DDP's all-reduce (no_sync), counted by an observer
comm hook on the real DDP (tests/helpers/count_allreduces/).

Three launches: eager to step 1, compiled from there to step 3 (its step-2 checkpoint
mid-run), eager from that to step 4. Inductor on 2 CPU cores is the cost (about a minute
of compiling per rank), so the models are the smallest the config allows and nothing
evaluates (no data.val): evaluation would compile G once more."""
import json
import os

import numpy as np
import pytest
from safetensors.torch import load_file

from pipeline.checkpoint import step_name
from pipeline.translate import main as translate
from tests.helpers.images import write_image
from tests.helpers.trainer_runs import ROOT, accelerate, explain, gloo_env, run, step_log, train_args

pytestmark = pytest.mark.slow

SMALL = ["--model.norm=none", "--model.dropout=false", "--model.d_layers=1", "--data.val=",
         "--data.num_workers=1", "--train.grad_accum=2", "--train.ckpt_every=1"]
COUNTER = str(ROOT / "tests" / "helpers" / "count_allreduces")


@pytest.fixture(scope="module")
def runs(demo_shards, tmp_path_factory) -> dict:
    """{"eager", "compiled", "resumed": (run_dir, result), "allreduces": folder}; each test
    asserts the launches it reads succeeded."""
    root = tmp_path_factory.mktemp("compile")
    launch = lambda run_dir, *extra, env=None: (run_dir, run(accelerate(train_args(
        run_dir, demo_shards, *SMALL, *extra)), env or gloo_env(), timeout=480))
    eager = launch(root / "eager", "--train.max_steps=1")
    counts = root / "allreduces"
    counts.mkdir()
    path = os.pathsep.join(p for p in (COUNTER, os.environ.get("PYTHONPATH")) if p)
    compiled = launch(root / "compiled", "--train.max_steps=3", "--train.compile=true",
                      f"--train.resume={eager[0] / 'checkpoints' / step_name(1)}",
                      env=gloo_env(PYTHONPATH=path, P2P_ALLREDUCE_DIR=str(counts)))
    resumed = launch(root / "resumed", "--train.max_steps=4",
                     f"--train.resume={compiled[0] / 'checkpoints' / step_name(2)}")
    return {"eager": eager, "compiled": compiled, "resumed": resumed, "allreduces": counts}


def assert_resumed(launched, step: int) -> None:
    run_dir, result = launched
    assert result.returncode == 0, explain(result)
    assert "resumed from" in result.stdout and f"at step {step}" in result.stdout
    assert [r["step"] for r in step_log(run_dir)][0] == step + 1


@pytest.mark.timeout(900)
def test_compiled_checkpoints_are_plain_exports_and_resume_both_ways(runs, tmp_path):
    assert runs["eager"][1].returncode == 0, explain(runs["eager"][1])
    assert_resumed(runs["compiled"], 1)  # compiled, from an eager checkpoint
    assert "replicas agree: G and D digest" in runs["compiled"][1].stdout
    checkpoint = runs["compiled"][0] / "checkpoints" / step_name(2)
    for weights in ("generator.safetensors", "discriminator.safetensors"):
        keys = list(load_file(checkpoint / weights))
        assert keys and not [k for k in keys if "_orig_mod" in k], (weights, keys[:3])
    pixels = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    image = write_image(tmp_path / "in.png", pixels)
    assert translate(["--checkpoint", str(checkpoint), image, "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert (tmp_path / "out" / "in.png").exists()
    assert_resumed(runs["resumed"], 2)  # eager, from the compiled run's mid-run checkpoint


@pytest.mark.timeout(900)
def test_compiled_ddp_all_reduces_once_per_update_under_grad_accum(runs):
    """grad_accum=2 over steps 2 and 3: each of G's and D's DDP all-reduces in 2 backward
    passes (one per update), not 4 (one per micro-step); and it did all-reduce."""
    result = runs["compiled"][1]
    assert result.returncode == 0, explain(result)
    for rank in (0, 1):
        counts = json.loads((runs["allreduces"] / f"rank_{rank}.json").read_text())
        assert len(counts) == 2, counts  # DDP around G, then around D
        assert [c["rounds"] for c in counts] == [2, 2], (rank, counts)
        assert all(c["buckets"] >= c["rounds"] for c in counts), (rank, counts)
