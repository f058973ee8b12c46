"""Validation during training: metrics over the val split (or eval.max_images of it),
logged and appended to RUN/metrics.jsonl, and sample grids, for the trainer to call at
its step boundaries. The measuring itself is pipeline/evaluate.py's, shared with
p2p-evaluate; this module adds what only a running trainer has: its ranks, its stop
request, its run folder, its progress display.
"""
from __future__ import annotations

import logging

from accelerate import Accelerator

from pipeline import data, distributed, evaluate, faults, jsonl, progress, realism, run_layout, tracking
from pipeline.config import Config, ConfigError
from pipeline.engines import Engines

log = logging.getLogger(__name__)


def log0(accelerator: Accelerator, message: str) -> None:
    """An INFO line from the main process only (the run's own narrative; train.py's too)."""
    if accelerator.is_main_process:
        log.info(message)


class Evaluator:
    """Val metrics across ranks, logged and appended to RUN/metrics.jsonl, and sample
    grids from a fixed val batch on the main process. Each evaluation measures
    eval.max_images of the split (a subset fixed by train.seed), shows its progress, and
    is abandoned on every rank when a stop is requested (`abandoned`). One loader serves
    every evaluation: off CPU its workers are forked once and wait between evaluations."""

    def __init__(self, cfg: Config, accelerator: Accelerator, engines: Engines,
                 stop: distributed.StopRequest, names: tuple[str, ...], metrics_path: str):
        """`names`, `metrics_path`: the run plan's (startup.py decided which metrics)."""
        self.cfg, self.accelerator, self.engines, self.stop = cfg, accelerator, engines, stop
        self.enabled = bool(cfg.data.val)
        self.metrics_path = metrics_path
        self.sample_batch = self._first_val_batch() if self.enabled else None
        self.names = list(names) if self.enabled else []
        self.realism = realism.Realism(self.names, accelerator.device,
                                       realism.weights_dir(cfg.eval.weights_dir))
        self.abandoned = False  # the last evaluation was stopped part-way (on every rank)
        self.loader = None  # every evaluation's, made at the first (persistent off CPU)

    def _loader(self, batch_size: int | None = None, rank: int | None = None,
                world_size: int | None = None, max_images: int = 0, persistent: bool = False):
        acc = self.accelerator
        return data.make_eval_loader(
            self.cfg.data, rank=acc.process_index if rank is None else rank,
            world_size=acc.num_processes if world_size is None else world_size,
            in_channels=self.cfg.model.in_channels, out_channels=self.cfg.model.out_channels,
            batch_size=batch_size, max_images=max_images, seed=self.cfg.train.seed,
            persistent=persistent, multiple=self.cfg.model.size_multiple)

    def _first_val_batch(self):
        if not self.accelerator.is_main_process:
            return None
        batch = next(iter(self._loader(self.cfg.log.samples, rank=0, world_size=1)), None)
        return None if batch is None else self._to_device(batch)

    def _to_device(self, batch):
        faults.sleep_point("eval.batch")
        device = self.accelerator.device
        return batch["input"].to(device), batch["target"].to(device), batch["key"]

    def metrics(self, step: int) -> dict | None:
        """This step's metrics (None: no val split, or abandoned for a stop request)."""
        self.abandoned = False
        if not self.enabled:
            return None
        generator = self.engines.eval_generator()  # unwrapped, no DDP collectives: ranks differ in count
        if self.loader is None:
            # persistent workers, except on CPU: forked mid-run they would keep, for the
            # rest of it, a copy of every host page the trainer writes after the fork
            # (weights, Adam's state, the allocator's kept blocks): GBs on CPU
            persistent = self.accelerator.device.type != "cpu"
            self.loader = self._loader(max_images=self.cfg.eval.max_images, persistent=persistent)
        loader = self.loader
        bar = progress.Progress(loader.rank_images, desc=f"eval at step {step}:", unit="image",
                                enabled=self.accelerator.is_main_process and self.cfg.log.progress)
        result = evaluate.evaluate(generator, (self._to_device(b) for b in loader),
                                   self.accelerator.device, self.engines.autocast,
                                   distributed.sum_across_ranks, seed=self.cfg.train.seed,
                                   names=self.names, realism=self.realism,
                                   gather=distributed.gather_objects,
                                   stop=lambda: self.stop.requested, progress=bar.update)
        bar.close()
        if result is None:
            self.abandoned = True
            log0(self.accelerator, f"step {step}: evaluation abandoned ({self.stop.signal_name or 'a peer'} "
                                   "asked to stop)")
            return None
        if self.accelerator.is_main_process:
            jsonl.append(self.metrics_path, [{"step": step, **result}])
        self.accelerator.log({f"val/{k}": v for k, v in result.items() if v is not None}, step=step)
        return result

    def samples(self, step: int) -> None:
        generator = self.engines.eval_generator()  # on every rank: a collective under ZeRO + EMA
        if self.sample_batch is None:
            return
        grid = evaluate.sample_grid(generator, *self.sample_batch, self.accelerator.device,
                                    self.engines.autocast, seed=self.cfg.train.seed)
        png_path = run_layout.sample_grid(self.cfg.train.run_dir, step)
        evaluate.save_png(png_path, grid)
        tracking.log_image(self.accelerator, self.cfg.log.tracker, grid, step, png_path)

    def recorded(self, step: int) -> dict | None:
        """The val metrics metrics.jsonl holds for `step`, if any (main process)."""
        records = jsonl.read(self.metrics_path)
        return next((r for r in reversed(records) if r["step"] == step), None)

    def summary(self, result: dict) -> str:
        """'L1 0.1200 (untrained 0.3192, -62%), PSNR ...': the metrics measured, each
        beside its value at step 0 of this run where that was logged."""
        untrained = self.recorded(0) or {}
        keys = [realism.value_key(name) for name in self.names]
        return ", ".join(evaluate.shown(key, result[key], untrained.get(key))
                         for key in keys if result.get(key) is not None)



def metric_names(cfg: Config) -> list[str]:
    """eval.metrics resolved here (never downloading); ConfigError naming what is missing."""
    try:
        names = realism.choose(cfg.eval.metrics, realism.weights_dir(cfg.eval.weights_dir))
    except realism.MetricsError as err:
        raise ConfigError(f"eval.metrics: {err}") from None
    best = cfg.train.best_metric
    if best and best not in names:
        raise ConfigError(f"train.best_metric: {best} cannot be measured here ("
                          f"{realism.missing(best, realism.weights_dir(cfg.eval.weights_dir))})")
    return names
