"""What both engine kinds share (pipeline/engines.py: DDP; pipeline/deepspeed_engines.py:
DeepSpeed): G and D built alike on every rank, Adam and the reference lr schedule, the
copy without SyncBatchNorm that evaluation runs, and the `Engines` base class whose
interface the trainer uses (listed in pipeline/engines.py's docstring). It owns no
engine of its own and picks none: make_engines (pipeline/engines.py) does.
"""
from __future__ import annotations

import copy

import torch

from pipeline.config import Config
from pipeline.gan import StepHooks, freeze_while, guard_updates
from pipeline.models import build_discriminator, build_generator, initialise_from, update_ema


def lr_factor(step: int, constant_steps: int, decay_steps: int) -> float:
    """The reference schedule: constant, then linear decay to zero."""
    if decay_steps <= 0 or step < constant_steps:
        return 1.0
    return max(0.0, 1.0 - (step - constant_steps) / decay_steps)


def build_models(cfg: Config, channels_last: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    G, D = build_generator(cfg.model), build_discriminator(cfg.model)
    if cfg.model.norm == "syncbatch":
        G, D = (torch.nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in (G, D))
    if channels_last:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    return G, D


def build_optimizers(cfg: Config, G: torch.nn.Module, D: torch.nn.Module):
    """(opt_G, opt_D, {"G": scheduler, "D": scheduler}): Adam and the reference schedule."""
    adam = dict(lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
    if cfg.optim.adam_impl != "auto":
        adam[cfg.optim.adam_impl] = True
    opt_G, opt_D = torch.optim.Adam(G.parameters(), **adam), torch.optim.Adam(D.parameters(), **adam)
    schedule = lambda step: lr_factor(step, cfg.optim.constant_steps, cfg.optim.decay_steps)
    schedulers = {"G": torch.optim.lr_scheduler.LambdaLR(opt_G, schedule),
                  "D": torch.optim.lr_scheduler.LambdaLR(opt_D, schedule)}
    return opt_G, opt_D, schedulers


def without_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """`module`, or where it holds SyncBatchNorm a copy with plain BatchNorm of the same
    weights and statistics. SyncBatchNorm all-reduces on every train-mode forward once a
    process group exists, DDP or not; evaluation runs G in train mode (pix2pix's protocol)
    one image per forward, and ranks hold different numbers of images: it would hang."""
    if not any(isinstance(m, torch.nn.SyncBatchNorm) for m in module.modules()):
        return module
    return _plain_batchnorm(copy.deepcopy(module))


def _plain_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    if isinstance(module, torch.nn.SyncBatchNorm):
        like = module.weight if module.affine else module.running_mean
        plain = torch.nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats)
        plain = plain.to(device=like.device, dtype=like.dtype) if like is not None else plain
        plain.load_state_dict(module.state_dict())
        return plain.train(module.training)
    for name, child in module.named_children():
        setattr(module, name, _plain_batchnorm(child))
    return module


class Engines:
    """What both kinds share; subclasses set G, D, opt_G, opt_D, hooks, schedulers, autocast
    and channels_last (the memory format batches should come in)."""
    schedulers: dict
    channels_last: bool

    def step_schedulers(self) -> None:
        # Ours, once per step: a prepared scheduler would step once per process per call.
        for scheduler in self.schedulers.values():
            scheduler.step()

    def lr(self) -> float:
        return self.schedulers["G"].get_last_lr()[0]

    def guarded_hooks(self, on_nonfinite) -> StepHooks:
        """`hooks` whose optimiser steps call `on_nonfinite(model)` instead of applying a
        NaN or inf gradient (gan.guard_updates)."""
        return guard_updates(self.hooks, on_nonfinite)

    def modules(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        return self.generator, self.discriminator

    ema: torch.nn.Module | None = None  # G's moving average (train.ema_decay), a whole module

    def eval_generator(self) -> torch.nn.Module:
        """What evaluation, sample grids and the export see: the EMA where there is one
        (a copy with plain BatchNorm under model.norm=syncbatch: without_sync_batchnorm)."""
        return without_sync_batchnorm(self.generator if self.ema is None else self.ema)

    def freeze(self, hooks: StepHooks, params: list, active) -> StepHooks:
        """Their gradients dropped before G's optimiser steps (gan.freeze_while)."""
        return freeze_while(hooks, self.opt_G, params, active)

    def initialise_generator(self, source: torch.nn.Module, source_name: str) -> None:
        """G (and its EMA) from a trained generator (models.initialise_from)."""
        initialise_from(self.generator, self.cfg.model.generator, source, source_name)
        if self.ema is not None:
            self.ema.load_state_dict(self.generator.state_dict())

    def update_ema(self) -> None:
        if self.ema is not None:
            update_ema(self.ema, self.generator, self.cfg.train.ema_decay)
