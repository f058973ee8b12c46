"""G and D as the step needs them: DDP through Accelerate, or one DeepSpeed engine each.

The accelerate config alone decides which (`distributed_type: DEEPSPEED` or not; the
start-up gate's RunPlan.engine says which, and has refused what DeepSpeed cannot do). Both
kinds offer one interface to the trainer:
    G, D, opt_G, opt_D, hooks   what `gan.train_step` takes
    guarded_hooks(on_nonfinite) hooks that never apply a NaN/inf gradient, where the
                                engines can see whole gradients (DDP)
    schedulers, step_schedulers our LambdaLRs, stepped once per step by us (never prepared)
    generator, modules()        the plain modules: replica digests
    eval_generator()            what evaluation, sample grids and the export see: G, or its
                                EMA (train.ema_decay; a collective under ZeRO: all ranks)
    update_ema()                after each applied G update
    initialise_generator(...)   a fresh run's G from a trained one (model.init_from)
    freeze(hooks, params, on)   hooks under which `params` stay put while on() (pix2pixHD's
                                staged training); they stay in the optimiser throughout
    autocast                    the forward-pass precision context, for evaluation too
    save(staging, rank)         model, optimiser and scheduler state into a checkpoint folder
    load(checkpoint)            ... and back, on every rank
    generator_state_fp32()      the generator export: fp32 master weights + buffers, whole
                                on every rank (a collective under ZeRO: call on all ranks)
    describe()                  what the run log says about them
checkpoint.py owns everything else in a checkpoint (staging, per-rank data position and
RNG, commit, marker, rotation). This module holds the DDP kind and make_engines; the
DeepSpeed kind is pipeline/deepspeed_engines.py, what both share pipeline/engine_base.py
(re-exported here).
"""
from __future__ import annotations

import copy

import torch
from accelerate import Accelerator

from pipeline import checkpoint, distributed, precision
from pipeline.config import Config
from pipeline.deepspeed_engines import DeepSpeedEngines
from pipeline.engine_base import (  # noqa: F401 - re-exported: the engines' API is this module's
    Engines,
    build_models,
    build_optimizers,
    lr_factor,
    without_sync_batchnorm,
)
from pipeline.gan import StepHooks


def engine_kind() -> str:
    """"deepspeed" where the launcher says so (distributed.launched_with_deepspeed), else
    "ddp": what the start-up gate puts in RunPlan.engine."""
    return "deepspeed" if distributed.launched_with_deepspeed() else "ddp"


# --------------------------------------------------------------------------- DDP

class DDPEngines(Engines):
    """Accelerate's prepare path: DDP-wrapped modules (or plain ones on one process),
    autocast for bf16, fp32 parameters that are their own master weights."""

    def __init__(self, cfg: Config, accelerator: Accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.channels_last = precision.channels_last(cfg.train.channels_last, accelerator.mixed_precision,
                                                     accelerator.device.type, cfg.data.batch_size)
        G, D = build_models(cfg, self.channels_last)
        opt_G, opt_D, self.schedulers = build_optimizers(cfg, G, D)
        if cfg.train.compile:
            # In place (nn.Module.compile), before DDP wraps them, never torch.compile
            # around DDP: DDP's forward and no_sync stay DDP's and call the compiled
            # modules, which keep their state_dict keys (no `_orig_mod.`: exports,
            # resumes and init_from stay plain, compiled or not)
            G.compile()
            D.compile()
        self._generator, self._discriminator = G, D  # the plain modules, whatever prepare wraps
        self.G, self.D, self.opt_G, self.opt_D = accelerator.prepare(G, D, opt_G, opt_D)
        if cfg.train.ema_decay > 0:  # a deepcopy drops the compiled call: a plain module
            self.ema = copy.deepcopy(G).requires_grad_(False)
        self.autocast = accelerator.autocast
        # D in the G step through the plain module: frozen, it needs no all-reduce. Not
        # accelerator.unwrap_model: it imports DeepSpeed wherever it is installed (and
        # DeepSpeed mlflow), 2-4 s into every rank's first step
        plain = {id(self.G): G, id(self.D): D}
        unwrap = lambda model: plain.get(id(model), getattr(model, "module", model))
        self.hooks = StepHooks(backward=lambda loss, model: accelerator.backward(loss),
                               step=self._clip_and_step, autocast=accelerator.autocast,
                               frozen_view=unwrap, no_sync=accelerator.no_sync)

    def _clip_and_step(self, optimizer, model) -> None:
        if self.cfg.optim.grad_clip > 0:
            self.accelerator.clip_grad_norm_(model.parameters(), self.cfg.optim.grad_clip)
        optimizer.step()

    @property
    def generator(self) -> torch.nn.Module:
        return self._generator

    @property
    def discriminator(self) -> torch.nn.Module:
        return self._discriminator

    def save(self, staging: str, rank: int) -> None:
        """Rank 0 writes D and the optimiser/scheduler states (G is the export itself)."""
        if rank == 0:
            checkpoint.write_weights_and_optimizers(staging, self.discriminator, self.optimizers(),
                                                    self.schedulers, self.generator if self.ema else None)

    def load(self, path: str) -> None:
        checkpoint.load_weights_and_optimizers(path, self.generator, self.discriminator,
                                               self.optimizers(), self.schedulers, self.ema)

    def optimizers(self) -> dict:
        return {"G": self.opt_G, "D": self.opt_D}

    def describe(self) -> dict:
        return {"engines": "ddp", "channels_last": self.channels_last}

    def generator_state_fp32(self) -> dict[str, torch.Tensor]:
        return dict(self.eval_generator().state_dict())


def make_engines(cfg: Config, accelerator: Accelerator, engine: str | None = None) -> Engines:
    """The engines of `engine` (the run plan's: "ddp" or "deepspeed"); None asks the
    launcher (engine_kind), for the benchmarks that build engines without the gate."""
    if (engine or engine_kind()) == "deepspeed":
        return DeepSpeedEngines(cfg, accelerator)
    return DDPEngines(cfg, accelerator)
