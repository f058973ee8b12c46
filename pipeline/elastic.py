"""Resuming on another number of processes: the global batch, and a record of the data order.

The data stream itself continues mid-epoch on any world size (pipeline/data/stream/);
what the trainer must add is the global batch (per-process batch x train.grad_accum x
processes): a resume keeps it, as the lr and the schedule were set for it, by changing
train.grad_accum (or else data.batch_size) when only the world size changed, and refuses
any other change unless train.allow_batch_change says so. `KeyRecord` writes the keys of
every step's samples (data.record_keys) so that a run can be checked against another:
plain JSON lines, one file per rank, cut back to the resumed step on a resume.
"""
from __future__ import annotations

import logging
import os

from pipeline import checkpoint, jsonl
from pipeline.config import BatchLayout, Config, ConfigError

log = logging.getLogger(__name__)


def keep_global_batch(cfg: Config, world_size: int, path: str | None, deepspeed: bool = False,
                      trainer: checkpoint.TrainerInfo | None = None) -> BatchLayout:
    """The batch layout of this run: cfg's, or, on a resume from checkpoint `path` on
    another world size, one that keeps the saved global batch (cfg's batch_size and
    grad_accum are set to it). ConfigError when it cannot and train.allow_batch_change is
    off, and for a DeepSpeed checkpoint on another world size (ZeRO saves its optimiser
    state partitioned by rank). `trainer`: path's trainer.json where the caller read it."""
    layout = BatchLayout.of(cfg, world_size)
    if path is None:
        return layout
    saved = (trainer or checkpoint.read_trainer(path)).layout
    if deepspeed and saved.world_size != world_size:
        raise ConfigError(f"train.resume: {path} is a DeepSpeed checkpoint of {saved.world_size} "
                          f"processes; ZeRO's optimiser partitions resume only on as many (this "
                          f"launch has {world_size})")
    if layout.global_batch == saved.global_batch:
        return layout
    if (layout.batch_size, layout.grad_accum) == (saved.batch_size, saved.grad_accum):
        kept = _same_global_batch(layout, saved.global_batch)
        if kept is not None:  # only the world size changed: made up here
            cfg.data.batch_size, cfg.train.grad_accum = kept.batch_size, kept.grad_accum
            log.info(f"resume on {world_size} processes (saved on {saved.world_size}): global batch "
                     f"{saved.global_batch} kept as data.batch_size={kept.batch_size} x "
                     f"train.grad_accum={kept.grad_accum} x {world_size}")
            return kept
    change = (f"the global batch would change from {saved} to {layout} with optim.lr staying "
              f"{cfg.optim.lr:g} (not scaled: each update averages {layout.global_batch} samples "
              f"instead of {saved.global_batch})")
    if not cfg.train.allow_batch_change:
        raise ConfigError(f"train.allow_batch_change: resuming {path}, {change}; pass "
                          "--train.grad_accum or --data.batch_size to keep it, or "
                          "--train.allow_batch_change=true to go on")
    log.warning(f"train.allow_batch_change: {change}")
    return layout


def _same_global_batch(layout: BatchLayout, saved: int) -> BatchLayout | None:
    """`layout` on its world size with grad_accum (else batch_size) changed to make up
    `saved` samples per update; None when neither divides."""
    b, k, world = layout.batch_size, layout.grad_accum, layout.world_size
    if saved % (b * world) == 0:
        return BatchLayout(b, saved // (b * world), world)
    if saved % (k * world) == 0:
        return BatchLayout(saved // (k * world), k, world)
    return None


class KeyRecord:
    """RUN/keys/rank{R}.jsonl: {"step", "epoch", "keys"} per step and epoch (a step whose
    micro-batches cross an epoch's end has a line for each)."""

    def __init__(self, path: str):
        self.path = path  # run_layout.keys(run_dir, rank): the run plan's paths.keys
        os.makedirs(os.path.dirname(self.path), exist_ok=True)

    def cut(self, step: int) -> None:
        """Drop the records past `step` (a resume from it), atomically."""
        if not os.path.exists(self.path):
            return
        kept = [record for record in jsonl.read(self.path) if record.get("step", step + 1) <= step]
        aside = self.path + ".tmp"
        if os.path.exists(aside):
            os.remove(aside)
        jsonl.append(aside, kept)
        os.replace(aside, self.path)

    def write(self, step: int, batches: list[tuple[int, list[str]]]) -> None:
        """This rank's (epoch, keys) of each micro-batch of `step`, in order."""
        by_epoch = {}
        for epoch, keys in batches:
            by_epoch.setdefault(epoch, []).extend(keys)
        jsonl.append(self.path, [{"step": step, "epoch": epoch, "keys": keys}
                                 for epoch, keys in by_epoch.items()])
