"""shard.py records what the trainer's start-up check reads: each split's stored sizes
(per half, "WxH") and source layouts, summed from the part files; and --load-size with an
aspect-keeping --preprocess stores the trainer's own resize. In-process, tiny images."""
import io
import json

import numpy as np
import torch
from PIL import Image

from data_tools import inspect_shards, packing, shard, shard_options
from pipeline.data.augmentation import KEEPS_ASPECT, PREPROCESS, resize_u8
from pipeline.data.decode import decode_image
from pipeline.data.format import Manifest
from tests.helpers.shard_trees import (
    manifest,
    noise_image,
    run_shard,
    samples_by_tarfile,
    write_files,
)


def first_keys_by_size(found: dict, size_of) -> dict:
    """{"WxH": (count, first key)} of samples read back in shard order (= plan order)."""
    sizes = {}
    for (_, key), members in found.items():
        name = size_of(members)
        count, first = sizes.get(name, (0, key))
        sizes[name] = (count + 1, first)
    return sizes


def half_size(members: dict) -> str:
    meta = json.loads(members["json"])
    if "pair.jpg" in members:
        return f"{meta['split_x']}x{meta['height']}"
    return "{}x{}".format(*Image.open(io.BytesIO(members["input.png"])).size)


def recorded(dest, split="train") -> dict:
    return {name: (entry["samples"], entry["example"])
            for name, entry in manifest(dest)["splits"][split]["sizes"].items()}


def test_sizes_and_layouts_of_pair_and_separate_sources(tmp_path, capsys):
    files = {f"ab/{i}.jpg": noise_image(32, 16, seed=i) for i in range(4)}  # halves 16x16
    files.update({f"ab/w{i}.jpg": noise_image(48, 16, seed=10 + i) for i in range(2)})  # 24x16
    files.update({f"sep/A/{i}.png": noise_image(16, 16, "PNG", seed=20 + i) for i in range(3)})
    files.update({f"sep/B/{i}.png": noise_image(16, 16, "PNG", seed=30 + i) for i in range(3)})
    files.update({"sep/A/tall.png": noise_image(8, 12, "PNG", 40),
                  "sep/B/tall.png": noise_image(8, 12, "PNG", 41)})
    write_files(tmp_path, files)
    for source, dest, extra in (("ab", "pair", ()), ("ab", "split", ("--split-pairs",)),
                                ("sep", "sep", ())):
        assert run_shard(tmp_path / source, tmp_path / dest, "--workers", "1", *extra) == 0
        found = samples_by_tarfile(str(tmp_path / dest))
        assert recorded(tmp_path / dest) == first_keys_by_size(found, half_size)
    assert set(recorded(tmp_path / "pair")) == {"16x16", "24x16"}
    assert [v[0] for k, v in sorted(recorded(tmp_path / "pair").items())] == [4, 2]
    assert recorded(tmp_path / "split") == recorded(tmp_path / "pair")  # re-encoded: same sizes
    assert recorded(tmp_path / "sep") == {"16x16": (3, recorded(tmp_path / "sep")["16x16"][1]),
                                          "8x12": (1, "tall")}
    layouts = [manifest(tmp_path / d)["splits"]["train"]["layouts"] for d in ("pair", "split", "sep")]
    assert layouts == [{"pair": 6, "separate": 0}, {"pair": 6, "separate": 0},
                       {"pair": 0, "separate": 4}]
    part = json.loads((tmp_path / "sep" / "_parts" / "train-000000.json").read_text())
    (name, (count, key)), = part["sizes"].items()  # one pair per shard here
    assert count == 1 and part["layouts"] == {"pair": 0, "separate": 1}
    capsys.readouterr()
    assert inspect_shards.main([str(tmp_path / "sep")]) == 0
    out = capsys.readouterr().out
    assert "train: 2 distinct stored sizes (width x height of each half): 16x16: 3 (e.g. " in out
    assert "8x12: 1 (e.g. tall); source layouts: input and target files 4" in out


def test_a_part_without_sizes_leaves_its_split_unknown(tmp_path, capsys):
    files = {f"train/{i}.jpg": noise_image(32, 16, seed=i) for i in range(3)}
    files.update({"val/0.jpg": noise_image(32, 16, seed=9)})
    write_files(tmp_path / "src", files)
    dest = tmp_path / "out"
    assert run_shard(tmp_path / "src", dest, "--workers", "1") == 0
    old = dest / "_parts" / "train-000001.json"  # as an older shard.py wrote it
    part = json.loads(old.read_text())
    del part["sizes"], part["layouts"]
    old.write_text(json.dumps(part))
    assert shard.main(["merge", str(dest)]) == 0
    m = manifest(dest)
    assert m["splits"]["train"]["sizes"] is None and m["splits"]["train"]["layouts"] is None
    assert m["splits"]["val"]["sizes"] == {"16x16": {"samples": 1, "example": "0"}}
    assert Manifest.read(str(dest)).splits["train"].sizes is None
    stamp = (dest / "manifest.json").stat().st_mtime_ns
    assert shard.main(["merge", str(dest)]) == 0  # the same manifest: left as it is
    assert (dest / "manifest.json").stat().st_mtime_ns == stamp
    capsys.readouterr()
    assert inspect_shards.main([str(dest)]) == 0
    assert "train: sizes not recorded (packed by an older shard.py)" in capsys.readouterr().out


def test_load_size_with_scale_width_keeps_the_aspect(tmp_path):
    files = {f"{i}.jpg": noise_image(96, 16, seed=i) for i in range(2)}  # halves 48 x 16 (3:1)
    write_files(tmp_path / "src", files)
    dest = tmp_path / "out"
    assert run_shard(tmp_path / "src", dest, "--load-size", "24", "--preprocess", "scale_width",
                     "--workers", "1") == 0
    m = manifest(dest)
    assert (m["options"]["load_size"], m["options"]["preprocess"]) == (24, "scale_width")
    assert m["splits"]["train"]["sizes"]["24x8"]["samples"] == 2
    for members in samples_by_tarfile(str(dest)).values():
        name = json.loads(members["json"])["source"]
        whole = decode_image(files[name], "jpg", 3)
        halves = torch.from_numpy(np.stack([whole[:, :48], whole[:, 48:]])).permute(0, 3, 1, 2)
        expected = resize_u8(halves, (8, 24)).permute(0, 2, 3, 1).numpy()
        stored = np.stack([np.asarray(Image.open(io.BytesIO(members[f"{kind}.png"])))
                           for kind in ("input", "target")])
        assert stored.shape == (2, 8, 24, 3) and (stored == expected).all(), name
    assert run_shard(tmp_path / "src", tmp_path / "square", "--load-size", "24", "--workers", "1") == 0
    assert "preprocess" not in manifest(tmp_path / "square")["options"]  # as before: N x N
    assert set(manifest(tmp_path / "square")["splits"]["train"]["sizes"]) == {"24x24"}


def test_to_load_size_scales_the_short_side_and_brings_the_target_to_the_input():
    rng = np.random.default_rng(0)
    wide, other = rng.integers(0, 256, (2, 10, 30, 3), dtype=np.uint8)
    sizes = [im.size for im in packing.to_load_size([wide, other[:5]], 6, "scale_shortside_and_crop")]
    assert sizes == [(18, 6), (18, 6)]  # PIL sizes are (width, height)
    squashed = packing.to_load_size([wide, other], 6)
    assert [im.size for im in squashed] == [(6, 6), (6, 6)]


def exit_code(*args) -> int:
    """run_shard's exit code, argparse's usage errors (SystemExit) included."""
    try:
        return run_shard(*args)
    except SystemExit as done:
        return done.code


def test_preprocess_mistakes_are_one_line(tmp_path, capsys):
    write_files(tmp_path / "src", {"0.jpg": noise_image(32, 16)})
    for extra, says in ((["--preprocess", "scale_width"], "give --load-size N too"),
                        (["--load-size", "8", "--preprocess", "crop"], "'crop' resizes nothing"),
                        (["--load-size", "8", "--preprocess", "none"], "data.preprocess=none"),
                        (["--load-size", "8", "--resize", "8", "--preprocess", "scale_width"],
                         "choose one")):
        capsys.readouterr()
        assert exit_code(tmp_path / "src", tmp_path / "out", *extra) == 2, extra
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and says in error, (extra, error)
        assert not (tmp_path / "out").exists()


def test_the_resizing_modes_are_the_trainers():
    assert shard_options.RESIZES == ("resize_and_crop", *KEEPS_ASPECT)
    assert set(shard_options.RESIZES) | set(shard_options.NO_RESIZE) == set(PREPROCESS)
