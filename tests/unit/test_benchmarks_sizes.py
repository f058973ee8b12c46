"""Benchmark sizes mean one thing everywhere: WxH, width first as the manifest writes them;
estimate_memory takes a non-square config's own geometry, and bench_train counts FLOPs and
makes its pairs at that shape. In-process, on tiny sizes: a few seconds."""
from __future__ import annotations

import argparse
import sys

import pytest
import torch

from tests.helpers.trainer_runs import ROOT

sys.path.append(str(ROOT / "benchmarks"))  # the scripts import each other by file name
import bench_train  # noqa: E402
import estimate_memory  # noqa: E402
import train_setup  # noqa: E402


def test_a_size_is_width_first_or_one_side():
    assert estimate_memory.size_arg("2048x1024") == (1024, 2048)  # (h, w), as tensors
    assert estimate_memory.size_arg("256") == (256, 256)
    for bad in ("1024x", "x512", "1024x512x3", "0x4", "wide"):
        with pytest.raises(argparse.ArgumentTypeError):
            estimate_memory.size_arg(bad)


def estimate(monkeypatch, *argv: str) -> dict:
    """estimate_memory's figures (report() writes to the stdout it was imported with)."""
    found = []
    monkeypatch.setattr(estimate_memory, "report", lambda name, rows, figures: found.append(figures))
    assert estimate_memory.main(list(argv)) == 0
    return found[-1]


def test_estimate_memory_sees_scale_width_make_1024x512_of_a_2048x1024_image(monkeypatch):
    config = "configs/hd_global_1024x512.yaml"
    by_image = estimate(monkeypatch, "--config", config, "--image", "2048x1024")
    assert (by_image["preprocess"], by_image["image"], by_image["size"]) == (
        "scale_width", "2048x1024", "1024x512")
    by_size = estimate(monkeypatch, "--config", config, "--size", "1024x512")
    assert by_size["total_GiB"] == by_image["total_GiB"]
    # the modes without a crop have no size of their own: one line says what to give
    with pytest.raises(SystemExit, match="give --image WxH"):
        estimate_memory.main(["--config", config])


def test_bench_train_builds_its_step_at_the_non_square_size():
    x, y = train_setup.synthetic_pairs(1, 1, (64, 128))[0]
    assert x.shape == (1, 3, 64, 128) and torch.equal(y, -x.flip(-1))
    cfg = train_setup.trainer_config("fp32", "resnet_6blocks", 1, "", (64, 128))
    assert (cfg.data.crop_height, cfg.data.crop_size) == (64, 128)
    wide = bench_train.flops_per_sample("resnet_6blocks", (64, 128))
    assert wide == pytest.approx(2 * bench_train.flops_per_sample("resnet_6blocks", 64), rel=0.05)
