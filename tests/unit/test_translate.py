"""translate.py in-process on untrained exports: any size (padding, tiles, the exports'
in-graph padding) exact through an identity, the run's scale by default (what evaluation
measures) and a warning for another, test-time modes, gray and RGB, dropout seeds,
foreign checkpoints. On a trained generator (quality of tiles, the CLI on files, folders
and shards, a 4096 square): tests/integration/test_translate_trained.py."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools.make_demo import make_pair
from pipeline.checkpoint import load_generator
from pipeline.models import set_test_mode
from pipeline.translate import main
from pipeline.translate_geometry import AnySize, reflect_pad, run_tiled, run_whole
from tests.helpers.images import write_image
from tests.helpers.inference_runs import make_export

SIZES = [(1, 1), (1, 7), (5, 3), (37, 129), (128, 128), (130, 301)]


@pytest.mark.parametrize("h,w", SIZES)
def test_whole_and_tiled_are_exact_through_an_identity(h, w):
    """Padding and cropping back, tiling and blending lose nothing of any size: with an
    identity 'network' the output is the input."""
    image = torch.rand(1, 3, h, w)
    seen = []
    identity = lambda x: seen.append(tuple(x.shape[-2:])) or x
    assert torch.equal(run_whole(identity, image, 128), image)
    assert all(s % 128 == 0 for shape in seen for s in shape)
    torch.testing.assert_close(run_tiled(identity, image, 128, 64, batch_size=3), image)
    assert all(shape == (128, 128) for shape in seen[1:])


def test_reflect_pad_wider_than_the_image_mirrors():
    row = torch.tensor([[[[1.0, 2.0, 3.0]]]])
    assert reflect_pad(row, 0, 0, 0, 5)[0, 0, 0].tolist() == [1, 2, 3, 2, 1, 2, 3, 2]


class CumulativeSum(torch.nn.Module):
    """A 'network' whose every output pixel depends on the padding above and left of it."""

    def forward(self, x):
        return x.cumsum(-1).cumsum(-2)


@pytest.mark.parametrize("h,w", SIZES)
def test_the_exports_in_graph_padding_is_translates_padding(h, w):
    """AnySize (inside the ONNX and torch.export graphs) pads exactly as run_whole does:
    the same output through a network that sees the padded pixels."""
    image = torch.rand(2, 3, h, w)
    torch.testing.assert_close(AnySize(CumulativeSum(), 128)(image),
                               run_whole(CumulativeSum(), image, 128), rtol=0, atol=1e-4)


def test_test_time_mode_is_what_the_flags_say(tmp_path):
    generator, _ = load_generator(make_export(tmp_path / "g"))
    set_test_mode(generator, dropout=True, batch_stats=False)
    modes = {type(m).__name__: m.training for m in generator.modules()}
    assert modes["Dropout"] and not modes["BatchNorm2d"] and not generator.training


def test_grayscale_and_rgb_channels_follow_the_generator(tmp_path):
    gray_to_gray = make_export(tmp_path / "gray", in_channels=1, out_channels=1)
    rgb_to_rgb = make_export(tmp_path / "rgb")
    rng = np.random.default_rng(1)
    rgb = write_image(tmp_path / "rgb.png", rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    gray = write_image(tmp_path / "gray.png", rng.integers(0, 255, (40, 50), dtype=np.uint8))
    for checkpoint, mode in ((gray_to_gray, "L"), (rgb_to_rgb, "RGB")):
        out = tmp_path / f"out_{mode}"
        assert main(["--checkpoint", checkpoint, rgb, gray, "--out", str(out), "--quiet"]) == 0
        for name in ("rgb.png", "gray.png"):
            result = Image.open(out / name)
            assert (result.mode, result.size) == (mode, (50, 40))


def test_dropout_on_varies_with_the_seed_and_off_is_deterministic(tmp_path):
    checkpoint = make_export(tmp_path / "g")
    image = write_image(tmp_path / "x.png", make_pair(0, "x", 0, 128)[:, :128])
    outputs = {}
    runs = {"on0": ["--seed", "0"], "on0again": ["--seed", "0"], "on1": ["--seed", "1"],
            "off": ["--dropout", "off", "--seed", "0"], "off1": ["--dropout", "off", "--seed", "1"]}
    for name, flags in runs.items():
        out = str(tmp_path / name)
        assert main(["--checkpoint", checkpoint, image, "--out", out, "--quiet", *flags]) == 0
        outputs[name] = np.asarray(Image.open(tmp_path / name / "x.png"))
    assert np.array_equal(outputs["on0"], outputs["on0again"])
    assert not np.array_equal(outputs["on0"], outputs["on1"])
    assert np.array_equal(outputs["off"], outputs["off1"])


def test_a_checkpoint_of_another_architecture_is_rejected_in_one_line(tmp_path, capsys):
    checkpoint = make_export(tmp_path / "g")
    meta = json.loads((tmp_path / "g" / "generator.json").read_text())
    meta["model"]["generator"] = "unet_256"  # the weights are a unet_128's
    (tmp_path / "g" / "generator.json").write_text(json.dumps(meta))
    image = write_image(tmp_path / "x.png", np.zeros((8, 8, 3), np.uint8))
    assert main(["--checkpoint", checkpoint, image, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "does not fit this model" in error, error
    meta["format"] = "someone-else/model"
    (tmp_path / "g" / "generator.json").write_text(json.dumps(meta))
    assert main(["--checkpoint", checkpoint, image, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "is not a pix2pix-at-scale/generator version 1 export" in capsys.readouterr().err


def test_a_resnet_generator_translates_and_exports_at_its_own_size_multiple(tmp_path):
    """translate.py pads to the ResNet's multiple of 4 (not a U-Net's 2**num_downs), whole and
    tiled; torch.export follows it on shapes other than the traced one, multiples or not."""
    from PIL import Image

    from pipeline.export import main as export_main
    from pipeline.translate import main as translate_main
    checkpoint = make_export(tmp_path / "g", generator="resnet_6blocks")
    Image.new("RGB", (70, 45), (120, 30, 200)).save(tmp_path / "small.png")
    Image.new("RGB", (300, 150), (20, 130, 60)).save(tmp_path / "large.png")
    assert translate_main([str(tmp_path / "small.png"), str(tmp_path / "large.png"), "--checkpoint",
                           checkpoint, "--out", str(tmp_path / "out"), "--max-whole-pixels", "20000",
                           "--quiet", "--split-pair", "no", "--input-size", "native"]) == 0
    assert Image.open(tmp_path / "out" / "small.png").size == (70, 45)
    assert Image.open(tmp_path / "out" / "large.png").size == (300, 150)  # tiled
    assert export_main(["--checkpoint", checkpoint, "--out", str(tmp_path / "x"), "--format",
                        "torch-export"]) == 0
    generator, _ = load_generator(checkpoint)
    program = torch.export.load(str(tmp_path / "x" / "generator.pt2")).module()
    for shape in ((2, 3, 36, 20), (1, 3, 300, 260), (1, 3, 5, 37)):  # above 64 x 4; odd
        x = torch.rand(shape) * 2 - 1
        with torch.no_grad():
            expected = run_whole(generator.eval(), x, 4)
            torch.testing.assert_close(program(x), expected, rtol=0, atol=1e-5)


def said(capsys) -> str:
    """What the tool printed: progress lines go to stdout, errors to stderr."""
    captured = capsys.readouterr()
    return captured.out + captured.err


def test_translate_never_writes_over_inputs_or_earlier_outputs(tmp_path, capsys):
    """--out equal to or inside an input folder is refused; outputs already there are kept
    and counted (--overwrite redoes them); two shard inputs holding the same keys write
    each name once and count the rest, instead of replacing each other's outputs."""
    from data_tools.make_demo import main as make_demo
    from data_tools.shard import main as shard

    checkpoint = make_export(tmp_path / "g")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        write_image(photos / f"p{i}.png", make_pair(i, "p", 0, 64)[:, :64])
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    for out in (photos, photos / "translated"):
        assert main(["--checkpoint", checkpoint, str(photos), "--out", str(out), "--quiet"]) == 2
        assert "inside the input folder" in said(capsys)
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before  # nothing written

    out = tmp_path / "out"
    assert main(["--checkpoint", checkpoint, str(photos), "--out", str(out), "--quiet"]) == 0
    (out / "p1.png").unlink()  # as if the first job was stopped before p1
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["--checkpoint", checkpoint, str(photos), "--out", str(out), "--quiet"]) == 0
    assert "wrote 1 images" in said(capsys) and (out / "p1.png").exists()
    assert all(out.joinpath(name).stat().st_mtime_ns == stamp for name, stamp in stamps.items())
    assert main(["--checkpoint", checkpoint, str(photos), "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert "wrote 3 images" in said(capsys)

    make_demo([str(tmp_path / "raw"), "--train", "2", "--val", "2", "--size", "64"])
    for name in ("a", "b"):
        assert shard([str(tmp_path / "raw"), str(tmp_path / name), "--quiet", "--workers", "1"]) == 0
    code = main(["--checkpoint", checkpoint, str(tmp_path / "a"), str(tmp_path / "b"),
                 "--out", str(tmp_path / "both"), "--quiet"])
    text = said(capsys)
    assert code == 2 and "wrote 2 images" in text and "duplicate_name 2" in text
    assert len(list((tmp_path / "both").iterdir())) == 2


# ----------------------------------------------------------------- the run's scale

def test_by_default_translate_works_at_the_scale_evaluation_measured(tmp_path, capsys):
    """A run with load_size 286 and crop_size 128 (make_export's) on 96 px pairs: each
    input is resized to 128 x 128 as the trainer's validation resizes it, the log says so
    once, --output-size translated is what evaluation measured (its eval loader's input
    through the same generator), and the default output is that resized back to 96 px."""
    from data_tools.make_demo import main as make_demo
    from data_tools.shard import main as shard
    from pipeline.config import DataConfig
    from pipeline.data import make_eval_loader
    from pipeline.evaluate import to_uint8

    checkpoint = make_export(tmp_path / "g")
    make_demo([str(tmp_path / "raw"), "--train", "1", "--val", "2", "--size", "96"])
    assert shard([str(tmp_path / "raw"), str(tmp_path / "shards"), "--quiet", "--workers", "1"]) == 0
    for size in ("input", "translated"):
        assert main(["--checkpoint", checkpoint, str(tmp_path / "shards"), "--out", str(tmp_path / size),
                     "--output-size", size, "--dropout", "off", "--norm-stats", "running", "--quiet"]) == 0
        assert said(capsys).count("inputs resized to 128x128, the run's scale") == 1
    generator, _ = load_generator(checkpoint)
    cfg = DataConfig(val=str(tmp_path / "shards"), crop_size=128, num_workers=0)
    batches = list(make_eval_loader(cfg, rank=0, world_size=1, in_channels=3, out_channels=3, batch_size=1))
    assert len(batches) == 2
    for batch in batches:
        with torch.no_grad():
            output = generator(batch["input"])
        measured = to_uint8(output)[0].permute(1, 2, 0).numpy().astype(int)
        translated = np.asarray(Image.open(tmp_path / "translated" / f"{batch['key'][0]}.png"))
        assert np.abs(translated - measured).max() <= 1  # float rounding of another batch layout
        back = np.asarray(Image.open(tmp_path / "input" / f"{batch['key'][0]}.png")).astype(int)
        resized = to_uint8(torch.nn.functional.interpolate(output, size=(96, 96), mode="bicubic",
                                                           antialias=True))[0].permute(1, 2, 0).numpy()
        assert back.shape == (96, 96, 3) and np.abs(back - resized).max() <= 1


def test_another_scale_is_a_warning_and_an_export_without_the_scale_translates_natively(
        tmp_path, capsys):
    """--input-size native (the old behaviour) and N warn once that the scale is not the
    run's; a generator.json without data.crop_size/load_size gets the old behaviour with a
    one-line notice; a bad --input-size is a one-line usage error."""
    checkpoint = make_export(tmp_path / "g")
    image = write_image(tmp_path / "x.png", make_pair(3, "x", 0, 200)[:, :200][:150])  # 150 x 200
    run = lambda out, *flags: main(["--checkpoint", checkpoint, image, "--out", str(tmp_path / out),
                                    "--dropout", "off", "--norm-stats", "running", "--quiet", *flags])
    assert run("native", "--input-size", "native") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "not at the run's scale" in warnings[0] and "128x128" in warnings[0]
    assert run("x256", "--input-size", "256", "--output-size", "translated") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "2x the run's scale" in warnings[0]
    assert Image.open(tmp_path / "x256" / "x.png").size == (256, 256)

    meta_path = tmp_path / "g" / "generator.json"
    meta = json.loads(meta_path.read_text())
    meta["data"] = {"direction": meta["data"]["direction"]}  # as an export without them
    meta_path.write_text(json.dumps(meta))
    assert run("old") == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    assert captured.out.count("records no data.crop_size and data.load_size") == 1
    old, native = (np.asarray(Image.open(tmp_path / name / "x.png")) for name in ("old", "native"))
    assert old.shape == (150, 200, 3) and np.array_equal(old, native)

    with pytest.raises(SystemExit) as usage:
        run("bad", "--input-size", "big")
    assert usage.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--input-size" in error
