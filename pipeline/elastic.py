"""Resuming on another number of processes: the global batch, and a record of the data order.

The data stream itself continues mid-epoch on any world size (pipeline/data/train_stream.py);
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

from pipeline import checkpoint, jsonl, run_layout
from pipeline.config import Config, ConfigError

log = logging.getLogger(__name__)


def keep_global_batch(cfg: Config, world_size: int, path: str | None, deepspeed: bool = False) -> None:
    """Set cfg's batch so that a resume from checkpoint `path` (None: a fresh run) keeps
    its global batch; ConfigError when it cannot and train.allow_batch_change is off, and
    for a DeepSpeed checkpoint on another world size (ZeRO saves its optimiser state
    partitioned by rank)."""
    if path is None:
        return
    trainer = checkpoint.read_trainer(path)
    if deepspeed and trainer["world_size"] != world_size:
        raise ConfigError(f"train.resume: {path} is a DeepSpeed checkpoint of {trainer['world_size']} "
                          f"processes; ZeRO's optimiser partitions resume only on as many (this "
                          f"launch has {world_size})")
    saved_b, saved_k = trainer["config"]["data"]["batch_size"], trainer["config"]["train"]["grad_accum"]
    saved = saved_b * saved_k * trainer["world_size"]
    b, k = cfg.data.batch_size, cfg.train.grad_accum
    if b * k * world_size == saved:
        return
    if (b, k) == (saved_b, saved_k):  # only the world size changed: make it up here
        if saved % (b * world_size) == 0:
            cfg.train.grad_accum = saved // (b * world_size)
        elif saved % (k * world_size) == 0:
            cfg.data.batch_size = saved // (k * world_size)
        if cfg.data.batch_size * cfg.train.grad_accum * world_size == saved:
            log.info(f"resume on {world_size} processes (saved on {trainer['world_size']}): global batch "
                     f"{saved} kept as data.batch_size={cfg.data.batch_size} x "
                     f"train.grad_accum={cfg.train.grad_accum} x {world_size}")
            return
    now = cfg.data.batch_size * cfg.train.grad_accum * world_size
    change = (f"the global batch would change from {saved} ({saved_b} x {saved_k} x "
              f"{trainer['world_size']} processes) to {now} ({cfg.data.batch_size} x "
              f"{cfg.train.grad_accum} x {world_size}) with optim.lr staying {cfg.optim.lr:g} "
              f"(not scaled: each update averages {now} samples instead of {saved})")
    if not cfg.train.allow_batch_change:
        raise ConfigError(f"train.allow_batch_change: resuming {path}, {change}; pass "
                          "--train.grad_accum or --data.batch_size to keep it, or "
                          "--train.allow_batch_change=true to go on")
    log.warning(f"train.allow_batch_change: {change}")


class KeyRecord:
    """RUN/keys/rank{R}.jsonl: {"step", "epoch", "keys"} per step and epoch (a step whose
    micro-batches cross an epoch's end has a line for each)."""

    def __init__(self, run_dir: str, rank: int):
        self.path = run_layout.keys(run_dir, rank)
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
