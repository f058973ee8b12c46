"""G and D as one DeepSpeed engine each (the accelerate config's `distributed_type:
DEEPSPEED`), behind the interface pipeline/engines.py describes, and what only they need:
the engines' config filled in from ours, bf16 inputs where DeepSpeed casts the weights,
G's fp32 master weights (gathered for the export, set for model.init_from, averaged per
partition for the EMA), and `check_supported`: what these engines cannot do, which the
start-up gate (pipeline/startup.py) refuses before any process group exists.
"""
from __future__ import annotations

import copy
import logging
import os
from contextlib import nullcontext

import torch
from accelerate import Accelerator

from pipeline.config import Config, ConfigError
from pipeline.engine_base import Engines, build_models, build_optimizers, without_sync_batchnorm
from pipeline.errors import CheckpointMismatch
from pipeline.gan import StepHooks
from pipeline.models import initialise_from

log = logging.getLogger(__name__)

DEEPSPEED_TAG = "engine"  # the one tag inside each of a checkpoint's G/ and D/ folders
EMA_PARTITION = "ema_partition_rank{rank}.pt"  # G's EMA, each rank's share, in G/


def deepspeed_config(base: dict, cfg: Config, bf16: bool) -> dict:
    """The engines' config: the accelerate config's DeepSpeed JSON, with what our config
    owns filled in (DeepSpeed's "auto" batch would need a prepared DataLoader)."""
    config = copy.deepcopy(base)  # check_supported has refused what the engines cannot do
    config.pop("train_batch_size", None)  # derived: micro batch x processes
    config.update(train_micro_batch_size_per_gpu=cfg.data.batch_size,
                  gradient_accumulation_steps=cfg.train.grad_accum,
                  gradient_clipping=cfg.optim.grad_clip)  # DeepSpeed would clip at 1.0 by default
    if bf16:  # bf16 mode casts parameters only: BatchNorm wants its buffers in bf16 too
        config.setdefault("data_types", {})["buffer_dtype"] = "bf16"
    if bf16 and cfg.train.grad_accum > 1 and not accumulates_in_bf16(config, cfg, bf16):
        # ZeRO sums the micro-steps' gradients in fp32 (bf16 sums would lose their low bits)
        config.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"
    return config


def accumulates_in_bf16(config: dict, cfg: Config, bf16: bool) -> bool:
    """ZeRO-0 in bf16 with train.grad_accum > 1: DeepSpeed's stage-0 bf16 optimiser sums the
    micro-steps' gradients in the bf16 parameters' .grad and refuses grad_accum_dtype fp32
    (NotImplementedError "unsupported mix of model_dtype ... grad_accum_dtype"), so there
    the sums stay in bf16 (ZeRO-1/2 are given fp32 sums above)."""
    stage = config.get("zero_optimization", {}).get("stage", 0)
    return bf16 and cfg.train.grad_accum > 1 and stage == 0


def cast_inputs_where_weights_are_bf16(model: torch.nn.Module) -> None:
    """DeepSpeed's bf16 mode casts the parameters (and buffers: data_types.buffer_dtype) only,
    and its engine.forward switches autocast off inside when it sees one outside (on CUDA:
    deepspeed/runtime/torch_autocast.py): fp32 inputs would meet bf16 weights at G's first
    convolution. So each module holding tensors of its own gets a pre-hook that casts its
    inputs to bf16, just where autocast would cast them: on a CPU, where autocast stays on
    inside, nothing changes (an average pooling before a convolution still runs in fp32).
    On the modules, not the engine: D through frozen_view and G's no-grad forwards too."""
    for module in model.modules():
        if _own_tensor(module) is not None:
            module.register_forward_pre_hook(_inputs_to_bf16_where_weights_are)


def _own_tensor(module: torch.nn.Module) -> torch.Tensor | None:
    own = (*module.parameters(recurse=False), *module.buffers(recurse=False))
    return next((t for t in own if t.is_floating_point()), None)


def _inputs_to_bf16_where_weights_are(module: torch.nn.Module, inputs: tuple) -> tuple | None:
    """A no-op in an fp32 copy of the module (an fp32 EMA: deepcopy keeps the hooks)."""
    if _own_tensor(module).dtype != torch.bfloat16:
        return None
    return tuple(x.to(torch.bfloat16) if torch.is_tensor(x) and x.is_floating_point() else x
                 for x in inputs)


class DeepSpeedEngines(Engines):
    """One DeepSpeed engine per model (one engine cannot hold two optimisers), both from
    the DeepSpeed JSON the accelerate config names. In bf16 the modules hold bf16 working
    copies; the fp32 masters live (partitioned under ZeRO) in the engines' optimisers."""

    def __init__(self, cfg: Config, accelerator: Accelerator):
        import deepspeed

        self.cfg = cfg
        self.channels_last = False  # DeepSpeed needs contiguous weights (check_supported)
        G, D = build_models(cfg, self.channels_last)
        opt_G, opt_D, self.schedulers = build_optimizers(cfg, G, D)
        bf16 = accelerator.mixed_precision == "bf16"
        config = deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, cfg, bf16)
        self.G, self.opt_G, _, _ = deepspeed.initialize(model=G, optimizer=opt_G,
                                                        config=copy.deepcopy(config))
        self.D, self.opt_D, _, _ = deepspeed.initialize(model=D, optimizer=opt_D,
                                                        config=copy.deepcopy(config))
        device_type = accelerator.device.type
        if bf16:  # bf16 parameters want bf16 inputs, whether or not autocast runs in the engine
            cast_inputs_where_weights_are_bf16(G)
            cast_inputs_where_weights_are_bf16(D)
        if accumulates_in_bf16(config, cfg, bf16) and accelerator.is_main_process:
            log.warning(f"train.grad_accum={cfg.train.grad_accum} under ZeRO-0 in bf16: DeepSpeed sums the "
                        "micro-steps' gradients in bf16 (stage 0 refuses the fp32 sums ZeRO-1/2 use)")
        # and autocast for what runs outside the engines (the losses) and for evaluation
        self.autocast = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if bf16 else nullcontext
        self.hooks = StepHooks(backward=lambda loss, engine: engine.backward(loss),
                               step=lambda optimizer, engine: engine.step(),
                               autocast=self.autocast, frozen_view=lambda engine: engine.module,
                               engine_accumulates=True)  # gradient_accumulation_steps
        self.ema_decay = cfg.train.ema_decay
        # G's EMA as this rank's share of it: a copy of its fp32 master partition
        self.ema_partition = self._master_copy() if self.ema_decay > 0 else None
        self._gathered_ema: tuple[int, torch.nn.Module] | None = None  # (G's step, the EMA)

    def guarded_hooks(self, on_nonfinite) -> StepHooks:
        """Unguarded: each rank holds only its partition of the gradients, and the engine
        steps inside engine.step(); the trainer's loss check is the only guard here."""
        return self.hooks

    def describe(self) -> dict:
        return {"engines": "deepspeed", "zero_stage": self.G.zero_optimization_stage(),
                "optimizer": type(self.opt_G).__name__, "channels_last": False}

    @property
    def generator(self) -> torch.nn.Module:
        return self.G.module

    @property
    def discriminator(self) -> torch.nn.Module:
        return self.D.module

    def save(self, staging: str, rank: int) -> None:
        """Every rank: each engine writes its model and its optimiser partition into its own
        folder (both engines name their files alike); our schedulers ride along, and the
        EMA's partition beside G's."""
        for name, engine in (("G", self.G), ("D", self.D)):
            engine.save_checkpoint(os.path.join(staging, name), tag=DEEPSPEED_TAG,
                                   client_state={"scheduler": self.schedulers[name].state_dict()},
                                   save_latest=False)
        if self.ema_partition is not None:
            torch.save(self.ema_partition, os.path.join(staging, "G", EMA_PARTITION.format(rank=rank)))

    def load(self, path: str) -> None:
        """DeepSpeed checkpoints are pickles: resume only from checkpoints you trust."""
        for name, engine in (("G", self.G), ("D", self.D)):
            _, client_state = engine.load_checkpoint(os.path.join(path, name), tag=DEEPSPEED_TAG,
                                                     load_lr_scheduler_states=False)
            if client_state is None:
                raise CheckpointMismatch(f"{path}/{name}: no DeepSpeed checkpoint (saved without "
                                         "DeepSpeed? resume it without DeepSpeed)")
            self.schedulers[name].load_state_dict(client_state["scheduler"])
        if self.ema_partition is not None:
            self._load_ema(path)

    def _load_ema(self, path: str) -> None:
        """This rank's EMA partition; a checkpoint saved without one starts the EMA at G."""
        file = os.path.join(path, "G", EMA_PARTITION.format(rank=self.G.global_rank))
        if not os.path.isfile(file):
            self.ema_partition = self._master_copy()
            return
        saved = torch.load(file, weights_only=True)
        if [t.shape for t in saved] != [t.shape for t in self.ema_partition]:
            raise CheckpointMismatch(f"{file}: the EMA was partitioned for another number of "
                                     "processes; resume with the number it was saved with")
        for averaged, value in zip(self.ema_partition, saved):
            averaged.copy_(value)

    # ---------------------------------------------------------------- G's fp32 masters

    def _master_copy(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in master_partition(self.G)]

    def update_ema(self) -> None:
        """On this rank's partition only: no communication per step."""
        if self.ema_partition is not None:
            with torch.no_grad():
                for averaged, current in zip(self.ema_partition, master_partition(self.G)):
                    averaged.lerp_(current, 1.0 - self.ema_decay)

    def eval_generator(self) -> torch.nn.Module:
        """G, or an fp32 module holding the gathered EMA (gathered once per G step; a
        collective under ZeRO: every rank calls); plain BatchNorm under syncbatch."""
        if self.ema_partition is None:
            return without_sync_batchnorm(self.generator)
        step = self.G.global_steps
        if self._gathered_ema is None or self._gathered_ema[0] != step:
            ema = copy.deepcopy(self.generator).float().requires_grad_(False)
            ema.load_state_dict(self.generator_state_fp32())
            self._gathered_ema = (step, without_sync_batchnorm(ema))
        return self._gathered_ema[1]

    def generator_state_fp32(self) -> dict[str, torch.Tensor]:
        """What the export holds, whole on every rank: G's fp32 master weights gathered
        from every rank's partition, or the EMA's (swapped into the masters for the one
        gather), and G's buffers (BatchNorm statistics: this rank's, as fp32)."""
        if self.ema_partition is None:
            return self._gathered_state()
        masters = master_partition(self.G)
        current = [t.detach().clone() for t in masters]
        with torch.no_grad():
            try:
                for master, averaged in zip(masters, self.ema_partition):
                    master.copy_(averaged)
                # copies: at stage 0 in fp32 the masters are the parameters, restored below
                return {name: tensor.clone() for name, tensor in self._gathered_state().items()}
            finally:
                for master, value in zip(masters, current):
                    master.copy_(value)

    def _gathered_state(self) -> dict[str, torch.Tensor]:
        masters = fp32_masters(self.G)
        return {name: masters.get(name, tensor).detach().float() if tensor.is_floating_point()
                else tensor for name, tensor in self.generator.state_dict().items()}

    def initialise_generator(self, source: torch.nn.Module, source_name: str) -> None:
        """Into the fp32 masters too (the optimiser steps those), through an fp32 twin
        of G: in bf16 the module only holds bf16 working copies."""
        twin = copy.deepcopy(self.generator).float()
        initialise_from(twin, self.cfg.model.generator, source, source_name)
        state = twin.state_dict()
        set_fp32_masters(self.G, {name: state[name] for name, _ in self.generator.named_parameters()})
        with torch.no_grad():
            self.generator.load_state_dict(state)
        if self.ema_partition is not None:
            self.ema_partition = self._master_copy()

    def freeze(self, hooks: StepHooks, params: list, active) -> StepHooks:
        """Their gradients zeroed as they are computed, before DeepSpeed reduces and
        partitions them: Adam then leaves them exactly where they are (zero moments give a
        zero update). Unlike the DDP path's, their Adam step count runs on meanwhile, so
        their first updates after release are bias-corrected as late steps."""
        for param in params:
            param.register_hook(lambda grad: torch.zeros_like(grad) if active() else grad)
        return hooks


def fp32_masters(engine) -> dict[str, torch.Tensor]:
    """parameter name -> its whole fp32 master. Collective under ZeRO: every rank must call."""
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(engine.module.named_parameters())
    if engine.zero_optimization_stage() > 0:  # each master all-reduced from its partitions
        return {name: safe_get_full_fp32_param(param) for name, param in params.items()}
    if engine.bfloat16_enabled():
        return _stage0_masters(engine.optimizer, params)
    return params  # stage 0 in fp32: the parameters are their own masters


def master_partition(engine) -> list[torch.Tensor]:
    """This rank's fp32 master tensors, as the optimiser steps them: under ZeRO its flat
    partitions, at stage 0 the fp32 copies (bf16) or the parameters themselves (fp32)."""
    if engine.zero_optimization_stage() > 0:
        return list(engine.optimizer.single_partition_of_fp32_groups)
    if engine.bfloat16_enabled():
        return [master for masters in engine.optimizer.fp32_groups for master in masters]
    return list(engine.module.parameters())


def set_fp32_masters(engine, values: dict[str, torch.Tensor]) -> None:
    """Each named parameter's fp32 master <- values[name] (every rank passes the whole
    tensors; each keeps its own partition of them)."""
    from deepspeed.utils import safe_set_full_fp32_param

    params = dict(engine.module.named_parameters())
    with torch.no_grad():
        if engine.zero_optimization_stage() > 0:
            for name, value in values.items():
                safe_set_full_fp32_param(params[name], value.to(params[name].device))
            return
        masters = _stage0_masters(engine.optimizer, params) if engine.bfloat16_enabled() else params
        for name, value in values.items():
            masters[name].copy_(value)


def _stage0_masters(optimizer, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stage 0 in bf16: DeepSpeed's fp16-style wrapper of our torch Adam keeps an fp32
    copy of each parameter, group by group."""
    names = {id(param): name for name, param in params.items()}
    return {names[id(param)]: master
            for group, masters in zip(optimizer.fp16_groups, optimizer.fp32_groups)
            for param, master in zip(group, masters)}


# --------------------------------------------------------------------------- what they cannot do

def check_supported(cfg: Config, config: dict) -> None:
    """What these engines cannot do, one ConfigError each: the start-up gate's DeepSpeed
    refusals, before anything is built. `config` is the launch's DeepSpeed JSON
    (launch_config)."""
    if cfg.train.on_nonfinite == "skip":
        raise ConfigError("train.on_nonfinite: 'skip' is not supported under DeepSpeed (its "
                          "engines step partitioned gradients the trainer cannot inspect); "
                          "use 'stop'")
    if cfg.train.compile:
        raise ConfigError("train.compile: not supported under DeepSpeed yet; set it to false")
    # DeepSpeed flattens parameters into contiguous buffers: channels_last weights fail its
    # initialisation, so train.channels_last is a DDP-only speed-up
    if cfg.train.channels_last is True:
        raise ConfigError("train.channels_last: not supported under DeepSpeed (it needs "
                          "contiguous weights); set it to auto or false")
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ConfigError(f"DeepSpeed config: remove '{key}': the trainer builds Adam and the "
                              "lr schedule from optim.* for G and D")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"DeepSpeed config: zero_optimization.stage {stage} is not supported: "
                          "use 0, 1 or 2 (stage 3 partitions the parameters D is called with)")


def launch_config() -> dict:
    """The DeepSpeed JSON this launch names, as accelerate reads it for the Accelerator (its
    config file, or the options of the accelerate config), known before any process group."""
    from accelerate.utils import DeepSpeedPlugin

    try:
        return DeepSpeedPlugin().deepspeed_config
    except ValueError as err:  # no such file, no zero_optimization: accelerate's words
        raise ConfigError(f"DeepSpeed config: {str(err).splitlines()[0]}") from None


def saved_by_deepspeed(checkpoint: str) -> bool:
    """Whether a checkpoint folder holds these engines' state (G/ and D/) or DDP's."""
    return os.path.isdir(os.path.join(checkpoint, "G"))
