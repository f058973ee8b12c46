"""Issue #10, bad inputs: each gets a one-line error or a skip counted by reason, where the
user meets it; never a silent wrong result, a traceback for bad data, or a hang.
Bad input -> behaviour -> tests (T = integration/test_bad_inputs_runs.py::
test_trainer_runs_through_a_folder_of_bad_inputs, the real trainer on one folder holding
most of them; unit/ and integration/ are tests/unit/ and tests/integration/; a bare name
is a test of this file):

truncated tar -> rest of the shard skipped: truncated_shard
    unit/test_data.py::test_damaged_tars_are_counted_not_silently_short,
    integration/test_data_streams.py::test_bad_data_on_one_rank_no_hang_equal_steps_counted, T
random bytes named .tar -> truncated_shard (no tar header)
    unit/test_data.py::test_all_bad_data_ends_instead_of_spinning, T
path-traversal member names -> nothing is extracted (stream mode), no key becomes a path:
    the sample is skipped as unsafe_name; link members are never followed
    test_path_traversal_names_are_never_paths, T
decompression bomb (huge header) -> reader: too_large from the header; shard.py: rejected
    unit/test_data.py::test_bomb_guard_reads_only_the_header,
    test_shard_py_gray_rgb_bomb_and_corrupt_inputs, T
pair with different sizes -> shard.py: size_mismatch, or --on-size-mismatch resize; reader:
    kept, both halves resized to load_size (the reference's way), still aligned
    unit/test_shard.py::test_bad_folder_inputs_missing_halves_and_size_policy,
    test_pairs_of_different_sizes_are_resized_alike, T
grayscale mixed with RGB -> the configured channels (16-bit gray scaled, not clipped)
    unit/test_data.py::test_decode_policy, test_gray_and_rgb_mix_into_the_configured_channels,
    test_shard_py_gray_rgb_bomb_and_corrupt_inputs, T
empty shard -> not read (manifest count 0): every epoch keeps equal, non-zero steps
    integration/test_bad_inputs_runs.py::test_manifest_errors_and_empty_shards_on_two_ranks, T
manifest disagreeing with its shards -> loader: warning + manifest_mismatch, equal steps on
    2 ranks; inspect_shards.py: each disagreement listed, exit 2
    integration/test_bad_inputs_runs.py::test_manifest_errors_and_empty_shards_on_two_ranks,
    test_inspect_shards_reports_a_manifest_that_disagrees, T
pipe: URL in a manifest -> refused in one line (loader, trainer, inspect_shards.py)
    test_manifest_names_outside_the_folder_are_refused,
    integration/test_bad_inputs_runs.py::test_trainer_refuses_bad_config_in_one_line;
    as data.train, config value, shard.py source: unit/test_data.py::test_list_shards_forms,
    unit/test_config.py::test_cli_errors_are_one_line_and_name_the_key,
    integration/test_shard_runs.py::test_fails_at_once_with_one_line
config with an unknown key or a wrong type -> the trainer exits 2 with one line
    integration/test_bad_inputs_runs.py::test_trainer_refuses_bad_config_in_one_line
    (all messages: unit/test_config.py)
checkpoint of another architecture -> resume: one line naming the model keys; export and
    translate: one line naming the first tensor that does not fit
    integration/test_bad_inputs_runs.py::test_resume_with_another_architecture_fails_in_one_line,
    test_export_names_the_tensor_that_does_not_fit,
    unit/test_translate.py::test_a_checkpoint_of_another_architecture_is_rejected_in_one_line
weights file that is not ours -> refused in one line (weights_only=True, safetensors), and
    its code never runs
    integration/test_bad_inputs_runs.py::test_foreign_weights_are_refused_without_running_them
issue #39's inputs (same-stem files, list rows twice, byte-order marks, link loops, JSONL
    lines that are no object, a full disk, manifests listing a shard twice or of an unknown
    version or with counts that are no whole number, patterns matching no file, hidden and
    TIFF/BMP/GIF files, a PNG named .jpg, --out naming a file, an image too narrow to split,
    an aside name taken) -> one table per kind: unit/test_input_checks.py

This file: the data stream, the data tools and export on bad inputs, in-process.
"""
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools import inspect_shards, shard
from pipeline import data, export, translate
from tests.helpers.bad_inputs import (
    bomb_png,
    first_epoch_skips,
    gray16,
    pair_members,
    traversal_members,
    write_manifest,
    write_tar,
)
from tests.helpers.images import (
    SIZE,
    add_member,
    config,
    epoch_batches,
    image_bytes,
    keys_of,
    next_batch,
    sample_pixels,
    write_dataset,
)
from tests.helpers.inference_runs import make_export

# ------------------------------------------------------------------------- the data stream

def test_path_traversal_names_are_never_paths(tmp_path, monkeypatch):
    """Stream mode extracts nothing (extract/extractall would fail the test); such
    samples are skipped as unsafe_name, so no key becomes a path (translate.py's outputs)."""
    folder, work = tmp_path / "shards", tmp_path / "work" / "deeper"
    folder.mkdir()
    work.mkdir(parents=True)
    link = tarfile.TarInfo("lnk.input.png")
    link.type, link.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
    with tarfile.open(folder / "val-000000.tar", "w") as tar:
        for name, payload in traversal_members() + pair_members("ok"):
            add_member(tar, name, payload)
        tar.addfile(link)  # a link member is not a file: never followed
        add_member(tar, "lnk.target.png", image_bytes(sample_pixels("l")))
    write_manifest(folder, {"val": {"val-000000.tar": 5}, "train": {"val-000000.tar": 5}})
    for method in ("extract", "extractall", "makefile", "makelink"):
        monkeypatch.setattr(tarfile.TarFile, method, lambda *a, **k: pytest.fail("extracted"))
    monkeypatch.chdir(work)
    export_dir = Path(make_export(tmp_path / "g"))
    before = set(tmp_path.rglob("*"))
    loader = data.make_train_loader(config(folder, batch_size=1), rank=0, world_size=1, seed=0,
                                    in_channels=3, out_channels=3)
    assert keys_of(epoch_batches(loader)) == ["ok"]
    assert first_epoch_skips(loader) == {"unsafe_name": 3, "missing_input": 1}
    evaluated = data.make_eval_loader(config(folder), rank=0, world_size=1, in_channels=3,
                                      out_channels=3)
    assert keys_of(evaluated) == ["ok"]
    out = tmp_path / "out"
    assert translate.main(["--checkpoint", str(export_dir), str(folder), "--out", str(out),
                           "--quiet"]) == 2  # something skipped
    assert set(tmp_path.rglob("*")) - before == {out, out / "ok.png"}
    assert not os.path.exists("/abs")


def test_pairs_of_different_sizes_are_resized_alike(tmp_path):
    """A target stored at half the input's size is kept and resized with it: the pair
    stays aligned (target = 255 - input survives, up to resampling)."""
    write_tar(tmp_path / "train-0.tar", pair_members("half", SIZE // 2) + pair_members("same"))
    write_manifest(tmp_path, {"train": {"train-0.tar": 2}})
    for augment_on in ("worker", "device"):
        cfg = config(tmp_path, augment_on=augment_on)
        batch = next_batch(data.make_train_loader(cfg, rank=0, world_size=1, seed=0, in_channels=3,
                                                  out_channels=3))
        x, y = data.to_device(batch, "cpu", cfg=cfg, channels_last=False)
        assert x.shape == y.shape == (2, 3, 16, 16) and sorted(batch["key"]) == ["half", "same"]
        assert (x + y).abs().max() < 0.08  # misaligned halves would differ by up to ~0.5


def test_gray_and_rgb_mix_into_the_configured_channels(tmp_path):
    gray = sample_pixels("gray")[..., 0]
    rgb = sample_pixels("rgb")
    write_tar(tmp_path / "train-0.tar", [
        ("gray.input.png", image_bytes(gray)), ("gray.target.png", gray16(255 - gray)),
        ("rgb.input.png", image_bytes(rgb)), ("rgb.target.png", image_bytes(255 - rgb[..., 0]))])
    write_manifest(tmp_path, {"train": {"train-0.tar": 2}})
    for in_channels in (3, 1):
        loader = data.make_train_loader(config(tmp_path, flip=False), rank=0, world_size=1,
                                        seed=0, in_channels=in_channels, out_channels=3)
        batch = next_batch(loader)
        x, y = batch["input"], batch["target"]
        assert x.shape[1] == in_channels and y.shape[1] == 3 and loader.skipped == {}
        assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])  # gray -> RGB
        g = batch["key"].index("gray")
        assert (x[g] + y[g]).abs().max() <= 2.01 / 127.5  # 16-bit scaled, not clipped


@pytest.mark.parametrize("name", ["pipe:cat /etc/passwd", "../other/train.tar",
                                  "/abs/train.tar", "s3://elsewhere/train.tar"])
def test_manifest_names_outside_the_folder_are_refused(tmp_path, capsys, name):
    write_dataset(tmp_path, [2])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["name"] = name
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="refusing") as error:
        data.list_shards(str(tmp_path), "train")
    assert "\n" not in str(error.value) and repr(name) in str(error.value)
    capsys.readouterr()
    assert inspect_shards.main([str(tmp_path)]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("inspect_shards.py: error: refusing")


# ------------------------------------------------------------------------ the data tools

def test_shard_py_gray_rgb_bomb_and_corrupt_inputs(tmp_path):
    """Folder layout: gray A with RGB B packed untouched; a 16-bit A re-encoded (its B
    has another size) scaled to 8 bits, not clipped white; a header bomb rejected; a
    corrupt image rejected with --verify, else packed and skipped by the reader."""
    src = tmp_path / "src"
    gray = sample_pixels("gray")[..., 0]
    files = {"A/gray.png": image_bytes(gray), "B/gray.png": image_bytes(sample_pixels("b")),
             "A/deep.png": gray16(gray), "B/deep.png": image_bytes(sample_pixels("d", 8)),
             "A/bomb.png": bomb_png(), "B/bomb.png": image_bytes(sample_pixels("b")),
             "A/cut.png": image_bytes(sample_pixels("c"))[:120],
             "B/cut.png": image_bytes(sample_pixels("c"))}
    for rel, payload in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(payload)
    options = ["--on-size-mismatch", "resize", "--workers", "1", "--quiet"]
    assert shard.main([str(src), str(tmp_path / "verified"), "--verify", *options]) == 0
    assert json.loads((tmp_path / "verified" / "manifest.json").read_text())["rejected"] == \
        {"decode_error": 1, "too_large": 1}
    assert shard.main([str(src), str(tmp_path / "out"), *options]) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["rejected"] == \
        {"too_large": 1}
    members = {}
    for tar_path in sorted((tmp_path / "out").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar})
    assert members["gray.input.png"] == files["A/gray.png"]  # bytes untouched
    deep = np.asarray(Image.open(io.BytesIO(members["deep.input.png"])))
    assert np.array_equal(deep, np.repeat(gray[..., None], 3, axis=2))
    loader = data.make_train_loader(config(tmp_path / "out", batch_size=1), rank=0,
                                    world_size=1, seed=0, in_channels=3, out_channels=3)
    assert sorted(keys_of(epoch_batches(loader))) == ["deep", "gray"]
    assert first_epoch_skips(loader) == {"corrupt_image": 1}


def test_inspect_shards_reports_a_manifest_that_disagrees(tmp_path, capsys):
    write_dataset(tmp_path, [3, 3])
    assert inspect_shards.main([str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["samples"] = 5
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    write_tar(tmp_path / "train-000009.tar", pair_members("stray"))
    capsys.readouterr()
    assert inspect_shards.main([str(tmp_path)]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert any("train-000000.tar: 3 samples" in e and "manifest says 5" in e for e in errors)
    assert any("split train says 6 samples, its shards' entries add up to 8" in e for e in errors)
    assert any("train-000009.tar: a shard that manifest.json does not list" in e for e in errors)
    assert all(e.startswith("inspect_shards.py: problem: ") for e in errors[:-1])
    assert errors[-1] == f"inspect_shards.py: error: 3 problems in {tmp_path} (listed above)"


# ---------------------------------------------------------------------------- weights

def test_export_names_the_tensor_that_does_not_fit(tmp_path, capsys):
    folder = Path(make_export(tmp_path / "g"))
    meta = json.loads((folder / "generator.json").read_text())
    meta["model"]["g_filters"] = 16  # the weights are g_filters=8's
    (folder / "generator.json").write_text(json.dumps(meta))
    assert export.main(["--checkpoint", str(folder), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "does not fit this model" in error
    assert "tensors of another shape (first: model.model.0.weight is [8, 3, 4, 4] in the " \
           "file, [16, 3, 4, 4] here)" in error
