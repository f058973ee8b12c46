"""The start-up gate's geometry checks (pipeline/startup.py check_geometry): data.preprocess
against the image sizes the train split's manifest records, refused in one line before any
process or file exists. Manifests are written by hand: what shard.py records is
tests/unit/test_shard_sizes.py's."""
import json

import pytest

from pipeline import startup
from pipeline.config import ConfigError, from_cli


def manifest(folder, sizes=None, layouts=None, options=None):
    """A manifest.json whose train split records `sizes` ({"WxH": (samples, example)})."""
    split = {"samples": sum(n for n, _ in (sizes or {}).values()) or 1, "shards": []}
    if sizes is not None:
        split["sizes"] = {name: {"samples": n, "example": key} for name, (n, key) in sizes.items()}
    if layouts is not None:
        split["layouts"] = layouts
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(
        {"format_version": 1, "splits": {"train": split}, "options": options or {}}))
    return str(folder)


def config(shards, *extra):
    cfg, _ = from_cli([f"--data.train={shards}", "--model.generator=resnet_6blocks", *extra])
    return cfg


WIDE = {"96x32": (20, "wide_0001")}
MIXED = {"96x32": (20, "wide_0001"), "64x32": (3, "narrow_0007")}


def test_mixed_sizes_a_batch_cannot_hold_are_refused_naming_them(tmp_path):
    cfg = config(manifest(tmp_path / "s", MIXED), "--data.preprocess=scale_width",
                 "--data.load_size=96", "--data.batch_size=4")
    with pytest.raises(ConfigError) as err:
        startup.check_geometry(cfg)
    message = str(err.value)
    assert "\n" not in message and "2 sizes" in message
    assert "96x32 for wide_0001" in message and "96x48 for narrow_0007" in message
    assert "data.batch_size=1" in message and "shard.py --load-size" in message


def test_the_same_sizes_pass_with_batch_1_or_a_crop_mode(tmp_path):
    shards = manifest(tmp_path / "s", MIXED, {"separate": 23})
    images = startup.check_geometry(config(shards, "--data.preprocess=scale_width",
                                           "--data.load_size=96", "--data.batch_size=1"))
    assert images.layout == "separate" and [s for s, _ in images.sizes] == [(32, 96), (32, 64)]
    startup.check_geometry(config(shards, "--data.preprocess=scale_width_and_crop", "--data.load_size=96",
                                  "--data.crop_size=64", "--data.crop_height=32", "--data.batch_size=4"))


def test_one_size_batches_with_scale_width(tmp_path):
    images = startup.check_geometry(config(manifest(tmp_path / "s", WIDE, {"pair": 20}),
                                           "--data.preprocess=scale_width", "--data.load_size=96",
                                           "--data.batch_size=4"))
    assert images.layout == "pair"


def test_an_elastic_resume_that_raises_the_batch_is_checked_again(tmp_path):
    cfg = config(manifest(tmp_path / "s", MIXED), "--data.preprocess=none", "--data.batch_size=1")
    images = startup.check_geometry(cfg)
    cfg.data.batch_size = 2  # what elastic.keep_global_batch may decide on fewer processes
    with pytest.raises(ConfigError, match="data.batch_size=2, but data.preprocess=none gives"):
        startup.check_batchable(cfg, images)


def test_images_smaller_than_the_crop_are_refused(tmp_path):
    cfg = config(manifest(tmp_path / "s", {"96x32": (5, "small_3")}), "--data.preprocess=crop",
                 "--data.crop_size=64", "--data.crop_height=64")
    with pytest.raises(ConfigError, match=r"5 training images are smaller than the crop 64x64 "
                                          r"\(e.g. small_3: 96x32, resized to 96x32\)"):
        startup.check_geometry(cfg)


def test_an_older_manifest_without_sizes_gets_one_line_unless_the_default(tmp_path):
    shards = manifest(tmp_path / "s")
    startup.check_geometry(config(shards))  # resize_and_crop: every image becomes a square
    with pytest.raises(ConfigError, match="needs the images' sizes, which .* does not record "
                                          r"\(packed by an older shard.py\): pack the images "
                                          "again .* into a new folder"):
        startup.check_geometry(config(shards, "--data.preprocess=scale_width"))


def test_the_discriminator_is_checked_against_the_smallest_uncropped_side(tmp_path):
    cfg = config(manifest(tmp_path / "s", {"256x16": (4, "strip_1")}), "--data.preprocess=none")
    with pytest.raises(ConfigError, match="needs images of at least 24 px a side "
                                          r"\(the smallest side data.preprocess=none gives: 16\)"):
        startup.check_geometry(cfg)


@pytest.mark.parametrize("packed,extra,ok", [
    ({"load_size": 96, "preprocess": "scale_width"}, ["--data.preprocess=scale_width_and_crop"], True),
    ({"load_size": 96, "preprocess": "scale_width"}, ["--data.preprocess=scale_width"], True),
    ({"load_size": 96, "preprocess": "scale_width"}, [], False),  # resize_and_crop would squash them
    ({"load_size": 96}, ["--data.preprocess=scale_width"], False),  # packed as squares
])
def test_pre_resized_shards_must_match_the_geometry(tmp_path, packed, extra, ok):
    cfg = config(manifest(tmp_path / "s", WIDE, options=packed), "--data.load_size=96",
                 "--data.crop_size=32", *extra)
    if ok:
        startup.check_geometry(cfg)
        return
    with pytest.raises(ConfigError, match="already resized"):
        startup.check_geometry(cfg)
