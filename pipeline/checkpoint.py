"""Save and resume a whole training run, atomically, with rotation.

A checkpoint is one folder `RUN/checkpoints/step_00001000/` holding:
    generator.safetensors, generator.json   the generator export: fp32 weights (gathered
                                            across ranks under ZeRO) + what it needs to be
                                            rebuilt without the trainer
    trainer.json                            step, world size, config
    digests.json                            every file's size and SHA-256 (pipeline/digests.py)
    rank_00000.json ...                     per rank: data-stream position, Python and
    rank_00000_rng.pt ...                   NumPy RNG states; torch RNG states
and the models' training state, written by the engines (pipeline/engines.py):
    DDP:       discriminator.safetensors, optimizers.pt (both optimisers and lr schedulers:
               tensors and numbers only, loaded with weights_only=True); G is the export,
               except under train.ema_decay: the export is then the EMA and the raw G
               that training continues is generator_raw.safetensors
    DeepSpeed: G/ and D/, each engine's own checkpoint (every rank writes its optimiser
               partition). DeepSpeed checkpoints are pickles: resume only from trusted ones.
Every rank writes its own files into `step_N.tmp/`; once all have, rank 0 renames the
folder to `step_N/`, then rewrites the `latest` marker (and `best`, when train.best_metric
improved at this step; the checkpoint it names is never rotated away), then removes the oldest
checkpoints beyond keep_last (each renamed to `.tmp` first, then deleted). A crash at any
moment leaves the previous checkpoint and marker intact and every `step_N/` complete; a
`.tmp` folder is never loaded and is cleared by the next save. A failed write (a full
disk) removes its `.tmp` folder and raises CheckpointError naming the intact checkpoint;
weights with a NaN or inf are refused before anything is written.
A DDP resume needs no pickle: everything is safetensors, JSON or weights_only tensors.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from pipeline import digests, faults, run_layout, storage, weights
from pipeline.config import BatchLayout
from pipeline.errors import CheckpointMismatch, RunError

LATEST = "latest"
TRAINER = run_layout.TRAINER
BEST = "best"  # the checkpoint with the best train.best_metric so far (written like LATEST)
TMP, OLD = ".tmp", ".old"  # suffixes of folders that are not (or no longer) checkpoints


def checkpoints_dir(run_dir: str) -> str:
    return run_layout.checkpoints(run_dir)


step_name = run_layout.step_name


class CheckpointError(RunError):
    """A checkpoint was not written; the message names the newest one that is intact."""


@dataclass
class Snapshot:
    """What one rank contributes to a checkpoint."""
    save_models: Callable[[str, int], None]  # engines.save(staging, rank): training state
    generator_state: dict[str, torch.Tensor]  # the fp32 export (whole on every rank)
    discriminator_state: dict[str, torch.Tensor]  # checked for NaN/inf before writing
    data_state: dict  # this rank's stream position
    config: dict  # the run's resolved config
    precision: str = "no"  # the run's mixed precision: "no" (fp32) or "bf16"
    data_layout: str | None = None  # the training pairs' source layout (weights.TrainedOn)
    data_size: str | None = None  # their most common stored half size, "WxH" (weights.TrainedOn)


@dataclass
class Ranks:
    """Who this rank is and how it agrees with the others (distributed.barrier/any_rank)."""
    rank: int
    world_size: int
    barrier: Callable[[], None]
    any_rank: Callable[[bool], bool]


@dataclass
class TrainingState:
    """What a resume restores besides the modules' and optimisers' own state."""
    step: int
    data_states: list[dict]  # every saved rank's stream position, in rank order
    world_size: int
    precision: str | None = None  # the saved run's mixed precision (None: not recorded)
    config: dict | None = None  # the saved run's config


# --------------------------------------------------------------------------- RNG

def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able Python and NumPy states, torch generator states as tensors)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    as_json = {"python": [py_version, list(py_state), py_gauss],
               "numpy": [kind, keys.tolist(), pos, has_gauss, gauss]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    return as_json, tensors


def set_rng_state(as_json: dict, tensors: dict[str, torch.Tensor]) -> None:
    py_version, py_state, py_gauss = as_json["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    kind, keys, pos, has_gauss, gauss = as_json["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])


# --------------------------------------------------------------------------- save

def _write_json(path: str, value: dict) -> None:
    storage.write_bytes(path, json.dumps(value, indent=1, sort_keys=True).encode())


def _write_torch(path: str, value) -> None:
    with storage.atomic_write(path) as f:
        torch.save(value, f)


def save(run_dir: str, step: int, snapshot: Snapshot, ranks: Ranks, keep_last: int,
         best: bool = False) -> str:
    """Write a checkpoint from every rank and commit it; returns its final folder.

    All ranks must call this at the same step: `snapshot.save_models(staging, rank)`
    writes the models' training state (engines.save), rank 0 the generator export and
    trainer.json, every rank its own position and RNG. `ranks.any_rank(flag)` makes every
    rank refuse or fail together, never leaving a peer waiting at a barrier. `best` also
    points the `best` marker at it; rotation never removes the checkpoint that marker names.
    """
    rank, barrier, any_rank = ranks.rank, ranks.barrier, ranks.any_rank
    root = checkpoints_dir(run_dir)
    final = os.path.join(root, step_name(step))
    staging = final + TMP
    bad = nonfinite({**_prefixed("generator", snapshot.generator_state),
                     **_prefixed("discriminator", snapshot.discriminator_state)})
    if any_rank(bool(bad)):
        raise CheckpointError(f"checkpoint at step {step} refused: non-finite weights "
                              f"({', '.join(bad[:3]) or 'on another rank'}); {_intact(root)}")
    if rank == 0:
        clear_uncommitted(root)
        os.makedirs(staging)
    barrier()
    try:
        _write_staging(staging, step, ranks, snapshot)
        error = None
    except Exception as err:  # noqa: BLE001 - a full disk, a quota, a dead mount: all ranks must agree
        error = err
    if any_rank(error is not None):  # also the barrier before the commit
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"checkpoint at step {step} failed "
                              f"({error or 'on another rank'}); {_intact(root)}") from error
    if rank == 0:
        digests.write_index(staging)
        faults.kill_point("checkpoint.staged")
        _commit(staging, final)
        faults.kill_point("checkpoint.renamed")
        storage.write_bytes(os.path.join(root, LATEST), step_name(step).encode())
        if best:
            storage.write_bytes(os.path.join(root, BEST), step_name(step).encode())
        rotate(root, keep_last, keep={step_name(step), marked(root, BEST)})
    barrier()
    return final


def _write_staging(staging: str, step: int, ranks: Ranks, snapshot: Snapshot) -> None:
    rank = ranks.rank
    snapshot.save_models(staging, rank)
    faults.kill_point("checkpoint.after_models")
    if rank == 0:
        weights.write_generator(staging, snapshot.generator_state,
                                weights.GeneratorInfo.of_run(snapshot.config, step, snapshot.data_layout,
                                                             snapshot.data_size))
        _write_json(os.path.join(staging, TRAINER),
                    TrainerInfo(step, ranks.world_size, snapshot.config, snapshot.precision).to_json())
    as_json, tensors = rng_state()
    _write_json(os.path.join(staging, f"rank_{rank:05d}.json"),
                {"data": snapshot.data_state, "rng": as_json})
    _write_torch(os.path.join(staging, f"rank_{rank:05d}_rng.pt"), tensors)


def _commit(staging: str, final: str) -> None:
    """Rename the complete staging folder to its final name. A step committed before (an
    older checkpoint resumed explicitly, then trained past this step again) is set aside as
    `.old` first: a directory cannot be renamed over a non-empty one, and deleting it
    first would leave the marker naming nothing on a crash; resolve falls back to `.old`."""
    if os.path.exists(final):
        os.replace(final, final + OLD)
        os.replace(staging, final)
        shutil.rmtree(final + OLD)
    else:
        os.replace(staging, final)
    _fsync_dir(os.path.dirname(final))


def nonfinite(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an inf."""
    return [name for name, t in state.items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _prefixed(prefix: str, state: dict) -> dict:
    return {f"{prefix}.{name}": t for name, t in state.items()}


def _intact(root: str) -> str:
    """What a failed save leaves: the checkpoint the marker names, untouched."""
    name = marked(root, LATEST)
    if name is None:
        return "no earlier checkpoint exists in this run"
    return f"the previous one (step {int(name.removeprefix('step_'))}, {os.path.join(root, name)}) is intact"


RAW_GENERATOR = "generator_raw.safetensors"  # G itself, when the export is its EMA


def write_weights_and_optimizers(staging: str, discriminator: torch.nn.Module,
                                 optimizers: dict, schedulers: dict,
                                 raw_generator: torch.nn.Module | None = None) -> None:
    """The DDP training state besides the generator export (which doubles as G's weights
    unless the export is G's EMA: then `raw_generator` is written too)."""
    storage.write_bytes(os.path.join(staging, "discriminator.safetensors"),
                        save_safetensors(weights.contiguous(discriminator.state_dict())))
    if raw_generator is not None:
        storage.write_bytes(os.path.join(staging, RAW_GENERATOR),
                            save_safetensors(weights.contiguous(raw_generator.state_dict())))
    _write_torch(os.path.join(staging, "optimizers.pt"),
                 {"optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                  "schedulers": {k: s.state_dict() for k, s in schedulers.items()}})


def load_weights_and_optimizers(path: str, generator: torch.nn.Module, discriminator: torch.nn.Module,
                                optimizers: dict, schedulers: dict,
                                ema: torch.nn.Module | None = None) -> None:
    """What write_weights_and_optimizers and the export wrote, into the unwrapped modules:
    G from the raw file where there is one (else the export), `ema` from the export where
    it is one (else a copy of G: a run that turns the EMA on starts it there)."""
    raw = os.path.join(path, RAW_GENERATOR)
    has_raw = os.path.isfile(raw)
    weights.load_weights(generator, raw if has_raw else os.path.join(path, weights.WEIGHTS))
    if ema is not None:
        if has_raw:
            weights.load_weights(ema, os.path.join(path, weights.WEIGHTS))
        else:
            ema.load_state_dict(generator.state_dict())
    weights.load_weights(discriminator, os.path.join(path, "discriminator.safetensors"))
    states = load_tensors(os.path.join(path, "optimizers.pt"))
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(states["optimizers"][name])
    for name, scheduler in schedulers.items():
        scheduler.load_state_dict(states["schedulers"][name])


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def committed(root: str) -> list[str]:
    """Committed checkpoint folder names, oldest first."""
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if re.fullmatch(r"step_\d{8}", n))


def clear_uncommitted(root: str) -> None:
    """Remove what crashes leave: staging and rotation `.tmp` folders, and an `.old` copy
    whose step was committed again (else it is what resolve falls back to)."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        stale = name.endswith(TMP) or (name.endswith(OLD) and
                                       os.path.isdir(os.path.join(root, name.removesuffix(OLD))))
        if name.startswith("step_") and stale:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def marked(root: str, marker: str) -> str | None:
    """The checkpoint name a marker (LATEST, BEST) in `root` holds, if it exists."""
    path = os.path.join(root, marker)
    return storage.read_bytes(path).decode().strip() if os.path.isfile(path) else None


def rotate(root: str, keep_last: int, keep: set) -> None:
    """Remove the oldest committed checkpoints beyond keep_last (never those in `keep`), after
    the new one is committed: the opposite order would leave nothing on a crash. Each is
    renamed to `.tmp` first, so a crash mid-delete never leaves a half folder that looks
    committed."""
    for name in committed(root)[:-keep_last]:
        if name not in keep:
            trash = os.path.join(root, name + TMP)
            os.replace(os.path.join(root, name), trash)
            faults.kill_point("checkpoint.rotating")
            shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------- resume

def latest(run_dir: str) -> str | None:
    """The checkpoint folder the run's `latest` marker names (None before its first): the
    one place "the latest checkpoint" is found. resume.choose starts from it (and verifies),
    generator_folder, resolve and the trainer's messages take it as it is."""
    return _marked_folder(checkpoints_dir(run_dir), LATEST)


def _marked_folder(root: str, marker: str) -> str | None:
    name = marked(root, marker)
    return None if name is None else folder(root, name)


def folder(root: str, name: str) -> str:
    """Checkpoint `name` in `root`: its folder, or the `.old` copy a crash in _commit left."""
    path = os.path.join(root, name)
    if not os.path.isdir(path) and os.path.isdir(path + OLD):
        path += OLD
    return path


def resolve(run_dir: str, resume: str) -> str | None:
    """The checkpoint folder `resume` names: 'auto' = latest in run_dir (None if the run
    has none yet), else a path to a checkpoint folder."""
    path = latest(run_dir) if resume == "auto" else resume or None
    return None if path is None else _complete(path)


def _complete(path: str) -> str:
    if not os.path.isfile(os.path.join(path, TRAINER)):
        raise CheckpointMismatch(f"train.resume: {path} is not a complete checkpoint "
                                "(no trainer.json); give a step_N folder or 'auto'")
    return path


def load(path: str, *, rank: int, world_size: int, load_models: Callable[[str], None]) -> TrainingState:
    """Restore a checkpoint the start-up gate has checked (check_architecture; the engine
    kind): the models' training state through `load_models(path)` (engines.load), then this
    rank's RNG if the world size is the same; every rank's data position comes back (a
    resume on another world size merges them)."""
    trainer = read_trainer(path)
    load_models(path)
    rank_file = lambda r: os.path.join(path, f"rank_{r:05d}.json")
    per_rank = [json.loads(storage.read_bytes(rank_file(r))) for r in range(trainer.world_size)]
    if trainer.world_size == world_size:
        set_rng_state(per_rank[rank]["rng"], load_tensors(os.path.join(path, f"rank_{rank:05d}_rng.pt")))
    return TrainingState(step=trainer.step, data_states=[r["data"] for r in per_rank],
                         world_size=trainer.world_size, precision=trainer.precision,
                         config=trainer.config)


@dataclass(frozen=True)
class TrainerInfo:
    """A checkpoint's trainer.json, typed: the one reader of what a checkpoint says about
    the run that wrote it."""
    step: int
    world_size: int
    config: dict  # the run's resolved config (config.to_dict's form)
    precision: str | None  # "no" (fp32) or "bf16"; None: not recorded

    @property
    def layout(self) -> BatchLayout:
        return BatchLayout(self.config["data"]["batch_size"], self.config["train"]["grad_accum"],
                           self.world_size)

    def to_json(self) -> dict:
        return {"step": self.step, "world_size": self.world_size, "config": self.config,
                "mixed_precision": self.precision}


def read_trainer(path: str) -> TrainerInfo:
    """A checkpoint's trainer.json: step, world size, config, precision."""
    saved = json.loads(storage.read_bytes(os.path.join(path, TRAINER)))
    return TrainerInfo(saved["step"], saved["world_size"], saved["config"], saved.get("mixed_precision"))


# model keys that change the weights' names or shapes (norm: batch and syncbatch share them)
ARCHITECTURE = ("generator", "in_channels", "out_channels", "g_filters", "discriminator",
                "d_layers", "d_filters", "norm", "num_d")


def check_architecture(saved: dict, current: dict, path: str) -> None:
    """CheckpointMismatch naming every architecture key in which `saved` (a checkpoint's model
    config) differs from `current`; dropout, init or activation checkpointing may change."""
    def tensors_of(config: dict, key: str):
        if key == "num_d" and config.get("discriminator") != "multiscale":
            return None  # only a multiscale D has scales (older checkpoints record none)
        return "batch" if config.get(key) == "syncbatch" else config.get(key)
    changed = [f"model.{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in ARCHITECTURE
               if tensors_of(saved, k) != tensors_of(current, k)]
    if changed:
        raise CheckpointMismatch(f"{path} was trained with another architecture ({', '.join(changed)} "
                         "in this run): its weights cannot be loaded")


def load_tensors(path: str):
    """torch.load(weights_only=True): tensors and plain containers only. A file that is not
    (a pickle that would import and run code, or not a torch file at all) is refused in one
    line, and nothing in it runs; torch's own message is many lines and suggests
    weights_only=False."""
    with open(path, "rb") as f:
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, EOFError, KeyError, RuntimeError) as err:
            lines = [line for line in str(err).splitlines() if line.strip()]
            why = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else
                       type(err).__name__)
            raise CheckpointMismatch(f"{path} refused: not a weights-only torch file ({why.strip()}); "
                             "only this project's checkpoints can be resumed") from None


def generator_folder(path: str) -> str:
    """The folder holding the generator export that `path` names: a checkpoint step_N
    folder, a marker (RUN/checkpoints/latest or best), a run folder (its latest
    checkpoint) or an export folder."""
    name = os.path.basename(path.rstrip("/"))
    if name in (LATEST, BEST) and os.path.isfile(path):
        return _marked_folder(os.path.dirname(path), name)
    newest = latest(path)  # a run folder: its latest checkpoint
    return path if newest is None else _complete(newest)


def load_generator(path: str) -> tuple[torch.nn.Module, weights.GeneratorInfo]:
    """(generator in eval mode, its generator.json) from anything generator_folder takes,
    local or s3://; no trainer needed."""
    return weights.read_generator(generator_folder(path))


def mirror(checkpoint: str, prefix: str) -> None:
    """Copy a committed checkpoint to object storage (e.g. s3://bucket/run), then its
    `latest` marker, so the mirror too only ever points at complete checkpoints."""
    name = os.path.basename(checkpoint)
    for folder, _, files in sorted(os.walk(checkpoint)):  # DeepSpeed's G/ and D/ too
        for file in sorted(files):
            local = os.path.join(folder, file)
            storage.put(local, storage.join(prefix, name, os.path.relpath(local, checkpoint)))
    storage.write_bytes(storage.join(prefix, LATEST), name.encode())
