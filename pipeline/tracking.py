"""Experiment trackers (`log.tracker`): only what accelerate's trackers lack.

accelerate's trackers do the logging: `Accelerator(log_with=...)`, `init_trackers`, and
`accelerator.log` send every scalar (train losses, val metrics) to the chosen one. This
module adds what they leave out, so that a run behaves the same whichever is chosen:

- a tracker whose package is missing stops the run at start-up in one line (accelerate
  drops it with a debug message, a UserWarning when nothing is left, and trains on with
  no tracker at all);
- every file a tracker writes lands in the run folder (wandb and mlflow would write into
  the current directory: `./wandb/`, and mlflow 3's `./mlflow.db` or `./mlruns/`);
- sample grids reach every tracker (accelerate has no image call for mlflow, and the
  trainer used to write them to TensorBoard only).

wandb and mlflow are imported by accelerate, only when chosen, never here.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
from typing import TYPE_CHECKING, Any, NamedTuple

from pipeline import run_layout
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    from accelerate import Accelerator

log = logging.getLogger(__name__)

# project (wandb) / experiment (mlflow) name when the environment names none
PROJECT = "pix2pix-at-scale"


class Package(NamedTuple):
    module: str  # what `import` needs
    distributions: tuple[str, ...]  # any of these installed (accelerate checks the same)
    install: str  # the fix, as the error message prints it


PACKAGES = {
    "tensorboard": Package("tensorboard", ("tensorboard",), "pip install -e ."),
    "wandb": Package("wandb", ("wandb",), "pip install -e '.[tracking]'"),
    "mlflow": Package("mlflow", ("mlflow", "mlflow-skinny"), "pip install -e '.[tracking]'"),
}


def installed(module: str, distributions: tuple[str, ...]) -> bool:
    """Whether `module` imports from an installed distribution.

    find_spec alone also finds a plain folder of that name on sys.path (a stray `wandb/`
    run folder in the current directory is a namespace package): accelerate then finds
    no metadata and drops the tracker, so both are checked, as accelerate does.
    """
    try:
        if importlib.util.find_spec(module) is None:
            return False
    except (ImportError, ValueError):  # a broken or blocked module
        return False
    for name in distributions:
        try:
            importlib.metadata.distribution(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            continue
    return False


def require_installed(tracker: str) -> None:
    """Raise ConfigError, naming the key and the fix, if `tracker`'s package is missing.

    Called before the Accelerator is built: accelerate would silently train untracked.
    """
    package = PACKAGES.get(tracker)
    if package is not None and not installed(package.module, package.distributions):
        others = "/".join(t for t in ("tensorboard", "none") if t != tracker)
        raise ConfigError(f"log.tracker: {tracker} is not installed; {package.install} "
                          f"(or choose {others})")


def log_with(tracker: str) -> str | None:
    """The Accelerator's `log_with` for this config (None: no tracker)."""
    return None if tracker == "none" else tracker


def start(accelerator: Accelerator, tracker: str, run_dir: str, config: dict[str, Any]) -> None:
    """Start the chosen tracker, writing under the run folder; `config` is its hparams.

    TensorBoard writes RUN/logs/ (accelerate joins project_dir and the name "logs");
    wandb RUN/wandb/ (its `dir`) unless WANDB_DIR is set; mlflow RUN/mlruns/ unless
    MLFLOW_TRACKING_URI is set. wandb's project and mlflow's experiment are PROJECT
    (WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME override it), the run is named after RUN.
    accelerate starts trackers on the main process only.
    """
    run_dir = os.path.abspath(run_dir)
    name = os.path.basename(run_dir.rstrip(os.sep))
    if tracker == "tensorboard":
        # no hparams through accelerate: SummaryWriter.add_hparams writes them into a new
        # timestamped sub-folder, an extra (empty) run in TensorBoard at every launch
        accelerator.init_trackers(run_layout.LOGS)
        if accelerator.is_main_process:
            table = "\n".join(f"    {key}: {value}" for key, value in config.items())
            accelerator.get_tracker("tensorboard", unwrap=True).add_text("config", table)
    elif tracker == "wandb":  # explicit arguments would override WANDB_PROJECT / WANDB_DIR
        where = {"dir": os.environ.get("WANDB_DIR") or run_dir, "name": name}
        accelerator.init_trackers(os.environ.get("WANDB_PROJECT") or PROJECT, config=config,
                                  init_kwargs={"wandb": where})
    elif tracker == "mlflow":  # MLFLOW_EXPERIMENT_NAME, if set, overrides PROJECT
        mlflow_store(run_dir)
        accelerator.init_trackers(PROJECT, config=config,
                                  init_kwargs={"mlflow": {"run_name": name}})


def end_failed(accelerator: Accelerator) -> None:
    """End the trackers' runs of a run that failed (mlflow's marked FAILED), without
    accelerator.end_training(), which would also tear down a process group a dead peer
    may hang. A tracker that cannot finish is said in a line, never hiding the failure."""
    for tracker in accelerator.trackers:
        try:
            if tracker.name == "mlflow":
                import mlflow
                mlflow.end_run(status="FAILED")
            else:
                tracker.finish()
        except Exception as err:  # noqa: BLE001 - the run's own error is the one to report
            log.warning(f"{tracker.name}: could not end the run ({err})")


def mlflow_store(run_dir: str) -> None:
    """Point mlflow at RUN/mlruns when the user has not chosen a tracking URI.

    mlflow 3's default is sqlite:///mlflow.db in the current directory (which
    mlflow-skinny cannot even open: no SQLAlchemy), artifacts in ./mlruns. Its file
    store needs no extra package but mlflow >= 3.13 refuses it unless
    MLFLOW_ALLOW_FILE_STORE=true (it is "in maintenance mode"), so that is set too.
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return
    os.environ["MLFLOW_TRACKING_URI"] = "file:" + os.path.join(run_dir, "mlruns")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def log_image(accelerator: Accelerator, name: str, grid: np.ndarray, step: int,
              png_path: str) -> None:
    """Send a sample grid (HxWx3 uint8, already saved as `png_path`) to the tracker.

    TensorBoard and wandb get the image at `step`; mlflow, whose accelerate tracker has
    no image call, gets the PNG as an artifact under samples/ (its name holds the step).
    Main process only, as the trackers are.
    """
    if not accelerator.is_main_process or name == "none":
        return
    tracker = accelerator.get_tracker(name)
    if name == "tensorboard":
        tracker.tracker.add_image("samples", grid, step, dataformats="HWC")
    elif name == "wandb":
        tracker.log_images({"samples": [grid]}, step=step)
    elif name == "mlflow":
        tracker.log_artifact(png_path, artifact_path="samples")
