"""The start-up gate: what a training run must pass before it trains, in one place and in
a fixed order, and the plan it then follows. Adding a refusal has one obvious place: here.

    check_before_launch(cfg)   needs no process group and writes nothing: the tracker is
                               installed; the shards exist and hold their splits;
                               model.init_from holds a generator; pre-resized shards match
                               data.load_size; the val metrics and loss weights are here;
                               what DeepSpeed cannot do
    start(cfg, rank, held)     with the run folder's lease held: the folder (a run there is
                               refused or set aside), the mirror, the Accelerator (world size,
                               precision, device-dependent options), a run folder every rank
                               shares, the checkpoint to resume and the batch layout kept
                               across world sizes -> (Accelerator, RunPlan)

The config's own checks (types, ranges, cross-field rules) run earlier, when it is parsed
(pipeline/config.py).
"""
from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from pipeline import (
    checkpoint,
    data,
    distributed,
    elastic,
    host_memory,
    lease,
    precision,
    realism,
    resume,
    run_folder,
    storage,
    tracking,
    weights,
)
from pipeline.config import BatchLayout, Config, ConfigError, validate_runtime
from pipeline.validation import metric_names

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    """What start-up decided, for the trainer to follow."""
    resume_from: str | None  # the checkpoint to load (None: a fresh start)
    layout: BatchLayout  # batch, accumulation, world size: the global batch


def check_before_launch(cfg: Config) -> None:
    """The refusals that need no other process, in one line each (ConfigError and kin)."""
    tracking.require_installed(cfg.log.tracker)  # accelerate would train untracked
    if distributed.launched_with_deepspeed() and cfg.train.on_nonfinite == "skip":
        raise ConfigError("train.on_nonfinite: 'skip' is not supported under DeepSpeed (its "
                          "engines step partitioned gradients the trainer cannot inspect); "
                          "use 'stop'")
    check_inputs(cfg)


def check_inputs(cfg: Config) -> None:
    """The shards named by data.train (and data.val) exist and hold their splits; what
    this launch cannot do is refused."""
    data.list_shards(cfg.data.train, cfg.data.train_split, key="data.train")
    source = cfg.model.init_from
    if source and not weights.has_generator(checkpoint.generator_folder(source)):
        raise ConfigError(f"model.init_from: {source} holds no generator (give a run folder, a "
                          "checkpoint step_N folder, a marker such as RUN/checkpoints/best, or an export)")
    packed = data.packed_load_size(cfg.data.train)
    if packed and packed != cfg.data.load_size:
        raise ConfigError(f"data.load_size: {cfg.data.load_size}, but {cfg.data.train} holds pairs "
                          f"already resized to {packed} x {packed} (shard.py --load-size {packed}): "
                          f"pass --data.load_size={packed}, or use shards of the original images")
    if cfg.data.val:
        data.list_shards(cfg.data.val, cfg.data.val_split, key="data.val")
        metric_names(cfg)
    if cfg.loss.lambda_vgg and (why := realism.missing_vgg19(realism.weights_dir(cfg.eval.weights_dir))):
        raise realism.MetricsError(why)  # before any process starts; the trainer loads it once


def start(cfg: Config, rank: int, held: lease.Lease | None) -> tuple[Accelerator, RunPlan]:
    """With the folder's lease held (rank 0): the folder, the mirror, the processes, what
    to resume and the batch layout; cfg.train.resume, data.batch_size and train.grad_accum
    are set to what the run uses."""
    cfg.train.resume = run_folder.prepare(cfg.train.run_dir, cfg.train.resume,
                                          cfg.train.overwrite, rank, held)
    if cfg.train.mirror:  # a mirror that cannot be written fails now, in one line
        storage.check_writable(cfg.train.mirror)
    accelerator = make_accelerator(cfg)
    distributed.check_shared_run_dir(cfg.train.run_dir, accelerator.process_index, accelerator.device)
    resume_from = distributed.from_rank0(lambda: resume.choose(cfg.train.run_dir, cfg.train.resume))
    layout = elastic.keep_global_batch(cfg, accelerator.num_processes, resume_from,
                                       deepspeed=distributed.launched_with_deepspeed())
    return accelerator, RunPlan(resume_from, layout)


def make_accelerator(cfg: Config) -> Accelerator:
    """The processes' Accelerator, refusing a launch whose ranks would not form one run or
    whose precision the trainer does not support; the device-dependent options checked."""
    group = dict(timeout=timedelta(seconds=cfg.train.collective_timeout))
    if distributed.launched_with_deepspeed() and not torch.cuda.is_available():
        # else accelerate reports world size 1 while the engines all-reduce across ranks
        group["backend"] = "gloo"
    mixed_precision, notice = precision.choose(precision.requested_precision(),
                                               cfg.train.allow_emulated_bf16)
    distributed.raise_nccl_errors()
    distributed.init_restarted_group(group["timeout"], group.get("backend"))
    accelerator = Accelerator(log_with=tracking.log_with(cfg.log.tracker), project_dir=cfg.train.run_dir,
                              mixed_precision=mixed_precision,
                              kwargs_handlers=[InitProcessGroupKwargs(**group)])
    if accelerator.is_main_process:
        log.info(precision.describe(accelerator.mixed_precision))
        if notice:
            log.info(notice)
    launched_world = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched_world:
        raise distributed.StartupError(
            f"accelerate sees {accelerator.num_processes} process(es) but the launcher started "
            f"WORLD_SIZE={launched_world}: the ranks would train independently. On CPU use "
            "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N (DDP), or "
            "an accelerate config with distributed_type: DEEPSPEED and no ACCELERATE_USE_CPU")
    if accelerator.mixed_precision not in ("no", "bf16"):
        raise ConfigError(f"mixed precision {accelerator.mixed_precision!r} is not supported: use "
                          "'no' or 'bf16' (fp16 would share one grad scaler between G and D)")
    validate_runtime(cfg, accelerator.device.type, accelerator.num_processes)
    host_memory.apply(cfg, accelerator.device.type)
    return accelerator


def environment(accelerator: Accelerator) -> dict:
    import accelerate
    return {"torch": torch.__version__, "accelerate": accelerate.__version__,
            "python": platform.python_version(), "world_size": accelerator.num_processes,
            "device": str(accelerator.device), "mixed_precision": accelerator.mixed_precision,
            "distributed_type": accelerator.distributed_type.value}
