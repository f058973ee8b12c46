"""The real trainer with each experiment tracker: scalars, val metrics and sample grids
reach it, its files land in the run folder and none in the current directory, and a
tracker whose package is missing stops the run at start-up. Offline, no network."""
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.tracking import installed
from tests.conftest import require_component
from tests.helpers.trainer_runs import ROOT, TRAIN, cpu_env, explain, single, train_args

# 4 steps: train scalars at 1..4, val metrics at 0, 2, 4, sample grids at 2 and 4
SHORT = ["--train.max_steps=4", "--log.every=1", "--log.sample_every=2", "--train.eval_every=2"]
NO_TELEMETRY = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}


def run_in(cwd: Path, command: list[str], env: dict, timeout: int = 180) -> subprocess.CompletedProcess:
    """Like trainer_runs.run, but in `cwd` (an empty folder: trackers default to writing
    there). PYTHONPATH: the script's own folder, not the cwd, is on sys.path."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = dict(env, PYTHONPATH=str(ROOT))
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def require(tracker: str, module: str, *distributions: str) -> None:
    require_component(installed(module, distributions),
                      f"{tracker} (pip install -e '.[tracking]')")


# --------------------------------------------------------------------------- wandb

def wandb_records(path: Path):
    """The protobuf records of an offline run's transaction log (run-ID.wandb), which
    is what `wandb sync` uploads: wandb-core writes no wandb-summary.json offline.
    Format: a 7-byte header, then LevelDB-log blocks of 32 KiB whose chunks (7-byte
    header: crc, length, type FULL/FIRST/MIDDLE/LAST) join into records."""
    from wandb.proto import wandb_internal_pb2
    data, block = path.read_bytes(), 32 * 1024
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a W&B transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding to the end of the block
            pos += block - pos % block
            continue
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(path: Path) -> dict[str, dict[int, object]]:
    """key -> {step: value} from the history records of an offline run (a logged image
    is a nested key: samples/_type, samples/filenames, ...)."""
    history: dict[str, dict[int, object]] = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}
            for key, value in items.items():
                history.setdefault(key, {})[items["_step"]] = value
    return history


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_wandb_offline_run_records_losses_val_metrics_and_samples_under_the_run_folder(
        demo_shards, tmp_path):
    require("wandb", "wandb", "wandb")
    run_dir, cwd, home = tmp_path / "run", tmp_path / "cwd", tmp_path / "wandb-home"
    env = cpu_env(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DISABLE_GIT="true",
                  WANDB_DISABLE_CODE="true", WANDB_API_KEY="", WANDB_CONFIG_DIR=str(home / "config"),
                  WANDB_CACHE_DIR=str(home / "cache"), WANDB_DATA_DIR=str(home / "data"))
    env.pop("WANDB_DIR", None)
    env.pop("WANDB_PROJECT", None)
    result = run_in(cwd, single(train_args(run_dir, demo_shards, *SHORT, "--log.tracker=wandb")), env)
    assert result.returncode == 0, explain(result)
    assert list(cwd.iterdir()) == [], "wandb wrote into the current directory"
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run_dir / "wandb").iterdir())
    history = wandb_history(next(offline[0].glob("run-*.wandb")))
    assert sorted(history["train/loss_G"]) == [1, 2, 3, 4]
    assert sorted(history["val/l1"]) == [0, 2, 4]
    assert history["samples/_type"] == {2: "images/separated", 4: "images/separated"}
    images = sorted((offline[0] / "files" / "media" / "images").glob("samples_*.png"))
    assert [p.name.split("_")[1] for p in images] == ["2", "4"]
    # outside the run folder wandb leaves only its own debug logs, in its cache folder
    outside = sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())
    assert all(p.startswith("cache/wandb/logs/") and p.endswith(".log") for p in outside), outside


# --------------------------------------------------------------------------- mlflow

def mlflow_metric(run: Path, key: str) -> dict[int, float]:
    """step -> value from the file store: metrics/<key> ('train/loss_G' is a folder and a
    file), one 'timestamp value step' line per logged step."""
    lines = (run / "metrics" / key).read_text().split("\n")
    return {int(step): float(value) for _ts, value, step in (ln.split() for ln in lines if ln)}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_mlflow_file_store_under_the_run_folder_holds_metrics_and_sample_artifacts(
        demo_shards, tmp_path):
    require("mlflow", "mlflow", "mlflow", "mlflow-skinny")
    run_dir, cwd = tmp_path / "run", tmp_path / "cwd"
    env = cpu_env(**NO_TELEMETRY)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_ALLOW_FILE_STORE"):
        env.pop(key, None)
    result = run_in(cwd, single(train_args(run_dir, demo_shards, *SHORT, "--log.tracker=mlflow")), env)
    assert result.returncode == 0, explain(result)
    assert list(cwd.iterdir()) == [], "mlflow wrote into the current directory (mlruns/, mlflow.db)"
    runs = [p.parent for p in (run_dir / "mlruns").glob("*/*/meta.yaml")]
    assert len(runs) == 1, runs
    run = runs[0]
    assert sorted(mlflow_metric(run, "train/loss_G")) == [1, 2, 3, 4]
    assert sorted(mlflow_metric(run, "val/l1")) == [0, 2, 4]
    assert (run / "params" / "model.generator").read_text() == "unet_128"
    assert sorted(p.name for p in (run / "artifacts" / "samples").iterdir()) == [
        "step_00000002.png", "step_00000004.png"]
    meta = (run / "meta.yaml").read_text()
    assert "run_name: run\n" in meta and "status: 3\n" in meta  # FINISHED


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_run_that_fails_ends_its_mlflow_run_as_failed(demo_shards, tmp_path):
    require("mlflow", "mlflow", "mlflow", "mlflow-skinny")
    run_dir = tmp_path / "run"
    env = cpu_env(**NO_TELEMETRY, P2P_FAULT="train.nonfinite_batch:2")
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_ALLOW_FILE_STORE"):
        env.pop(key, None)
    result = run_in(tmp_path, single(train_args(run_dir, demo_shards, *SHORT, "--log.tracker=mlflow")), env)
    assert result.returncode == 1 and "non-finite" in result.stderr, explain(result)
    (run,) = [p.parent for p in (run_dir / "mlruns").glob("*/*/meta.yaml")]
    assert "status: 4\n" in (run / "meta.yaml").read_text()  # FAILED, not left RUNNING


# --------------------------------------------------------------------------- tensorboard

@pytest.mark.slow
@pytest.mark.timeout(240)
def test_tensorboard_still_gets_scalars_and_sample_images(demo_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir = tmp_path / "run"
    result = run_in(tmp_path / "cwd", single(train_args(run_dir, demo_shards, *SHORT)), cpu_env())
    assert result.returncode == 0, explain(result)
    assert list((tmp_path / "cwd").iterdir()) == []
    events = EventAccumulator(str(run_dir / "logs"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Scalars("train/loss_G")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("val/l1")] == [0, 2, 4]
    assert [e.step for e in events.Images("samples")] == [2, 4]


# --------------------------------------------------------------------------- missing package

# sys.modules[name] = None is how Python marks a module as unimportable: `import` raises
# ModuleNotFoundError and importlib.util.find_spec returns None, for accelerate's check
# (which then drops the tracker silently) and the trainer's alike. Set before anything
# is imported, in a fresh interpreter, it makes the real trainer see an environment
# without the package; nothing of the trainer or of accelerate is replaced.
HIDE_AND_TRAIN = """import sys, runpy
sys.modules[sys.argv.pop(1)] = None
sys.argv[0] = {train!r}
runpy.run_path({train!r}, run_name="__main__")
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_that_is_not_installed_stops_the_run_in_one_line(demo_shards, tmp_path, tracker):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-c", HIDE_AND_TRAIN.format(train=TRAIN), tracker,
               *train_args(run_dir, demo_shards, "--train.max_steps=1", f"--log.tracker={tracker}")]
    result = run_in(tmp_path / "cwd", command, cpu_env(**NO_TELEMETRY), timeout=100)
    assert result.returncode == 2, explain(result)
    assert result.stderr.splitlines() == [
        f"train.py: error: log.tracker: {tracker} is not installed; "
        "pip install -e '.[tracking]' (or choose tensorboard/none)"], explain(result)
    assert not run_dir.exists()
    assert list((tmp_path / "cwd").iterdir()) == []


# --------------------------------------------------------------------------- imports

def test_importing_tracking_imports_no_tracker_and_no_torch():
    code = ("import sys, pipeline.tracking; "
            "print(sorted(m for m in ('wandb', 'mlflow', 'torch', 'accelerate') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
