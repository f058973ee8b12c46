"""Generators for the inference tests: one trained by the real trainer on demo data, and
exports made on the spot for configurations no training is needed for."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline.config import Config, to_dict
from pipeline.export import export_safetensors
from pipeline.models import build_generator
from pipeline.weights import GeneratorInfo
from tests.helpers.trainer_runs import cpu_env, explain, run, single, train_args


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> dict:
    """A unet_128 (8 filters) trained 100 steps on 32 demo pairs of 128x128: enough to
    give facade-like, structured output (val L1 about -45% from the untrained one);
    about 60-90 s on 2 busy cores. {"checkpoint", "shards", "raw"}."""
    from data_tools.make_demo import main as make_demo
    from data_tools.shard import main as shard
    root = tmp_path_factory.mktemp("trained")
    make_demo([str(root / "raw"), "--train", "32", "--val", "6", "--size", "128", "--format", "png"])
    assert shard([str(root / "raw"), str(root / "shards"), "--quiet", "--workers", "1"]) == 0
    result = run(single(train_args(root / "run", root / "shards", "--data.load_size=128",
                                   "--data.num_workers=1", "--train.max_steps=100",
                                   "--train.ckpt_every=1000")), cpu_env(OMP_NUM_THREADS="2"))
    assert result.returncode == 0, explain(result)
    return {"checkpoint": str(root / "run"), "shards": str(root / "shards"), "raw": root / "raw"}


def make_export(folder: Path, **model) -> str:
    """An untrained generator export (generator.safetensors + generator.json) with these
    ModelConfig fields changed, e.g. in_channels=1, out_channels=1."""
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, **{"generator": "unet_128", "g_filters": 8, **model})
    cfg.data.crop_size = 128
    info = GeneratorInfo.of_run(to_dict(cfg), step=0)
    export_safetensors(build_generator(cfg.model).eval(), info, str(folder))
    return str(folder)
