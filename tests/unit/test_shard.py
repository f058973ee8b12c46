"""data_tools/shard.py in-process: round trips on local disk, determinism, slices + merge,
every bad-input case, the help text. On S3 servers, after a real kill and as a failing
process: tests/integration/test_shard_runs.py."""
import argparse
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools import inspect_shards, packing, shard
from pipeline.data.augmentation import resize_u8
from pipeline.data.decode import decode_image
from tests.helpers.shard_trees import (
    assert_pairs_intact,
    make_aligned,
    manifest,
    noise_image,
    run_shard,
    samples_by_tarfile,
    samples_by_webdataset,
    tree,
    write_files,
)

# ---------------------------------------------------------------------------- datasets

def make_folders(root: Path, n: int, fmt="PNG") -> dict:
    files = {}
    for i in range(n):
        files[f"A/p{i}.png"] = noise_image(16, 16, fmt, seed=i)
        files[f"B/p{i}.png"] = noise_image(16, 16, fmt, seed=1000 + i)
    write_files(root, files)
    return files


# -------------------------------------------------------------------------- round trips

def test_aligned_roundtrip_local_tarfile_and_webdataset(tmp_path):
    files = make_aligned(tmp_path / "src", {"train": 20, "val": 5})
    dest = tmp_path / "out"
    assert run_shard(tmp_path / "src", dest, "--workers", "2") == 0
    found = samples_by_tarfile(str(dest))
    assert_pairs_intact(found, files)
    m = manifest(dest)
    assert m["format_version"] == 1 and m["rejected"] == {}
    assert len(m["splits"]["train"]["shards"]) == 8  # --min-shards for ranks x workers
    assert [m["splits"][s]["samples"] for s in ("train", "val")] == [20, 5]
    for info in m["splits"].values():
        assert info["bytes"] == sum(s["bytes"] for s in info["shards"])
        for s in info["shards"]:
            assert (dest / s["name"]).stat().st_size == s["bytes"]
    assert samples_by_webdataset(str(dest)) == found
    assert inspect_shards.main([str(dest)]) == 0
    with open(dest / "train-000003.tar", "r+b") as f:  # a damaged shard is reported
        f.truncate(3000)
    assert inspect_shards.main([str(dest)]) == 2


def test_folders_and_list_layouts_keep_bytes(tmp_path):
    files = make_folders(tmp_path / "src", 6)
    assert run_shard(tmp_path / "src", tmp_path / "out", "--split", "val") == 0
    found = samples_by_tarfile(str(tmp_path / "out"))
    assert {split for split, _ in found} == {"val"} and len(found) == 6
    for members in found.values():
        name = json.loads(members["json"])["source"]
        assert members["input.png"] == files[f"A/{name}"]
        assert members["target.png"] == files[f"B/{name}"]

    with open(tmp_path / "src" / "pairs.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["input", "target"])
        rows.writerows([[f"A/p{i}.png", str(tmp_path / "src" / f"B/p{i}.png")] for i in range(6)])
    assert run_shard(tmp_path / "src" / "pairs.csv", tmp_path / "out_csv") == 0
    found = samples_by_tarfile(str(tmp_path / "out_csv"))
    assert len(found) == 6
    for members in found.values():
        name = json.loads(members["json"])["source"]  # as listed: A/pI.png
        assert members["input.png"] == files[name]
        assert members["target.png"] == files[name.replace("A/", "B/")]


def test_jsonl_list_with_splits_and_dotted_names(tmp_path):
    files = {"x/a.b.v2.png": noise_image(8, 8, "PNG", 1), "y/a.b.v2.png": noise_image(8, 8, "PNG", 2),
             "x/a_b_v2.png": noise_image(8, 8, "PNG", 3), "y/a_b_v2.png": noise_image(8, 8, "PNG", 4),
             "x/c.png": noise_image(8, 8, "PNG", 5), "y/c.png": noise_image(8, 8, "PNG", 6)}
    write_files(tmp_path, files)
    rows = [{"input": "x/a.b.v2.png", "target": "y/a.b.v2.png", "split": "train"},
            {"input": "x/a_b_v2.png", "target": "y/a_b_v2.png", "split": "train"},
            {"input": "x/c.png", "target": "y/c.png", "split": "val"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_shard(tmp_path / "pairs.jsonl", tmp_path / "out") == 0
    found = samples_by_tarfile(str(tmp_path / "out"))
    keys = sorted(found)
    assert [k[0] for k in keys] == ["train", "train", "val"]
    assert all("." not in key for _, key in keys) and len({k for _, k in keys}) == 3
    for members in found.values():
        listed = json.loads(members["json"])["source"]
        assert members["input.png"] == files[listed]
        assert members["target.png"] == files[listed.replace("x/", "y/")]


def test_split_pairs_and_resize_reencode(tmp_path):
    make_aligned(tmp_path / "src", {None: 3}, size=(64, 32))
    assert run_shard(tmp_path / "src", tmp_path / "out", "--split-pairs", "--resize", "8") == 0
    found = samples_by_tarfile(str(tmp_path / "out"))
    for members in found.values():
        meta = json.loads(members["json"])
        assert (meta["layout"], meta["source_layout"], meta["reencoded"]) == ("separate", "pair", "png")
        for kind in ("input", "target"):
            assert Image.open(io.BytesIO(members[f"{kind}.png"])).size == (8, 8)
    # --split-pairs alone is lossless: halves equal the decoded source's halves
    assert run_shard(tmp_path / "src", tmp_path / "out2", "--split-pairs") == 0
    for members in samples_by_tarfile(str(tmp_path / "out2")).values():
        source = Image.open(tmp_path / "src" / json.loads(members["json"])["source"]).convert("RGB")
        halves = [Image.open(io.BytesIO(members[f"{kind}.png"])).tobytes() for kind in ("input", "target")]
        assert halves == [source.crop((0, 0, 32, 32)).tobytes(), source.crop((32, 0, 64, 32)).tobytes()]


# ------------------------------------------------------------------------ determinism

def test_workers_and_slices_give_identical_bytes(tmp_path):
    make_aligned(tmp_path / "src", {"train": 30, "val": 6})
    src = tmp_path / "src"
    assert run_shard(src, tmp_path / "w1", "--workers", "1", "--max-samples", "3") == 0
    assert run_shard(src, tmp_path / "w2", "--workers", "2", "--max-samples", "3") == 0
    for i in (1, 0):  # slices in any order, then merge
        assert run_shard(src, tmp_path / "sl", "--slice", f"{i}/2", "--max-samples", "3") == 0
        assert not (tmp_path / "sl" / "manifest.json").exists()
    assert shard.main(["merge", str(tmp_path / "sl")]) == 0
    reference = tree(tmp_path / "w1")
    assert len([n for n in reference if n.endswith(".tar")]) == 16  # 10 train + 6 val (one each)
    assert tree(tmp_path / "w2") == reference
    assert tree(tmp_path / "sl") == reference
    # a different seed reorders pairs across shards
    assert run_shard(src, tmp_path / "s1", "--seed", "1", "--max-samples", "3") == 0
    assert tree(tmp_path / "s1")["train-000000.tar"] != reference["train-000000.tar"]


def test_pre_resized_pixels_are_the_trainers(tmp_path):
    """--load-size stores what the trainer computes from the originals: its decoder, its
    resize (one process here; the pair-by-pair processes write the same bytes:
    tests/integration/test_shard_runs.py)."""
    src = tmp_path / "src"
    files = make_aligned(src, {"train": 4, "val": 1}, size=(64, 32))
    gray = Image.open(io.BytesIO(noise_image(64, 32, seed=9))).convert("L")
    extra = {"train/gray.jpg": gray, "train/cmyk.jpg": gray.convert("CMYK"),
             "train/png.png": Image.open(io.BytesIO(noise_image(64, 32, "PNG", seed=8)))}
    for rel, im in extra.items():
        buffer = io.BytesIO()
        im.save(buffer, "PNG" if rel.endswith("png") else "JPEG")
        files[rel] = buffer.getvalue()
    write_files(src, files)
    assert run_shard(src, tmp_path / "out", "--load-size", "24", "--workers", "1") == 0
    found = samples_by_tarfile(str(tmp_path / "out"))
    assert len(found) == len(files)
    for members in found.values():
        name = json.loads(members["json"])["source"]
        whole = decode_image(files[name], name.rsplit(".", 1)[1], 3)
        halves = torch.from_numpy(np.stack([whole[:, :32], whole[:, 32:]])).permute(0, 3, 1, 2)
        expected = resize_u8(halves, 24).permute(0, 2, 3, 1).numpy()
        stored = [np.asarray(Image.open(io.BytesIO(members[f"{kind}.png"])).convert("RGB"))
                  for kind in ("input", "target")]
        assert (np.stack(stored) == expected).all(), name


def test_decoding_for_reencoding_is_pils_even_where_simplejpeg_refuses():
    """simplejpeg is a speed-up: the same pixels as PIL, and where it refuses a file
    (CMYK, cut data) PIL decides, with the message rejected.jsonl has always recorded."""
    im = Image.open(io.BytesIO(noise_image(48, 24, seed=3)))
    for mode, options in (("RGB", {}), ("RGB", {"subsampling": 0}), ("RGB", {"progressive": True}),
                          ("L", {}), ("CMYK", {})):
        buffer = io.BytesIO()
        im.convert(mode).save(buffer, "JPEG", quality=90, **options)
        data = buffer.getvalue()
        pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert (packing.decode_rgb(data, "JPEG") == pil).all(), (mode, options)
    cut = noise_image(48, 24)[:300]
    with pytest.raises(OSError) as pil:
        Image.open(io.BytesIO(cut)).convert("RGB")
    with pytest.raises(OSError, match=f"^{re.escape(str(pil.value))}$"):
        packing.decode_rgb(cut, "JPEG")


def test_auto_workers(monkeypatch):
    monkeypatch.setattr(packing, "usable_cpus", lambda: 16)
    assert packing.auto_workers(False, 10**6) == 8  # copying is I/O
    assert packing.auto_workers(True, 10**6) == 16  # re-encoding: every usable CPU
    assert packing.auto_workers(True, 150) == 2  # ... that has enough pairs to pay


def test_a_rerun_finds_its_work_done_and_touches_nothing(tmp_path, capsys):
    make_aligned(tmp_path / "src", {"train": 6, "val": 2})
    assert run_shard(tmp_path / "src", tmp_path / "out", "--workers", "1") == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    capsys.readouterr()
    assert run_shard(tmp_path / "src", tmp_path / "out", "--workers", "1") == 0
    assert "all 8 were packed already: nothing to do" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == before


def test_merge_refuses_missing_slices(tmp_path, capsys):
    make_aligned(tmp_path / "src", {None: 8})
    assert run_shard(tmp_path / "src", tmp_path / "out", "--slice", "0/2") == 0
    capsys.readouterr()
    assert shard.main(["merge", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("shard.py: error: ")
    assert re.search("4 of 8 shards .* not packed yet", error), error


# -------------------------------------------------------------------------- bad input

def test_bad_aligned_inputs_are_counted_and_listed(tmp_path):
    src = tmp_path / "src"
    files = make_aligned(src, {None: 6})
    jpeg = noise_image(32, 16)
    write_files(src, {
        "text.jpg": b"this is not an image",
        "gif.gif": noise_image(32, 16, "GIF"),
        "odd.jpg": noise_image(33, 16),          # halves of different sizes
        "huge.jpg": noise_image(64, 32),        # above --max-pixels below
        "cut.jpg": jpeg[:jpeg.find(b"\xff\xda") + 100],  # headers whole, data cut
    })
    dest = tmp_path / "out"
    assert run_shard(src, dest, "--max-pixels", "1000") == 0
    assert manifest(dest)["rejected"] == {"not_an_image": 1, "size_mismatch": 1,
                                          "too_large": 1, "unsupported_format": 1}
    rows = [json.loads(line) for line in (dest / "rejected.jsonl").read_text().splitlines()]
    assert sorted((r["source"], r["reason"]) for r in rows) == [
        ("gif.gif", "unsupported_format"), ("huge.jpg", "too_large"),
        ("odd.jpg", "size_mismatch"), ("text.jpg", "not_an_image")]
    found = samples_by_tarfile(str(dest))
    assert_pairs_intact({k: v for k, v in found.items() if k[1] != "cut"}, files)

    assert run_shard(src, tmp_path / "verified", "--max-pixels", "1000", "--verify") == 0
    assert manifest(tmp_path / "verified")["rejected"]["decode_error"] == 1
    assert manifest(tmp_path / "verified")["splits"]["train"]["samples"] == 6
    assert run_shard(src, tmp_path / "strict", "--strict") == 2  # --strict: any rejection fails


def test_bad_folder_inputs_missing_halves_and_size_policy(tmp_path):
    src = tmp_path / "src"
    make_folders(src, 4)
    write_files(src, {"A/only_a.png": noise_image(16, 16, "PNG"),
                      "B/only_b.png": noise_image(16, 16, "PNG"),
                      "A/big.png": noise_image(16, 16, "PNG"),
                      "B/big.png": noise_image(8, 8, "PNG")})
    assert run_shard(src, tmp_path / "skip") == 0
    m = manifest(tmp_path / "skip")
    assert m["rejected"] == {"missing_input": 1, "missing_target": 1, "size_mismatch": 1}
    assert m["splits"]["train"]["samples"] == 4

    assert run_shard(src, tmp_path / "resize", "--on-size-mismatch", "resize") == 0
    found = samples_by_tarfile(str(tmp_path / "resize"))
    assert len(found) == 5
    big = found[("train", "big")]
    assert Image.open(io.BytesIO(big["target.png"])).size == (16, 16)
    assert json.loads(big["json"])["reencoded"] == "png"


def test_rejected_pair_leaves_a_hole(tmp_path):
    files = make_aligned(tmp_path / "src", {None: 16})
    assert run_shard(tmp_path / "src", tmp_path / "good") == 0
    (tmp_path / "src" / "3.jpg").write_bytes(b"garbage")
    assert run_shard(tmp_path / "src", tmp_path / "bad") == 0
    good, bad = manifest(tmp_path / "good"), manifest(tmp_path / "bad")
    changed = [a["name"] for a, b in zip(good["splits"]["train"]["shards"],
                                         bad["splits"]["train"]["shards"]) if a != b]
    assert len(changed) == 1  # only the shard that held 3.jpg differs
    assert len(files) - 1 == bad["splits"]["train"]["samples"]


def pack_parser() -> argparse.ArgumentParser:
    """The parser of `shard.py pack` (and of `shard.py SOURCE DEST`): every option."""
    subcommands = next(a for a in shard.build_parser()._actions
                       if isinstance(a, argparse._SubParsersAction))
    return subcommands.choices["pack"]


def test_help_lists_every_option_with_default():
    text = pack_parser().format_help()
    options = [a for a in pack_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(options) > 10
    for action in options:
        assert action.option_strings[-1] in text
    assert text.count("(default:") == len(options)
