"""Non-square images at their own shape, through the real trainer: 3:1 pairs made on the spot
(tests/helpers/wide_pairs.py) trained with data.preprocess=scale_width on 2 processes
(batch 2 each), resumed exactly, evaluated; the sample grid's tiles are 3:1, the run's
generator translates a 3:1 image to a 3:1 output of its size, and the checkpoint records
the geometry. Sizes a batch cannot hold are refused before anything is written."""
import json

import numpy as np
import pytest
from PIL import Image

from pipeline import translate
from pipeline.export import main as export_main
from tests.helpers.runs import DECAY, losses_by_step, resume_from
from tests.helpers.trainer_runs import (
    accelerate,
    cpu_env,
    explain,
    gloo_env,
    run,
    single,
    step_log,
    train_args,
)
from tests.helpers.wide_pairs import write_wide_pairs

WIDTH, HEIGHT = 96, 32  # 3:1 halves
# ResNet G (sizes in multiples of 4), a 3-layer PatchGAN (>= 24 px a side): the 32-px height fits
WIDE = ["--model.generator=resnet_6blocks", "--data.preprocess=scale_width",
        f"--data.load_size={WIDTH}", "--data.crop_size=32", "--data.batch_size=2",
        "--data.num_workers=1", "--log.samples=3", *DECAY]


def wide_args(run_dir, shards, *extra) -> list[str]:
    return train_args(run_dir, shards, *WIDE, *extra)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return write_wide_pairs(tmp_path_factory.mktemp("wide") / "shards", count=24,
                            size=(WIDTH, HEIGHT), layout="separate", val_count=8)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_processes_train_resume_and_evaluate_3_to_1_pairs_at_their_shape(wide, tmp_path):
    whole = tmp_path / "whole"
    result = run(accelerate(wide_args(whole, wide.path, "--train.max_steps=6", "--train.ckpt_every=3",
                                      "--train.eval_every=3", "--log.sample_every=6")), gloo_env(),
                 timeout=400)
    assert result.returncode == 0, explain(result)
    metrics = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 3, 6] and all(m["images"] == 8 for m in metrics)
    assert metrics[-1]["l1"] < metrics[0]["l1"]  # it learns the inverse at this shape

    grid = Image.open(whole / "samples" / "step_00000006.png")
    assert grid.size == (3 * WIDTH, 3 * HEIGHT)  # input | output | target, 3 rows of 3:1 tiles

    step = whole / "checkpoints" / "step_00000006"
    data = json.loads((step / "generator.json").read_text())["data"]
    assert data["preprocess"] == "scale_width" and data["load_size"] == WIDTH
    assert data["layout"] == "separate" and data["size"] == f"{WIDTH}x{HEIGHT}"
    assert json.loads((step / "trainer.json").read_text())["config"]["data"]["preprocess"] == "scale_width"

    resumed = resume_from(lambda args: accelerate(args), gloo_env(), whole, tmp_path / "resumed",
                          wide.path, 3, 6, *WIDE)
    expected, got = losses_by_step(step_log(whole)), losses_by_step(resumed)
    for s in range(4, 7):
        assert got[s] == expected[s], f"step {s} differs after resume"

    # the run's export on a 3:1 image twice the training width: translated at the run's
    # scale (96 x 32) and brought back to its own 192 x 64, never squashed into a square
    image = tmp_path / "street.png"
    rows, cols = np.mgrid[0:64, 0:192]
    disc = ((cols - 96) ** 2 + (rows - 32) ** 2 <= 20 ** 2).astype(np.uint8) * 255
    Image.fromarray(np.repeat(disc[..., None], 3, axis=2)).save(image)
    export, out = tmp_path / "export", tmp_path / "out"
    assert export_main(["--checkpoint", str(whole), "--out", str(export), "--format", "safetensors"]) == 0
    assert translate.main(["--checkpoint", str(export), str(image), "--out", str(out), "--quiet"]) == 0
    assert Image.open(out / "street.png").size == (192, 64)


@pytest.mark.timeout(120)
def test_sizes_a_batch_cannot_hold_are_refused_at_start_up_writing_nothing(tmp_path):
    mixed = write_wide_pairs(tmp_path / "mixed", count=6, size=[(WIDTH, HEIGHT), (64, 32)],
                             val_count=2)
    run_dir = tmp_path / "run"
    result = run(single(wide_args(run_dir, mixed.path, "--train.max_steps=1")), cpu_env(), timeout=100)
    assert result.returncode == 2, explain(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "data.batch_size=2, but data.preprocess=scale_width gives" in lines[0]
    assert "96x32" in lines[0] and "96x48" in lines[0] and "Traceback" not in result.stderr
    assert not run_dir.exists()
