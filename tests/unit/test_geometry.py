"""data.preprocess (issue #40): each mode's sizes against the definitions of
pipeline/data/augmentation.py, on non-square images; a disc stays a disc in what the
networks see when the aspect is kept; crops are a function of (seed, epoch, key) on any
world size and across a resume; the default geometry's crops are the old ones, bit for
bit; validation batches hold one size; and the config refuses what cannot work."""
import json

import numpy as np
import pytest
import torch

from pipeline import data
from pipeline.config import DataConfig, from_cli
from pipeline.data.augmentation import Geometry, derive_seed, round_to
from pipeline.errors import ConfigError, DataError
from tests.helpers.images import keys_of, next_batch
from tests.helpers.wide_pairs import centre, disc_image, extent, write_wide_pairs

WIDE, TALL = (32, 96), (96, 32)  # stored (height, width): 96 x 32 and 32 x 96 images


# ---------------------------------------------------------------- sizes, by definition

def test_round_to_the_nearest_multiple_halves_up_at_least_one():
    assert [round_to(side, 16) for side in (39, 40, 23, 24, 25, 16, 3, 0, 1)] == \
        [32, 48, 16, 32, 32, 16, 16, 16, 16]
    assert [round_to(side, 5) for side in (32, 96, 33, 12)] == [30, 95, 35, 10]
    assert round_to(96, 1) == 96 and round_to(7, 1) == 7


# mode, load_size, crop (h, w), multiple, stored (h, w) -> resize_target, train_size, eval_size;
# every expected size worked out by hand from the table in augmentation.py's docstring
SIZES = [
    # squashed to load x load whatever the aspect; eval at the crop (non-square here)
    ("resize_and_crop", 72, (48, 64), 8, WIDE, (72, 72), (48, 64), (48, 64)),
    ("resize_and_crop", 72, (48, 64), 8, TALL, (72, 72), (48, 64), (48, 64)),
    # the stored size; the crop; eval at the stored size rounded (32 -> 30, 96 -> 95)
    ("crop", 72, (16, 32), 5, WIDE, (32, 96), (16, 32), (30, 95)),
    ("crop", 72, (32, 16), 64, TALL, (96, 32), (32, 16), (128, 64)),  # 1.5 -> 2, 0.5 -> 1
    # width = load, height = int(load * h / w), rounded; no crop
    ("scale_width", 72, (16, 16), 1, WIDE, (24, 72), (24, 72), (24, 72)),
    ("scale_width", 72, (16, 16), 16, WIDE, (32, 80), (32, 80), (32, 80)),  # 1.5, 4.5 up
    ("scale_width", 72, (16, 16), 16, TALL, (224, 80), (224, 80), (224, 80)),  # 216: 13.5 up
    ("scale_width", 100, (16, 16), 8, WIDE, (32, 104), (32, 104), (32, 104)),  # int(33.3) = 33
    ("scale_width", 100, (16, 16), 1, WIDE, (33, 100), (33, 100), (33, 100)),
    ("scale_width", 80, (16, 16), 1, WIDE, (26, 80), (26, 80), (26, 80)),  # 26.7 truncates
    # the same scale unrounded before the crop; eval rounded
    ("scale_width_and_crop", 100, (16, 48), 8, WIDE, (33, 100), (16, 48), (32, 104)),
    ("scale_width_and_crop", 72, (48, 16), 16, TALL, (216, 72), (48, 16), (224, 80)),
    ("scale_width_and_crop", 80, (16, 48), 8, WIDE, (26, 80), (16, 48), (24, 80)),  # 26.7 -> 26
    # the short side to load, the long one int(load * long / short)
    ("scale_shortside_and_crop", 50, (32, 48), 8, WIDE, (50, 150), (32, 48), (48, 152)),
    ("scale_shortside_and_crop", 50, (48, 32), 8, TALL, (150, 50), (48, 32), (152, 48)),
    ("scale_shortside_and_crop", 50, (32, 48), 8, (30, 100), (50, 166), (32, 48), (48, 168)),
    # the stored size rounded, nothing else
    ("none", 72, (16, 16), 1, WIDE, (32, 96), (32, 96), (32, 96)),
    ("none", 72, (16, 16), 5, TALL, (95, 30), (95, 30), (95, 30)),
    ("none", 72, (16, 16), 64, WIDE, (64, 128), (64, 128), (64, 128)),
]


@pytest.mark.parametrize("mode,load,crop,multiple,stored,resized,train,evaluated", SIZES)
def test_each_mode_brings_a_non_square_image_to_its_defined_size(mode, load, crop, multiple, stored,
                                                                  resized, train, evaluated):
    geometry = Geometry(mode, load, crop, multiple)
    assert geometry.resize_target(stored) == resized
    assert geometry.train_size(stored) == train
    assert geometry.eval_size(stored) == evaluated
    assert geometry.crops == (mode in ("resize_and_crop", "crop", "scale_width_and_crop",
                                       "scale_shortside_and_crop"))
    # the training pipeline gives that size: augment with the sample's own crop parameters
    images = torch.zeros(1, 3, *stored, dtype=torch.uint8)
    params = torch.tensor([geometry.params(0, 0, "k", stored)])
    assert tuple(data.augment(images, params, geometry).shape[-2:]) == train


def test_the_crop_is_crop_height_by_crop_size_and_square_without_crop_height():
    assert Geometry.of(DataConfig(crop_size=64, crop_height=32)).crop == (32, 64)
    assert Geometry.of(DataConfig(crop_size=64)).crop == (64, 64)
    geometry = Geometry.of(DataConfig(load_size=80, crop_size=64, crop_height=32), multiple=8)
    assert geometry.eval_size(WIDE) == geometry.eval_size(TALL) == (32, 64)  # the crop, (h, w)
    assert Geometry.of(DataConfig()) == Geometry() == Geometry("resize_and_crop", 286, (256, 256), 1, True)
    assert Geometry.of(DataConfig(flip=False, preprocess="none"), 4).flip is False


def test_a_crop_larger_than_the_resized_image_is_a_data_error_naming_the_sample():
    geometry = Geometry("scale_width_and_crop", 72, (32, 64))  # 96 x 32 -> 72 x 24 < 64 x 32
    with pytest.raises(DataError, match="sample k7: stored 96x32, resized to 72x24"):
        geometry.params(0, 0, "k7", WIDE)


# -------------------------------------------------------- a disc stays a disc, on the stream

def stream_discs(folder, steps: int, **overrides) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(key, input, target) of `steps` batches of the real training stream (generator
    multiple 8, no flip, batch 4)."""
    cfg = DataConfig(train=folder, val=folder, flip=False, batch_size=4, num_workers=0,
                     shuffle_buffer=4, **overrides)
    loader = data.make_train_loader(cfg, rank=0, world_size=1, seed=1, in_channels=3,
                                    out_channels=3, multiple=8)
    out = []
    for _ in range(steps):
        batch = next_batch(loader)
        assert batch["input"].shape[0] == 4
        out += zip(batch["key"], batch["input"], batch["target"])
    return out


@pytest.mark.parametrize("layout", ["pair", "separate"])
def test_scale_width_keeps_a_disc_round_where_resize_and_crop_squashes_it(tmp_path, layout):
    pairs = write_wide_pairs(tmp_path / "wide", count=8, size=(96, 32), layout=layout)
    discs = pairs.discs["train"]
    # 96 x 32 -> width 120, height int(120 * 32 / 96) = 40: x1.25 both ways
    kept = stream_discs(pairs.path, 2, preprocess="scale_width", load_size=120, crop_size=8)
    assert sorted(key for key, _, _ in kept) == pairs.keys("train")
    for key, x, y in kept:
        assert x.shape == y.shape == (3, 40, 120)
        width, height = extent(x[0] > 0)
        assert abs(width - height) <= 2, (key, width, height)
        assert abs(width - 2.5 * discs[key].r) <= 2, (key, width, discs[key])
        cx, cy = centre(x[0] > 0)
        assert abs(cx - 1.25 * discs[key].x) <= 1 and abs(cy - 1.25 * discs[key].y) <= 1, key
        assert (x + y).abs().max() <= 2.01 / 127.5  # the target is still the input's inverse
    # the reference's default squashes 96 x 32 to 120 x 120: x1.25 across, x3.75 down
    squashed = stream_discs(pairs.path, 2, preprocess="resize_and_crop", load_size=120, crop_size=120)
    for key, x, _ in squashed:
        assert x.shape == (3, 120, 120)
        width, height = extent(x[0] > 0)
        assert 2.6 < height / width < 3.4, (key, width, height)


# ------------------------------------------------------- crops: a function of (seed, epoch, key)

CROPPED = dict(preprocess="scale_width_and_crop", load_size=72, crop_size=32, crop_height=16,
               streams=4, shuffle_buffer=3, num_workers=0)  # 96 x 32 -> 72 x 24, crops 32 x 16


def crops_by_key(folder, world: int, steps: int, **overrides) -> list[dict[str, torch.Tensor]]:
    """The first `steps` global batches of `world` ranks (global batch 4): {key: input}."""
    cfg = DataConfig(train=folder, val=folder, batch_size=4 // world, **{**CROPPED, **overrides})
    loaders = [data.make_train_loader(cfg, rank=r, world_size=world, seed=7, in_channels=3,
                                      out_channels=3, have_batch_all_ranks=bool)
               for r in range(world)]
    out = [{} for _ in range(steps)]
    for loader in loaders:  # no collective is needed: every stream has whole batches
        for step in range(steps):
            batch = next_batch(loader)
            out[step].update(zip(batch["key"], batch["input"]))
    return out


def test_crops_are_the_same_on_one_or_two_processes_and_each_keys_own(tmp_path):
    pairs = write_wide_pairs(tmp_path / "wide", count=24)
    one = crops_by_key(pairs.path, 1, 8)  # 6 global batches an epoch: into epoch 1
    two = crops_by_key(pairs.path, 2, 8)
    assert [sorted(b) for b in two] == [sorted(b) for b in one]
    assert all(torch.equal(b2[k], b1[k]) for b1, b2 in zip(one, two) for k in b1)
    # and they are each key's crop from (seed, epoch, key), recomputed by hand
    geometry = Geometry.of(DataConfig(**{k: v for k, v in CROPPED.items() if k != "streams"}), flip=True)
    corners = set()
    for step, batch in enumerate(one):
        for key, crop in batch.items():
            stored = disc_image(pairs.sizes[key], pairs.discs["train"][key])
            top, left, flip = geometry.params(7, step // 6, key, stored.shape[:2])
            corners.add((top, left))
            resized = data.resize_u8(data.chw(stored), (24, 72))[0, :, top:top + 16, left:left + 32]
            manual = data.to_unit_range(resized.flip(-1) if flip else resized)
            assert crop.shape == (3, 16, 32) and torch.equal(crop, manual), (step, key)
    assert len(corners) > 10  # the crops really move
    epoch0 = {k: v for b in one[:6] for k, v in b.items()}
    assert any(not torch.equal(v, epoch0[k]) for b in one[6:] for k, v in b.items())  # epoch matters


@pytest.mark.parametrize("stop", [2, 5])
def test_a_resumed_stream_crops_as_the_uninterrupted_one(tmp_path, stop):
    pairs = write_wide_pairs(tmp_path / "wide", count=24)
    cfg = DataConfig(train=pairs.path, val=pairs.path, batch_size=4, **CROPPED)
    make = lambda: data.make_train_loader(cfg, rank=0, world_size=1, seed=7, in_channels=3,
                                          out_channels=3)
    straight = make()
    reference = [next_batch(straight) for _ in range(8)]  # into epoch 1
    first = make()
    batches = [next_batch(first) for _ in range(stop)]
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    batches += [next_batch(resumed) for _ in range(8 - stop)]
    assert [b["key"] for b in batches] == [b["key"] for b in reference]
    for got, want in zip(batches, reference):
        assert got["input"].shape == (4, 3, 16, 32)
        assert torch.equal(got["input"], want["input"]) and torch.equal(got["target"], want["target"])


# ---------------------------------------------------------- the default geometry, bit for bit

def old_params(seed: int, epoch: int, key: str) -> tuple[int, int, int]:
    """The crop and flip as computed before data.preprocess (load 286, crop 256, flip)."""
    rng = np.random.default_rng(derive_seed(seed, epoch, key, "augment"))
    top, left = rng.integers(0, 286 - 256 + 1, size=2)
    flip = int(rng.random() < 0.5)
    return int(top), int(left), flip


def test_the_default_geometry_crops_and_flips_as_before():
    geometry = Geometry.of(DataConfig())
    cases = [(seed, epoch, f"{prefix}{i:04d}") for seed in (0, 3) for epoch in (0, 1, 7)
             for prefix, i in (("s00n", 0), ("s00n", 1), ("facade_", 17), ("x", 123), ("", 9))]
    assert len(set(cases)) == 30
    for case in cases:
        for size in (WIDE, (256, 256), (600, 400)):  # the stored size does not matter: 286 x 286
            assert geometry.params(*case, size) == old_params(*case), (case, size)
    params = [old_params(*case) for case in cases]
    assert {p[2] for p in params} == {0, 1} and len({p[:2] for p in params}) > 20


def test_the_default_augment_is_the_resize_to_286_then_the_slice():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 40, 60), dtype=torch.uint8, generator=generator)
    params = torch.tensor([old_params(0, 0, key) for key in ("a", "b", "c")])
    params[0, 2], params[1, 2] = 0, 1  # one of each flip
    got = data.augment(images, params, Geometry.of(DataConfig()))
    resized = data.resize_u8(images, 286)
    assert resized.shape == (3, 3, 286, 286)
    for i, (top, left, flip) in enumerate(params.tolist()):
        want = resized[i, :, top:top + 256, left:left + 256]
        assert torch.equal(got[i], want.flip(-1) if flip else want), i


# ---------------------------------------------------------------- validation: one size a batch

@pytest.mark.parametrize("world", [1, 2])
def test_eval_batches_hold_one_size_and_every_sample_once(tmp_path, world):
    sizes = [(96, 32), (60, 44)]  # with multiple 16: 96 x 32 stays, 60 x 44 -> 64 x 48
    pairs = write_wide_pairs(tmp_path / "wide", count=2, val_count=11, size=sizes)
    cfg = DataConfig(train=pairs.path, val=pairs.path, preprocess="none", num_workers=0)
    expected = {(32, 96), (48, 64)}
    seen, shapes, lengths = [], set(), set()
    for rank in range(world):
        loader = data.make_eval_loader(cfg, rank=rank, world_size=world, in_channels=3,
                                       out_channels=3, batch_size=3, multiple=16)
        batches = list(loader)
        assert len(keys_of(batches)) == loader.rank_images
        for batch in batches:
            size = tuple(batch["input"].shape[-2:])
            assert size in expected and tuple(batch["target"].shape[-2:]) == size
            assert 1 <= len(batch["key"]) == batch["input"].shape[0] <= 3
            for key, x, y in zip(batch["key"], batch["input"], batch["target"]):
                width, height = pairs.sizes[key]
                assert size == (round_to(height, 16), round_to(width, 16)), key
                assert (x + y).abs().max() <= 2.01 / 127.5  # input and target of one pair
            shapes.add(size)
            lengths.add(len(batch["key"]))
        seen += keys_of(batches)
    assert sorted(seen) == pairs.keys("val")  # every sample once
    assert shapes == expected
    assert 3 in lengths and 1 in lengths  # batches fill up while the size holds, and end when it changes


# ------------------------------------------------------------------------- config refusals

@pytest.mark.parametrize("argv,message", [
    (["--data.augment_on=device", "--data.preprocess=scale_width"],
     "data.augment_on=device batches one resize for all images, which data.preprocess=scale_width "
     "does not have: use augment_on=worker"),
    (["--data.augment_on=device", "--data.preprocess=crop"], "data.preprocess=crop does not have"),
    (["--model.generator=resnet_6blocks", "--data.crop_size=128", "--data.crop_height=66"],
     "data.crop_height: 66 is not divisible by 4 as model.generator=resnet_6blocks needs"),
    (["--data.crop_height=128"], "data.crop_height: 128 is not divisible by 256 as "
                                 "model.generator=unet_256 needs"),
    (["--data.crop_height=512"], "data.load_size: 286 is smaller than the crop 256x512"),
    (["--data.preprocess=scale_width_and_crop", "--data.load_size=128"],
     "data.crop_size: 256 is wider than data.load_size 128, the width scale_width_and_crop gives"),
])
def test_geometry_the_config_refuses_in_one_line(argv, message):
    with pytest.raises(ConfigError) as error:
        from_cli(argv)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_geometry_the_config_accepts():
    cfg, _ = from_cli(["--data.augment_on=device"])  # the default geometry on the device
    assert cfg.data.preprocess == "resize_and_crop"
    cfg, _ = from_cli(["--data.preprocess=scale_width", "--model.generator=resnet_6blocks",
                       "--data.crop_size=128", "--data.crop_height=64"])
    assert Geometry.of(cfg.data, cfg.model.size_multiple).crop == (64, 128)
    cfg, _ = from_cli(["--data.preprocess=crop", "--data.load_size=64", "--data.crop_size=256"])
    assert cfg.data.load_size == 64  # load_size is not the crop's bound outside resize_and_crop
