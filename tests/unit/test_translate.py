"""translate.py: any size (padding, tiles), tiled vs whole quality on a trained generator,
files/folders/shards, gray and RGB, corrupt inputs, foreign checkpoints."""
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools.make_demo import make_pair
from pipeline.checkpoint import load_generator
from pipeline.models import set_test_mode
from pipeline.translate import main, make_forward, reflect_pad, run_tiled, run_whole
from tests.inference_runs import make_export

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


def test_test_time_mode_is_what_the_flags_say(tmp_path):
    generator, _ = load_generator(make_export(tmp_path / "g"))
    set_test_mode(generator, dropout=True, batch_stats=False)
    modes = {type(m).__name__: m.training for m in generator.modules()}
    assert modes["Dropout"] and not modes["BatchNorm2d"] and not generator.training


def gradient_ratio(image: torch.Tensor, lines: list[int], period: int) -> float:
    """Mean |gradient| across the tile border lines over that across the other lines of
    the same phase modulo `period`. Transposed convolutions leave a periodic texture
    (phase-dependent gradients) in any U-Net output, tiled or not; comparing like phases
    leaves only what the tiles add."""
    gx = (image[..., :, 1:] - image[..., :, :-1]).abs().mean(dim=(0, 1, 2))
    gy = (image[..., 1:, :] - image[..., :-1, :]).abs().mean(dim=(0, 1, 3))
    border = [p - 1 for p in lines]  # gradient index p - 1 is between pixels p - 1 and p
    interior = [i for i in range(len(gx)) if (i - border[0]) % period == 0 and i not in border]
    return (torch.cat([gx[border], gy[border]]).mean() / torch.cat([gx[interior], gy[interior]]).mean()).item()


@pytest.mark.parametrize("tile,overlap", [(256, 128), (128, 32)])
def test_tiled_matches_whole_image_on_a_trained_generator(trained_run, tile, overlap):
    generator, meta = load_generator(trained_run["checkpoint"])
    forward = make_forward(set_test_mode(generator, dropout=False, batch_stats=False),
                           torch.device("cpu"), bf16=False)
    size = 500  # a demo facade drawn at this size, not a multiple of anything
    pixels = make_pair(7, "tiles", 0, size)[:, :size]
    image = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    whole = run_whole(forward, image, 2 ** generator.num_downs)
    tiled = run_tiled(forward, image, tile, overlap, batch_size=4)
    psnr = 10 * torch.log10(4 / (tiled - whole).square().mean()).item()  # range [-1, 1]: peak 2
    stride, margin = tile - overlap, overlap // 2
    lines = sorted({p for k in range(size // stride + 2) for p in (k * stride - margin, k * stride - margin + tile)
                    if 1 <= p < size})
    seams = gradient_ratio(tiled, lines, period=8)
    print(f"tile {tile} overlap {overlap}: tiled vs whole PSNR {psnr:.2f} dB, border/interior gradient {seams:.3f}")
    assert psnr >= 30
    assert abs(seams - 1) <= 0.10


def write_image(path, pixels):
    Image.fromarray(pixels).save(path)
    return str(path)


def test_cli_translates_files_folders_and_shards_of_odd_sizes_skipping_a_corrupt_one(
        trained_run, tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_image(folder / "odd.png", rng.integers(0, 255, (61, 203, 3), dtype=np.uint8))
    write_image(folder / "sub" / "gray.jpg", rng.integers(0, 255, (130, 97), dtype=np.uint8))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image: ignored")
    big = write_image(tmp_path / "big.png", make_pair(1, "big", 0, 300)[:, :300])
    out = tmp_path / "out"
    code = main(["--checkpoint", trained_run["checkpoint"], str(folder), big, trained_run["shards"],
                 "--out", str(out), "--dropout", "off", "--norm-stats", "running",
                 "--max-whole-pixels", "50000", "--quiet"])
    captured = capsys.readouterr()
    assert code == 1, captured  # something was skipped, all else written
    assert "skipped broken.jpg: corrupt_image" in captured.err
    assert "wrote 9 images" in captured.out and "(1 tiled)" in captured.out
    assert "skipped 1 {'corrupt_image': 1}" in captured.out
    assert Image.open(out / "odd.png").size == (203, 61)
    assert Image.open(out / "sub" / "gray.png").size == (97, 130)
    assert Image.open(out / "big.png").size == (300, 300)
    shard_outputs = sorted(p.name for p in out.glob("[0-9]*.png"))
    assert shard_outputs == [f"{i}.png" for i in range(6)]  # the val split's keys
    assert Image.open(out / "0.png").size == (128, 128)  # the input half of the pair


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
    for name, flags in {"on0": ["--seed", "0"], "on0again": ["--seed", "0"], "on1": ["--seed", "1"],
                        "off": ["--dropout", "off", "--seed", "0"], "off1": ["--dropout", "off", "--seed", "1"]}.items():
        assert main(["--checkpoint", checkpoint, image, "--out", str(tmp_path / name), "--quiet", *flags]) == 0
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


@pytest.mark.slow
@pytest.mark.timeout(280)
def test_a_4096_square_image_is_tiled_on_cpu(trained_run, tmp_path, capsys):
    """Memory stays bounded by the tile batch; time is the tiles' forwards (~1 min here)."""
    pixels = np.tile(make_pair(2, "huge", 0, 512)[:, :512], (8, 8, 1))  # 4096 x 4096
    image = str(tmp_path / "huge.jpg")
    Image.fromarray(pixels).save(image, quality=90)
    start = time.perf_counter()
    assert main(["--checkpoint", trained_run["checkpoint"], image, "--out", str(tmp_path / "out"),
                 "--dropout", "off", "--norm-stats", "running", "--overlap", "0.25", "--quiet"]) == 0
    print(f"4096x4096 tiled in {time.perf_counter() - start:.1f} s")
    assert "(1 tiled)" in capsys.readouterr().out
    assert Image.open(tmp_path / "out" / "huge.png").size == (4096, 4096)
