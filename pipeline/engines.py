"""G and D as the step needs them: DDP through Accelerate, or one DeepSpeed engine each.

The accelerate config alone decides which (`distributed_type: DEEPSPEED` or not). Both
kinds offer one interface to the trainer:
    G, D, opt_G, opt_D, hooks   what `gan.train_step` takes
    guarded_hooks(on_nonfinite) hooks that never apply a NaN/inf gradient, where the
                                engines can see whole gradients (DDP)
    schedulers, step_schedulers our LambdaLRs, stepped once per step by us (never prepared)
    generator, modules()        the plain modules: evaluation, replica digests
    autocast                    the forward-pass precision context, for evaluation too
    save(staging, rank)         model, optimiser and scheduler state into a checkpoint folder
    load(checkpoint)            ... and back, on every rank
    generator_state_fp32()      the generator export: fp32 master weights + buffers, whole
                                on every rank (a collective under ZeRO: call on all ranks)
    describe()                  what the run log says about them
checkpoint.py owns everything else in a checkpoint (staging, per-rank data position and
RNG, commit, marker, rotation).
"""
from __future__ import annotations

import copy
import os
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from pipeline import checkpoint
from pipeline.config import Config, ConfigError
from pipeline.errors import CheckpointMismatch
from pipeline.gan import StepHooks, guard_updates
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

    ema: torch.nn.Module | None = None  # G's moving average (train.ema_decay), DDP only

    @property
    def eval_generator(self) -> torch.nn.Module:
        """What evaluation, sample grids and the export see: the EMA where there is one."""
        return self.generator if self.ema is None else self.ema

    def initialise_generator(self, source: torch.nn.Module, source_name: str) -> None:
        """G (and its EMA) from a trained generator (models.initialise_from)."""
        initialise_from(self.generator, self.cfg.model.generator, source, source_name)
        if self.ema is not None:
            self.ema.load_state_dict(self.generator.state_dict())

    def update_ema(self) -> None:
        if self.ema is not None:
            update_ema(self.ema, self.generator, self.cfg.train.ema_decay)


# --------------------------------------------------------------------------- DDP

class DDPEngines(Engines):
    """Accelerate's prepare path: DDP-wrapped modules (or plain ones on one process),
    autocast for bf16, fp32 parameters that are their own master weights."""

    def __init__(self, cfg: Config, accelerator: Accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        if accelerator.device.type == "cpu":
            # accelerate's unwrap_model imports DeepSpeed wherever it is installed, whose
            # import then warns "Setting accelerator to CPU..." into a run that never uses
            # it; naming the accelerator it would pick is the same choice without the line
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        self.channels_last = cfg.train.channels_last
        G, D = build_models(cfg, self.channels_last)
        opt_G, opt_D, self.schedulers = build_optimizers(cfg, G, D)
        self.G, self.D, self.opt_G, self.opt_D = accelerator.prepare(G, D, opt_G, opt_D)
        if cfg.train.ema_decay > 0:
            self.ema = copy.deepcopy(self.generator).requires_grad_(False)
        if cfg.train.compile:
            self.G, self.D = torch.compile(self.G), torch.compile(self.D)
        self.autocast = accelerator.autocast
        # D in the G step through the unwrapped module: frozen, it needs no all-reduce
        self.hooks = StepHooks(backward=lambda loss, model: accelerator.backward(loss),
                               step=self._clip_and_step, autocast=accelerator.autocast,
                               frozen_view=accelerator.unwrap_model, no_sync=accelerator.no_sync)

    def _clip_and_step(self, optimizer, model) -> None:
        if self.cfg.optim.grad_clip > 0:
            self.accelerator.clip_grad_norm_(model.parameters(), self.cfg.optim.grad_clip)
        optimizer.step()

    @property
    def generator(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.G)

    @property
    def discriminator(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.D)

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
        return dict(self.eval_generator.state_dict())


# --------------------------------------------------------------------------- DeepSpeed

DEEPSPEED_TAG = "engine"  # the one tag inside each of a checkpoint's G/ and D/ folders


def deepspeed_config(base: dict, cfg: Config, bf16: bool) -> dict:
    """The engines' config: the accelerate config's DeepSpeed JSON, with what our config
    owns filled in (DeepSpeed's "auto" batch would need a prepared DataLoader)."""
    config = copy.deepcopy(base)
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ConfigError(f"DeepSpeed config: remove '{key}': the trainer builds Adam and the "
                              "lr schedule from optim.* for G and D")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"DeepSpeed config: zero_optimization.stage {stage} is not supported: "
                          "use 0, 1 or 2 (stage 3 partitions the parameters D is called with)")
    config.pop("train_batch_size", None)  # derived: micro batch x processes
    config.update(train_micro_batch_size_per_gpu=cfg.data.batch_size,
                  gradient_accumulation_steps=cfg.train.grad_accum,
                  gradient_clipping=cfg.optim.grad_clip)  # DeepSpeed would clip at 1.0 by default
    if bf16:  # bf16 mode casts parameters only: BatchNorm wants its buffers in bf16 too
        config.setdefault("data_types", {})["buffer_dtype"] = "bf16"
    if bf16 and cfg.train.grad_accum > 1:  # bf16 would sum the micro-steps' gradients in bf16
        config.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"
    return config


class DeepSpeedEngines(Engines):
    """One DeepSpeed engine per model (one engine cannot hold two optimisers), both from
    the DeepSpeed JSON the accelerate config names. In bf16 the modules hold bf16 working
    copies; the fp32 masters live (partitioned under ZeRO) in the engines' optimisers."""

    def __init__(self, cfg: Config, accelerator: Accelerator):
        import deepspeed

        if cfg.train.compile:
            raise ConfigError("train.compile: not supported under DeepSpeed yet; set it to false")
        # DeepSpeed flattens parameters into contiguous buffers: channels_last weights
        # fail its initialisation, so train.channels_last is a DDP-only speed-up
        self.channels_last = False
        G, D = build_models(cfg, self.channels_last)
        opt_G, opt_D, self.schedulers = build_optimizers(cfg, G, D)
        bf16 = accelerator.mixed_precision == "bf16"
        config = deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, cfg, bf16)
        self.G, self.opt_G, _, _ = deepspeed.initialize(model=G, optimizer=opt_G,
                                                        config=copy.deepcopy(config))
        self.D, self.opt_D, _, _ = deepspeed.initialize(model=D, optimizer=opt_D,
                                                        config=copy.deepcopy(config))
        device_type = accelerator.device.type
        # bf16 parameters want bf16 inputs: autocast casts them at each convolution
        self.autocast = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if bf16 else nullcontext
        self.hooks = StepHooks(backward=lambda loss, engine: engine.backward(loss),
                               step=lambda optimizer, engine: engine.step(),
                               autocast=self.autocast, frozen_view=lambda engine: engine.module,
                               engine_accumulates=True)  # gradient_accumulation_steps

    def guarded_hooks(self, on_nonfinite) -> StepHooks:
        """Unguarded: each rank holds only its partition of the gradients, and the engine
        steps inside engine.step(); the trainer's loss check is the only guard here."""
        return self.hooks

    def describe(self) -> dict:
        return {"engines": "deepspeed", "zero_stage": self.G.zero_optimization_stage(),
                "optimizer": type(self.opt_G).__name__}

    @property
    def generator(self) -> torch.nn.Module:
        return self.G.module

    @property
    def discriminator(self) -> torch.nn.Module:
        return self.D.module

    def save(self, staging: str, rank: int) -> None:
        """Every rank: each engine writes its model and its optimiser partition into its own
        folder (both engines name their files alike); our schedulers ride along."""
        for name, engine in (("G", self.G), ("D", self.D)):
            engine.save_checkpoint(os.path.join(staging, name), tag=DEEPSPEED_TAG,
                                   client_state={"scheduler": self.schedulers[name].state_dict()},
                                   save_latest=False)

    def load(self, path: str) -> None:
        """DeepSpeed checkpoints are pickles: resume only from checkpoints you trust."""
        for name, engine in (("G", self.G), ("D", self.D)):
            _, client_state = engine.load_checkpoint(os.path.join(path, name), tag=DEEPSPEED_TAG,
                                                     load_lr_scheduler_states=False)
            if client_state is None:
                raise CheckpointMismatch(f"{path}/{name}: no DeepSpeed checkpoint (saved without "
                                         "DeepSpeed? resume it without DeepSpeed)")
            self.schedulers[name].load_state_dict(client_state["scheduler"])

    def generator_state_fp32(self) -> dict[str, torch.Tensor]:
        """G's fp32 master weights, gathered from every rank's partition, and its buffers
        (BatchNorm statistics: this rank's, as fp32)."""
        masters = fp32_masters(self.G)
        return {name: masters.get(name, tensor).detach().float() if tensor.is_floating_point()
                else tensor for name, tensor in self.generator.state_dict().items()}


def fp32_masters(engine) -> dict[str, torch.Tensor]:
    """parameter name -> its whole fp32 master. Collective under ZeRO: every rank must call."""
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(engine.module.named_parameters())
    if engine.zero_optimization_stage() > 0:  # each master all-reduced from its partitions
        return {name: safe_get_full_fp32_param(param) for name, param in params.items()}
    if engine.bfloat16_enabled():
        return _stage0_masters(engine.optimizer, params)
    return params  # stage 0 in fp32: the parameters are their own masters


def _stage0_masters(optimizer, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stage 0 in bf16: DeepSpeed's fp16-style wrapper of our torch Adam keeps an fp32
    copy of each parameter, group by group."""
    names = {id(param): name for name, param in params.items()}
    return {names[id(param)]: master
            for group, masters in zip(optimizer.fp16_groups, optimizer.fp32_groups)
            for param, master in zip(group, masters)}


def make_engines(cfg: Config, accelerator: Accelerator) -> Engines:
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeedEngines(cfg, accelerator)
    return DDPEngines(cfg, accelerator)
