"""Issue #39, every input checked where it enters, table by table: for each case the exit
code, the one line (never a traceback), nothing written that was not asked for, and the
listed rejection where one applies. In-process (each tool's main(argv)); the map of older
bad-input cases is tests/unit/test_bad_inputs.py's docstring.

shard.py's sources         SHARD_CASES: same-stem files in A/ + B/ (ambiguous_source), a
                           list row given twice (duplicate_row), a CSV with a byte-order
                           mark, a symbolic link loop, JSONL lines that are no object or no
                           JSON, a list that is not UTF-8, a split that is no file name,
                           hidden files (skipped, counted), a full disk (what was kept)
manifests, every reader    MANIFEST_DEFECTS x READERS (the trainer's list_shards, translate,
                           inspect-shards): a shard listed twice, unknown format versions,
                           counts that are no whole number, a pattern matching no file
one policy for a folder    shard.py and translate find, skip and count the same files
--out naming a file        translate, evaluate, export
translate                  an image too narrow to split is skipped and counted
train.overwrite            the aside name is taken: the next free one
"""
from __future__ import annotations

import csv
import errno
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools import inspect_shards, shard
from pipeline import cli, data, evaluate, export, run_folder, translate
from tests.helpers.images import write_dataset
from tests.helpers.inference_runs import make_export
from tests.helpers.shard_trees import make_aligned, manifest, noise_image, write_files


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return make_export(tmp_path_factory.mktemp("export") / "g")


def files_below(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def error_line(capsys, prog: str) -> str:
    """The one error line the tool printed (stderr may hold warnings too); no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def rejected_rows(dest: Path) -> list[dict]:
    return [json.loads(line) for line in (dest / "rejected.jsonl").read_text().splitlines()]


def write_csv(path: Path, rows: list[list[str]], encoding: str = "utf-8") -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows([["input", "target"], *rows])
    path.write_text(buffer.getvalue(), encoding=encoding)
    return str(path)


def folders(root: Path, names: dict) -> None:
    """A/ and B/ files of 16x16 noise: {relative path: format}."""
    write_files(root, {rel: noise_image(16, 16, fmt, seed=rel) for rel, fmt in names.items()})


# ------------------------------------------------------------------------ shard.py's sources

@dataclass
class ShardCase:
    """`make(tmp_path)` builds SOURCE and returns it; `code` and `says` (in the error line,
    or in the summary on exit 0); `rejected`: the manifest's counts; `listed`: (source,
    reason) rows rejected.jsonl must hold; `samples`: packed."""
    make: Callable[[Path], str]
    code: int
    says: str
    rejected: dict | None = None
    listed: tuple = ()
    samples: int | None = None


def same_stem(root: Path) -> str:
    folders(root / "src", {"A/x.jpg": "JPEG", "B/x.png": "PNG", "B/x.jpg": "JPEG",
                           "A/y.png": "PNG", "B/y.jpg": "JPEG",  # other formats, one each: a pair
                           "A/z.png": "PNG", "A/z.webp": "WEBP", "B/z.png": "PNG"})
    return str(root / "src")


def listed_twice(root: Path) -> str:
    folders(root, {f"{h}/p{i}.png": "PNG" for h in "AB" for i in range(3)})
    return write_csv(root / "pairs.csv", [["A/p0.png", "B/p0.png"], ["A/p1.png", "B/p1.png"],
                                          ["A/p0.png", "B/p0.png"], ["A/p2.png", "B/p2.png"]])


def one_input_two_targets(root: Path) -> str:
    folders(root, {"A/p0.png": "PNG", "B/t1.png": "PNG", "B/t2.png": "PNG"})
    return write_csv(root / "pairs.csv", [["A/p0.png", "B/t1.png"], ["A/p0.png", "B/t2.png"]])


def with_bom(root: Path) -> str:
    folders(root, {f"{h}/p{i}.png": "PNG" for h in "AB" for i in range(2)})
    return write_csv(root / "pairs.csv", [[f"A/p{i}.png", f"B/p{i}.png"] for i in range(2)],
                     encoding="utf-8-sig")


def link_loop(root: Path) -> str:
    make_aligned(root / "src", {None: 2})
    os.symlink("..", root / "src" / "up")
    return str(root / "src")


def jsonl(*lines: str) -> Callable[[Path], str]:
    def make(root: Path) -> str:
        folders(root, {"A/p.png": "PNG", "B/p.png": "PNG"})
        (root / "pairs.jsonl").write_text("".join(line + "\n" for line in lines))
        return str(root / "pairs.jsonl")
    return make


def latin1(root: Path) -> str:
    folders(root, {"A/é.png": "PNG", "B/é.png": "PNG"})
    return write_csv(root / "pairs.csv", [["A/é.png", "B/é.png"]], encoding="latin-1")


def bad_split(root: Path) -> str:
    folders(root, {"A/p.png": "PNG", "B/p.png": "PNG"})
    (root / "pairs.csv").write_text("input,target,split\nA/p.png,B/p.png,../elsewhere\n")
    return str(root / "pairs.csv")


def hidden(root: Path) -> str:
    make_aligned(root / "src", {None: 3})
    write_files(root / "src", {".x.jpg": noise_image(32, 16), "._0.jpg": b"AppleDouble",
                               ".thumbs/1.jpg": noise_image(32, 16), ".make_demo.json": b"{}"})
    return str(root / "src")


PAIR = '{"input": "A/p.png", "target": "B/p.png"}'
SHARD_CASES = {
    "same stem, other extensions": ShardCase(
        same_stem, 0, "rejected 2 pairs (ambiguous_source 2)", {"ambiguous_source": 2},
        (("x.jpg", "ambiguous_source"), ("z.png", "ambiguous_source")), samples=1),
    "a list row twice": ShardCase(
        listed_twice, 0, "rejected 1 pairs (duplicate_row 1)", {"duplicate_row": 1},
        (("A/p0.png", "duplicate_row"),), samples=3),
    "one input listed with two targets": ShardCase(one_input_two_targets, 0, "2 samples in", {},
                                                   samples=2),
    "a CSV with a byte-order mark": ShardCase(with_bom, 0, "2 samples in", {}, samples=2),
    "a symbolic link loop": ShardCase(link_loop, 2, "up -> .. makes a loop"),
    "a JSONL line that is a list": ShardCase(
        jsonl(PAIR, '["A/p.png", "B/p.png"]'), 2, "line 2: a JSON list, not an object"),
    "a JSONL line that is no JSON": ShardCase(jsonl(PAIR, "{input: A/p.png}"), 2,
                                              "line 2: not valid JSON"),
    "a JSONL path that is a number": ShardCase(jsonl('{"input": 3, "target": "B/p.png"}'), 2,
                                               "line 1: input must be a string, got 3"),
    "a list that is not UTF-8": ShardCase(latin1, 2, "is not UTF-8 text"),
    "a split that is no file name": ShardCase(bad_split, 2, "split '../elsewhere' is not a usable name"),
    "hidden files": ShardCase(hidden, 0, "skipped 3 hidden image files", {}, samples=3),
}


@pytest.mark.parametrize("case", SHARD_CASES.values(), ids=SHARD_CASES)
def test_shard_py_sources(tmp_path, capsys, case):
    source, dest = case.make(tmp_path), tmp_path / "out"
    before = files_below(tmp_path)
    assert shard.main([source, str(dest), "--workers", "1", "--quiet"]) == case.code
    if case.code:
        assert case.says in error_line(capsys, "shard.py")
        assert files_below(tmp_path) == before  # not even DEST
        return
    assert case.says in capsys.readouterr().err
    m = manifest(dest)
    assert m["rejected"] == case.rejected
    assert sum(info["samples"] for info in m["splits"].values()) == case.samples
    assert {(row["source"], row["reason"]) for row in rejected_rows(dest)} == set(case.listed)


def test_a_full_disk_is_one_line_that_says_what_was_kept(tmp_path, capsys, monkeypatch):
    """The third shard's first member hits a full disk (EFBIG, as under a file-size
    limit): exit 1, one line, the two finished shards kept, no temporary file left; the
    same command then packs only the rest."""
    make_aligned(tmp_path / "src", {None: 8})
    argv = [str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "1", "--quiet"]
    written, real = [], shard.write_member

    def full_disk(tar, name, payload):
        if len(written) == 4:  # 2 members a sample, 1 sample a shard
            raise OSError(errno.EFBIG, "File too large")
        written.append(name)
        real(tar, name, payload)
    monkeypatch.setattr(shard, "write_member", full_disk)
    assert shard.main(argv) == 1
    line = error_line(capsys, "shard.py")
    assert "failed: File too large" in line and "kept 2 of 8 shards finished" in line, line
    left = sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert left == ["plan.json", "train-000000.json", "train-000000.tar", "train-000001.json",
                    "train-000001.tar"], left
    monkeypatch.setattr(shard, "write_member", real)
    assert shard.main(argv) == 0
    assert "this run packed 6 shards" in capsys.readouterr().err


# ------------------------------------------------------------------- manifests, every reader

def listed_twice_manifest(tree: dict) -> None:
    tree["splits"]["train"]["shards"].append(dict(tree["splits"]["train"]["shards"][0]))


def set_in(path: tuple, value) -> Callable[[dict], None]:
    def change(tree: dict) -> None:
        node = tree
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return change


MANIFEST_DEFECTS = {
    "a shard listed twice": (listed_twice_manifest, "lists shard 'train-000000.tar' twice"),
    "format_version 2": (set_in(("format_version",), 2), "format_version 2 is not one this version reads"),
    "format_version 0": (set_in(("format_version",), 0), "format_version 0 is not one"),
    "format_version '1'": (set_in(("format_version",), "1"), "format_version '1' is not one"),
    "samples '3'": (set_in(("splits", "train", "shards", 0, "samples"), "3"),
                    "shard 'train-000000.tar' samples must be a whole number >= 0, got \"3\""),
    "samples 2.5": (set_in(("splits", "train", "samples"), 2.5),
                    "split 'train' samples must be a whole number >= 0, got 2.5"),
    "no pattern match": (None, "the pattern"),
}


def trainer(argv: list[str]) -> int:
    """What the trainer's start-up gate runs on data.train, behind the tools' convention."""
    return cli.entry_point("train.py", lambda args: data.list_shards(args[0], "train") and 0)(argv)


READERS = {
    "trainer": (lambda spec, out, ckpt: trainer([spec]), "train.py"),
    "translate": (lambda spec, out, ckpt: translate.main(
        ["--checkpoint", ckpt, spec, "--out", out, "--split", "train", "--quiet"]), "translate.py"),
    "inspect-shards": (lambda spec, out, ckpt: inspect_shards.main([spec]), "inspect_shards.py"),
}


READER_CASES = [(reader, defect) for reader in READERS for defect in MANIFEST_DEFECTS
                if not (reader == "inspect-shards" and defect == "no pattern match")]  # a folder only


@pytest.mark.parametrize("reader,defect", READER_CASES, ids=[f"{r}-{d}" for r, d in READER_CASES])
def test_every_reader_refuses_a_bad_manifest_in_one_line(tmp_path, capsys, checkpoint, reader, defect):
    shards = tmp_path / "shards"
    write_dataset(shards, [2, 2])
    change, says = MANIFEST_DEFECTS[defect]
    spec = str(shards)
    if change is None:  # a brace pattern: one that names no file, then one missing a file
        spec = str(shards / "train-{000003..000004}.tar")
    else:
        tree = json.loads((shards / "manifest.json").read_text())
        change(tree)
        (shards / "manifest.json").write_text(json.dumps(tree))
    before = files_below(tmp_path)
    run, prog = READERS[reader]
    assert run(spec, str(tmp_path / "out"), checkpoint) == 2
    assert says in error_line(capsys, prog)
    assert files_below(tmp_path) == before
    if change is None:
        assert run(str(shards / "train-{000001..000002}.tar"), str(tmp_path / "out"), checkpoint) == 2
        assert "1 of the 2 files the pattern" in error_line(capsys, prog)


def test_the_same_shard_in_two_splits_is_still_read():
    """Only a shard listed twice in one split is refused: train and val may share one."""
    tree = {"format_version": 1, "splits": {
        split: {"samples": 2, "shards": [{"name": "a.tar", "samples": 2}]} for split in ("train", "val")}}
    assert data.Manifest.from_json(tree).counts() == {"a.tar": 2}


# ----------------------------------------------------------- one policy for a folder's files

def test_shard_py_and_translate_count_a_folder_alike(tmp_path, capsys, checkpoint):
    """One folder of A|B images, read by both tools: a PNG named .jpg is used by both;
    TIFF, BMP and GIF are unsupported_format in both (counted, listed); a hidden file is
    skipped and counted by both; nothing is dropped unsaid."""
    src = tmp_path / "src"
    pair = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 64, 3), dtype=np.uint8))
    formats = {"a.png": "PNG", "b.jpg": "PNG", "c.tif": "TIFF", "d.bmp": "BMP", "e.gif": "GIF",
               ".f.png": "PNG"}
    encoded = {}
    for name, fmt in formats.items():
        buffer = io.BytesIO()
        pair.save(buffer, fmt)
        encoded[name] = buffer.getvalue()
    write_files(src, encoded)
    # the trainer's decoder: the bytes decide, as shard.py's probe decides
    assert np.array_equal(data.decode_image(encoded["b.jpg"], "jpg", 3), np.asarray(pair))
    for name in ("c.tif", "d.bmp", "e.gif"):
        with pytest.raises(data.BadSample, match="unsupported_format"):
            data.decode_image(encoded[name], "png", 3)
    assert shard.main([str(src), str(tmp_path / "shards"), "--workers", "1", "--quiet"]) == 0
    assert "skipped 1 hidden image files" in capsys.readouterr().err
    assert manifest(tmp_path / "shards")["rejected"] == {"unsupported_format": 3}
    assert sorted(row["source"] for row in rejected_rows(tmp_path / "shards")) == ["c.tif", "d.bmp", "e.gif"]
    assert manifest(tmp_path / "shards")["splits"]["train"]["samples"] == 2

    out = tmp_path / "out"
    assert translate.main(["--checkpoint", checkpoint, str(src), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    said = captured.out + captured.err
    assert "5 images" in said  # every image file but the hidden one
    assert "skipped 1 hidden image files" in said
    for name in ("c.tif", "d.bmp", "e.gif"):
        assert f"skipped {name}: unsupported_format" in said
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "(unsupported_format 3)" in errors[0] and "Traceback" not in said
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]


def test_translate_skips_an_image_too_narrow_to_split(tmp_path, capsys, checkpoint):
    Image.new("RGB", (1, 6), (10, 20, 30)).save(tmp_path / "thin.png")
    Image.new("RGB", (12, 6), (10, 20, 30)).save(tmp_path / "wide.png")
    out = tmp_path / "out"
    assert translate.main(["--checkpoint", checkpoint, str(tmp_path / "thin.png"),
                           str(tmp_path / "wide.png"), "--out", str(out), "--split-pair", "yes",
                           "--quiet"]) == 2
    captured = capsys.readouterr()
    assert "skipped thin.png: cannot_split (1 pixel wide" in captured.err
    assert "1 input(s) could not be translated (cannot_split 1)" in captured.err
    assert "Traceback" not in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["wide.png"]


# ------------------------------------------------------------------------- --out, a file

OUT_TOOLS = {
    "translate": (lambda ckpt, out, tmp: translate.main(
        ["--checkpoint", ckpt, str(tmp / "x.png"), "--out", out, "--quiet"]), "translate.py"),
    "evaluate": (lambda ckpt, out, tmp: evaluate.main(
        ["--checkpoint", ckpt, "--data", str(tmp / "shards"), "--out", out]), "evaluate.py"),
    "export": (lambda ckpt, out, tmp: export.main(
        ["--checkpoint", ckpt, "--out", out, "--format", "safetensors"]), "export.py"),
}


@pytest.mark.parametrize("below", [False, True], ids=["the file", "below the file"])
@pytest.mark.parametrize("tool", OUT_TOOLS, ids=OUT_TOOLS)
def test_out_naming_a_file_is_one_line(tmp_path, capsys, checkpoint, tool, below):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    write_dataset(tmp_path / "shards", [2], split="val")
    (tmp_path / "report.txt").write_text("mine")
    out = str(tmp_path / "report.txt" / "sub" if below else tmp_path / "report.txt")
    before = files_below(tmp_path)
    run, prog = OUT_TOOLS[tool]
    assert run(checkpoint, out, tmp_path) == 2
    line = error_line(capsys, prog)
    assert line.endswith("give a folder (it is made if missing)")
    assert ("lies below the file" if below else f"--out {out} is a file") in line
    assert files_below(tmp_path) == before and (tmp_path / "report.txt").read_text() == "mine"


# ------------------------------------------------------------------------ train.overwrite

def test_overwrite_moves_aside_to_a_free_name(tmp_path, monkeypatch):
    """Two overwrites within a second: the second's aside name is taken, so it takes the
    next free one; no folder is replaced or merged."""
    monkeypatch.setattr(run_folder.time, "strftime", lambda fmt: "20270101-000000")
    run_dir = tmp_path / "run"
    for n in range(3):
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "config.yaml").write_text(f"run {n}")
        (run_dir / "checkpoints" / "latest").write_text("step_1")
        assert run_folder.prepare(str(run_dir), "", overwrite=True, rank=0) == ""
        assert not run_dir.exists()
    asides = sorted(p.name for p in tmp_path.iterdir())
    assert asides == ["run.old-20270101-000000", "run.old-20270101-000000-2", "run.old-20270101-000000-3"]
    assert [(tmp_path / name / "config.yaml").read_text() for name in asides] == ["run 0", "run 1", "run 2"]
