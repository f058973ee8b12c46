"""The demo dataset: layout, determinism, and that pix2pix can learn it."""
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools.make_demo import main as make_demo
from data_tools.make_demo import make_pair
from pipeline.gan import train_step
from pipeline.losses import Pix2PixObjective
from pipeline.models import PatchDiscriminator, UNetGenerator, init_weights


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_writes_aligned_pairs_in_train_and_val(tmp_path):
    assert make_demo([str(tmp_path), "--train", "5", "--val", "3", "--size", "64"]) == 0
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [f"{i}.jpg" for i in range(5)]
    assert len(list((tmp_path / "val").iterdir())) == 3
    with Image.open(tmp_path / "train" / "0.jpg") as image:
        assert image.size == (128, 64) and image.mode == "RGB"  # input | target side by side


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        make_demo([str(tmp_path / name), "--train", "3", "--val", "1", "--size", "64",
                   "--seed", str(seed), "--format", "png"])
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_a_second_run_finds_its_data_made_and_writes_nothing(tmp_path, capsys):
    args = [str(tmp_path), "--train", "3", "--val", "2", "--size", "32"]
    assert make_demo(args) == 0
    made = digest(tmp_path)
    stats = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")}
    capsys.readouterr()
    assert make_demo(args) == 0
    assert capsys.readouterr().out == (f"demo data: {tmp_path} already holds these 3 train + 2 val "
                                       "pairs (64 wide x 32 high: input | target, jpg); nothing written\n")
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")} == stats
    # a changed image, a run cut short (no stamp), other parameters: written again
    for spoil in (lambda: (tmp_path / "val" / "1.jpg").write_bytes(b"x"),
                  lambda: (tmp_path / ".make_demo.json").unlink()):
        spoil()
        assert make_demo(args) == 0 and "nothing written" not in capsys.readouterr().out
        assert digest(tmp_path) == made
    assert make_demo(args[:-1] + ["48"]) == 0 and "nothing written" not in capsys.readouterr().out


def test_target_is_a_function_of_the_labels():
    pair = make_pair(0, "train", 7, 64)
    labels, target = pair[:, :64], pair[:, 64:]
    assert len(np.unique(labels.reshape(-1, 3), axis=0)) >= 3  # several classes
    assert target.std() > 10  # textured, not flat


def test_rejects_tiny_sizes(tmp_path, capsys):
    with pytest.raises(SystemExit):
        make_demo([str(tmp_path), "--size", "8"])
    assert "--size must be >= 32" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_few_hundred_gan_steps_lower_val_l1_by_30_percent():
    size = 64

    def split(name, count):
        pixels = np.stack([make_pair(0, name, i, size) for i in range(count)])
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
        return images[..., :size], images[..., size:]

    x_train, y_train = split("train", 96)
    x_val, y_val = split("val", 24)
    torch.manual_seed(0)
    G = init_weights(UNetGenerator(3, 3, num_downs=6, base_filters=16))
    D = init_weights(PatchDiscriminator(6, 16, 3))
    opt_G, opt_D = (torch.optim.Adam(m.parameters(), 2e-4, betas=(0.5, 0.999)) for m in (G, D))

    def val_l1():  # the reference's protocol: G in train mode
        with torch.no_grad():
            return (G(x_val) - y_val).abs().mean().item()

    untrained = val_l1()
    order = torch.Generator().manual_seed(0)
    for _ in range(200):
        batch = torch.randint(0, len(x_train), (4,), generator=order)
        train_step(G, D, opt_G, opt_D, x_train[batch], y_train[batch], Pix2PixObjective())
    assert val_l1() <= 0.7 * untrained
