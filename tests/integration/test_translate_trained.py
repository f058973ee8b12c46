"""translate.py with a generator the real trainer trained (tests/helpers/inference_runs.py):
tiled output matches the whole image without seams, the CLI on files, folders and shards
of odd sizes skipping a corrupt one, and a 4096 x 4096 image tiled on CPU. These run at
each input's own size (--input-size native), where sizes vary and big images are tiled;
the default, the run's scale: tests/unit/test_translate.py."""
import time

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools.make_demo import make_pair
from pipeline.checkpoint import load_generator
from pipeline.models import set_test_mode
from pipeline.translate import main, make_forward
from pipeline.translate_geometry import run_tiled, run_whole
from tests.helpers.images import write_image

# all on trained_run: the real trainer, 100 steps (15-90 s on 2 cores, by load)
pytestmark = pytest.mark.slow


def gradient_ratio(image: torch.Tensor, lines: list[int], period: int) -> float:
    """Mean |gradient| across the tile border lines over that across the other lines of
    the same phase modulo `period`. Transposed convolutions leave a periodic texture
    (phase-dependent gradients) in any U-Net output, tiled or not; comparing like phases
    leaves only what the tiles add."""
    gx = (image[..., :, 1:] - image[..., :, :-1]).abs().mean(dim=(0, 1, 2))
    gy = (image[..., 1:, :] - image[..., :-1, :]).abs().mean(dim=(0, 1, 3))
    border = [p - 1 for p in lines]  # gradient index p - 1 is between pixels p - 1 and p
    interior = [i for i in range(len(gx)) if (i - border[0]) % period == 0 and i not in border]
    across, along = torch.cat([gx[border], gy[border]]), torch.cat([gx[interior], gy[interior]])
    return (across.mean() / along.mean()).item()


@pytest.mark.parametrize("tile,overlap", [(256, 128), (128, 32)])
def test_tiled_matches_whole_image_on_a_trained_generator(trained_run, tile, overlap):
    generator, _ = load_generator(trained_run["checkpoint"])
    forward = make_forward(set_test_mode(generator, dropout=False, batch_stats=False),
                           torch.device("cpu"), bf16=False)
    size = 500  # a demo facade drawn at this size, not a multiple of anything
    pixels = make_pair(7, "tiles", 0, size)[:, :size]
    image = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    whole = run_whole(forward, image, 2 ** generator.num_downs)
    tiled = run_tiled(forward, image, tile, overlap, batch_size=4)
    psnr = 10 * torch.log10(4 / (tiled - whole).square().mean()).item()  # range [-1, 1]: peak 2
    stride, margin = tile - overlap, overlap // 2
    lines = sorted({p for k in range(size // stride + 2)
                    for p in (k * stride - margin, k * stride - margin + tile) if 1 <= p < size})
    seams = gradient_ratio(tiled, lines, period=8)
    print(f"tile {tile} overlap {overlap}: tiled vs whole PSNR {psnr:.2f} dB, "
          f"border/interior gradient {seams:.3f}")
    assert psnr >= 30
    assert abs(seams - 1) <= 0.10


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
                 "--max-whole-pixels", "50000", "--quiet", "--input-size", "native",
                 "--split-pair", "no"])  # whole images, though the run trained on A|B pairs
    captured = capsys.readouterr()
    assert code == 2, captured  # something was skipped, all else written
    assert "skipped broken.jpg: corrupt_image" in captured.err
    assert "wrote 9 images" in captured.out and "(1 tiled)" in captured.out
    assert "skipped 1 {'corrupt_image': 1}" in captured.out
    assert Image.open(out / "odd.png").size == (203, 61)
    assert Image.open(out / "sub" / "gray.png").size == (97, 130)
    assert Image.open(out / "big.png").size == (300, 300)
    shard_outputs = sorted(p.name for p in out.glob("[0-9]*.png"))
    assert shard_outputs == [f"{i}.png" for i in range(6)]  # the val split's keys
    assert Image.open(out / "0.png").size == (128, 128)  # the input half of the pair


@pytest.mark.timeout(280)
def test_a_4096_square_image_is_tiled_on_cpu(trained_run, tmp_path, capsys):
    """Memory stays bounded by the tile batch; time is the tiles' forwards (~1 min here)."""
    pixels = np.tile(make_pair(2, "huge", 0, 512)[:, :512], (8, 8, 1))  # 4096 x 4096
    image = str(tmp_path / "huge.jpg")
    Image.fromarray(pixels).save(image, quality=90)
    start = time.perf_counter()
    assert main(["--checkpoint", trained_run["checkpoint"], image, "--out", str(tmp_path / "out"),
                 "--dropout", "off", "--norm-stats", "running", "--overlap", "0.25", "--quiet",
                 "--input-size", "native", "--split-pair", "no"]) == 0
    print(f"4096x4096 tiled in {time.perf_counter() - start:.1f} s")
    assert "(1 tiled)" in capsys.readouterr().out
    assert Image.open(tmp_path / "out" / "huge.png").size == (4096, 4096)
