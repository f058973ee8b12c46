"""The run's geometry at inference (issue #40): p2p-translate brings each input to the
eval size of the geometry generator.json records (data.preprocess), not a square, and
gives the output back at the input's own size and shape; p2p-evaluate builds the same
geometry; --split-pair auto follows the run's recorded source layout. The networks here
are ResNets (size multiple 4), so the small sizes are not rounded up to a U-Net's 128;
what the network sees is recorded by wrapping translate's forward, never mocked."""
import argparse
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import translate
from pipeline.checkpoint import load_generator
from pipeline.config import Config, to_dict
from pipeline.data import Geometry, make_eval_loader
from pipeline.evaluate import eval_data, to_uint8
from pipeline.export import export_safetensors
from pipeline.models import build_generator
from pipeline.translate_geometry import crop_side, default_tile, input_scale
from pipeline.weights import GeneratorInfo, TrainedOn
from tests.helpers.images import write_image

DETERMINISTIC = ["--dropout", "off", "--norm-stats", "running", "--quiet"]


def make_run_export(folder, layout: str | None = None, size: str | None = None, **data) -> str:
    """An untrained resnet_6blocks (8 filters) export whose generator.json records these
    DataConfig fields, source layout and half size, written as the trainer writes it (of_run)."""
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, generator="resnet_6blocks", g_filters=8)
    cfg.data = dataclasses.replace(cfg.data, **data)
    info = GeneratorInfo.of_run(to_dict(cfg), step=0, layout=layout, size=size)
    export_safetensors(build_generator(cfg.model).eval(), info, str(folder))
    return str(folder)


@pytest.fixture
def seen(monkeypatch) -> list:
    """The (h, w) of every batch translate's forward is given, recorded by wrapping it."""
    shapes, real = [], translate.make_forward

    def recording(*args, **kwargs):
        forward = real(*args, **kwargs)
        return lambda x: shapes.append(tuple(x.shape[-2:])) or forward(x)
    monkeypatch.setattr(translate, "make_forward", recording)
    return shapes


def said(capsys) -> str:
    captured = capsys.readouterr()
    return captured.out + captured.err


def photo(path, width: int, height: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return write_image(path, rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


# ----------------------------------------------------------------- the run's scale

def test_a_scale_width_run_translates_at_its_width_and_gives_the_inputs_shape_back(
        tmp_path, capsys, seen):
    """load_size 48, scale_width: a 96 x 32 (3:1) image is translated at 48 x 16, not
    squashed to a square, and written back at 96 x 32; the log says the rule once."""
    checkpoint = make_run_export(tmp_path / "g", preprocess="scale_width", load_size=48, crop_size=16)
    image = photo(tmp_path / "wide.png", 96, 32)
    assert translate.main(["--checkpoint", checkpoint, image, "--out", str(tmp_path / "out"),
                           *DETERMINISTIC]) == 0
    assert seen == [(16, 48)]
    assert Image.open(tmp_path / "out" / "wide.png").size == (96, 32)
    assert said(capsys).count("inputs resized to width 48, the aspect kept, each side rounded "
                              "to a multiple of 4, the run's scale") == 1


def test_an_image_above_the_pixel_budget_is_tiled_at_the_eval_size_and_shape(tmp_path, capsys, seen):
    """The tiled path on a non-square eval size: 32 x 32 tiles (twice the crop's larger
    side) over the 48 x 16 image, the output back at 96 x 32."""
    checkpoint = make_run_export(tmp_path / "g", preprocess="scale_width", load_size=48,
                                 crop_size=8, crop_height=16)
    image = photo(tmp_path / "wide.png", 96, 32)
    assert translate.main(["--checkpoint", checkpoint, image, "--out", str(tmp_path / "out"),
                           "--max-whole-pixels", "100", *DETERMINISTIC]) == 0
    assert "(1 tiled)" in said(capsys) and set(seen) == {(32, 32)}
    assert Image.open(tmp_path / "out" / "wide.png").size == (96, 32)


def test_translate_at_a_scale_width_runs_scale_is_what_evaluate_measured(tmp_path, seen):
    """Shards of 96 x 32 pairs: p2p-evaluate's data (eval_data, make_eval_loader with the
    generator's multiple) hands the generator 48 x 16 inputs, and p2p-translate's output
    at that size is the generator's output on them."""
    from data_tools.shard import main as shard
    for split, count in (("train", 1), ("val", 2)):
        (tmp_path / "raw" / split).mkdir(parents=True)
        for i in range(count):  # A|B pairs of 96 x 32 halves
            photo(tmp_path / "raw" / split / f"{split}{i}.png", 192, 32, seed=i)
    assert shard([str(tmp_path / "raw"), str(tmp_path / "shards"), "--quiet", "--workers", "1"]) == 0
    checkpoint = make_run_export(tmp_path / "g", preprocess="scale_width", load_size=48, crop_size=16)
    assert translate.main(["--checkpoint", checkpoint, str(tmp_path / "shards"), "--out",
                           str(tmp_path / "out"), "--output-size", "translated", *DETERMINISTIC]) == 0
    assert seen == [(16, 48)]  # both images batched: one size
    generator, info = load_generator(checkpoint)
    args = argparse.Namespace(data=str(tmp_path / "shards"), split="val", num_workers=0, batch_size=1)
    cfg, channels = eval_data(args, info)
    loader = make_eval_loader(cfg, rank=0, world_size=1, multiple=info.model.size_multiple, **channels)
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        assert batch["input"].shape == (1, 3, 16, 48)
        with torch.no_grad():
            measured = to_uint8(generator(batch["input"]))[0].permute(1, 2, 0).numpy().astype(int)
        translated = np.asarray(Image.open(tmp_path / "out" / f"{batch['key'][0]}.png"))
        assert np.abs(translated - measured).max() <= 1  # float rounding of another batch layout


def test_evaluate_reads_the_geometry_and_an_old_generator_json_keeps_the_square():
    """eval_data: a scale_width generator.json evaluates a 2048 x 1024 image at 1024 x 512;
    one without data.preprocess (an older file) at crop_size x crop_size, as before."""
    args = argparse.Namespace(data="shards", split="val", num_workers=0, batch_size=1)
    model = Config().model
    new = GeneratorInfo(1, model, TrainedOn("AtoB", 1024, 256, "scale_width", 0, True, "separate"))
    old = GeneratorInfo.from_json({"format": "pix2pix-at-scale/generator", "version": 1, "model":
                                   dataclasses.asdict(model), "data": {"direction": "BtoA",
                                   "load_size": 286, "crop_size": 128}}, "generator.json")
    for info, preprocess, size in ((new, "scale_width", (512, 1024)), (old, "resize_and_crop", (128, 128))):
        cfg, _ = eval_data(args, info)
        assert (cfg.preprocess, cfg.direction) == (preprocess, info.data.direction)
        assert Geometry.of(cfg, model.size_multiple).eval_size((1024, 2048)) == size
        scale = input_scale(info.data, model.size_multiple, "eval")
        assert scale.target((1024, 2048)) == size and not scale.other


@pytest.mark.parametrize("data,asked,size,warns", [
    (dict(preprocess="scale_width"), "eval", (512, 1024), False),
    (dict(preprocess="scale_width"), "train", (512, 1024), False),
    (dict(preprocess="scale_width_and_crop"), "train", (512, 1024), False),
    (dict(preprocess="scale_shortside_and_crop"), "eval", (1024, 2048), False),
    (dict(preprocess="resize_and_crop", crop_height=128), "eval", (128, 256), False),
    (dict(preprocess="resize_and_crop"), "train", (1024, 1024), False),
    (dict(preprocess="none"), "native", None, False),
    (dict(preprocess="scale_width"), "native", None, True),
    (dict(preprocess="scale_width"), 512, (512, 512), True),  # N: a square, as before
    (dict(preprocess=None), 256, (256, 256), False),
])
def test_each_input_size_by_the_runs_geometry(data, asked, size, warns):
    """--input-size against each geometry, on a 2048 x 1024 input (load_size 1024, crop
    256, multiple 16): the size it is translated at and whether the line warns."""
    recorded = TrainedOn(**{"load_size": 1024, "crop_size": 256, **data})
    scale = input_scale(recorded, 16, asked)
    assert (scale.target((1024, 2048)), scale.other) == (size, warns), scale.said


def test_the_default_tile_covers_a_non_square_crop():
    assert crop_side(TrainedOn(crop_size=64, crop_height=128)) == 128
    assert crop_side(TrainedOn(crop_size=64)) == 64 and crop_side(TrainedOn()) == 256
    assert default_tile(crop_side(TrainedOn(crop_size=64, crop_height=128)), 16) == 256


def test_an_unknown_preprocess_is_refused_in_one_line(tmp_path, capsys):
    checkpoint = make_run_export(tmp_path / "g", load_size=48, crop_size=16)
    meta = tmp_path / "g" / "generator.json"
    meta.write_text(meta.read_text().replace('"resize_and_crop"', '"zoom_and_enhance"'))
    image = photo(tmp_path / "x.png", 20, 10)
    assert translate.main(["--checkpoint", checkpoint, image, "--out", str(tmp_path / "out"),
                           "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "'zoom_and_enhance'" in error and "Traceback" not in error


# ----------------------------------------------------------------- --split-pair auto

@pytest.mark.parametrize("layout,size,split,notice", [
    ("separate", "64x32", [], False),               # a 2:1 street scene stays whole
    ("pair", "48x32", ["three.png"], False),        # 3:1 A|B pairs of 3:2 halves; 2:1 stays whole
    ("pair", "32x32", ["two.png"], False),          # square halves: a 2:1 image is a pair
    ("pair", None, ["two.png"], True),              # no half size: width = 2 x height
    (None, None, ["two.png"], True),                # not recorded: width = 2 x height
    ("mixed", "32x32", ["two.png"], True),
])
def test_split_pair_auto_follows_the_runs_recorded_layout(tmp_path, capsys, seen, layout, size,
                                                          split, notice):
    """Images of 64 x 32 (2:1) and 96 x 32 (3:1): split at half width (the output is the
    input half's size) or translated whole, by generator.json's data.layout and data.size."""
    checkpoint = make_run_export(tmp_path / "g", layout, size, load_size=24, crop_size=16)
    sizes = {"two.png": (64, 32), "three.png": (96, 32)}
    images = [photo(tmp_path / name, *size) for name, size in sizes.items()]
    assert translate.main(["--checkpoint", checkpoint, *images, "--out", str(tmp_path / "out"),
                           *DETERMINISTIC]) == 0
    text = said(capsys)
    assert set(seen) == {(16, 16)}  # resize_and_crop: the crop, whatever was split
    for name, (width, height) in sizes.items():
        expected = (width // 2, height) if name in split else (width, height)
        assert Image.open(tmp_path / "out" / name).size == expected, name
    assert text.count("--split-pair auto: the run records") == int(notice)
    assert (f"{len(split)} image(s) were taken for A|B pairs" in text) == bool(split)
    if layout == "pair" and size:
        assert f"A|B pair images of {size} halves (generator.json data.layout pair)" in text
