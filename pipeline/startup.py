"""The start-up gate: what a training run must pass before it trains, in one place and in
a fixed order, and the plan it then follows. Adding a refusal has one obvious place: here.

    check_before_launch(cfg) -> Launch     needs no process group and writes nothing:
        1. log.tracker is installed (accelerate would train untracked)
        2. what this launch's engines cannot do (DeepSpeed: deepspeed_engines.check_supported,
           on the launch's DeepSpeed JSON)
        3. the precision the launcher asks for (fp16 is refused)
        4. the inputs: the shards exist and hold their splits; model.init_from holds a
           generator; pre-resized shards match data.load_size; the val metrics are here;
           loss.lambda_vgg's VGG19 is here
    hold_run_folder(cfg)                   rank 0 holds the run folder's lease meanwhile
    start(cfg, launch, held) -> (Accelerator, RunPlan)   with the lease held:
        5. the folder: a run there is refused or set aside (run_folder.prepare)
        6. the mirror can be written
        7. the processes: the world size as launched, config.validate_runtime (device and
           world size), host memory
        8. the run folder is one that every rank shares
        9. the checkpoint to resume (resume.choose: the newest intact one) and what it must
           match: the architecture and the engine kind (another precision is warned about)
       10. the batch layout, kept across world sizes (elastic.keep_global_batch)

The config's own checks (types, ranges, cross-field rules) run earlier, when it is parsed
(pipeline/config.py). The RunPlan holds what the gate decided, for the trainer to read
instead of deciding it again: the checkpoint, the batch layout, precision and its source,
the engine kind, the metric names and the run folder's paths. `cfg` leaves start() as the
run uses it (train.resume, data.batch_size, train.grad_accum as decided).
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from pipeline import (
    checkpoint,
    data,
    deepspeed_engines,
    distributed,
    elastic,
    engines,
    host_memory,
    lease,
    precision,
    realism,
    resume,
    run_folder,
    run_layout,
    storage,
    tracking,
    weights,
)
from pipeline.config import BatchLayout, Config, ConfigError, freeze, to_dict, validate_runtime
from pipeline.errors import CheckpointMismatch
from pipeline.validation import metric_names

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Launch:
    """What check_before_launch decided, for start() to complete into the RunPlan."""
    engine: str  # "ddp" or "deepspeed" (engines.engine_kind)
    precision: precision.Precision
    metrics: tuple[str, ...]  # the validation metrics (empty: no val split)


@dataclass(frozen=True)
class RunPaths:
    """The run folder's files this process writes (run_layout's names)."""
    run_dir: str
    config: str  # config.yaml
    train_log: str  # train_log.jsonl
    metrics: str  # metrics.jsonl
    checkpoints: str  # checkpoints/, with its latest and best markers
    keys: str  # this rank's sample-key record (data.record_keys)

    @classmethod
    def of(cls, run_dir: str, rank: int) -> RunPaths:
        return cls(run_dir, run_layout.config(run_dir), run_layout.train_log(run_dir),
                   run_layout.metrics(run_dir), run_layout.checkpoints(run_dir),
                   run_layout.keys(run_dir, rank))


@dataclass(frozen=True)
class RunPlan:
    """What start-up decided, for the trainer to follow."""
    resume: str  # train.resume as the run uses it ("auto" after an elastic restart)
    resume_from: str | None  # the checkpoint to load (None: a fresh start)
    layout: BatchLayout  # batch, accumulation, world size: the global batch
    precision: precision.Precision  # what the run computes in, and why
    engine: str  # "ddp" or "deepspeed"
    metrics: tuple[str, ...]  # the validation metrics (empty: no val split)
    paths: RunPaths


def check_before_launch(cfg: Config) -> Launch:
    """The refusals that need no other process, in one line each (ConfigError and kin)."""
    tracking.require_installed(cfg.log.tracker)
    engine = engines.engine_kind()
    if engine == "deepspeed":
        deepspeed_engines.check_supported(cfg, deepspeed_engines.launch_config())
    chosen = precision.for_training(cfg.train.allow_emulated_bf16)
    if chosen.used not in ("no", "bf16"):
        raise ConfigError(f"mixed precision {chosen.used!r} is not supported: use 'no' or 'bf16' "
                          "(fp16 would share one grad scaler between G and D)")
    return Launch(engine, chosen, check_inputs(cfg))


def check_inputs(cfg: Config) -> tuple[str, ...]:
    """The shards named by data.train (and data.val) exist and hold their splits; what
    this launch cannot do is refused. Returns the validation metrics' names."""
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
    names: tuple[str, ...] = ()
    if cfg.data.val:
        data.list_shards(cfg.data.val, cfg.data.val_split, key="data.val")
        names = tuple(metric_names(cfg))
    if cfg.loss.lambda_vgg and (why := realism.missing_vgg19(realism.weights_dir(cfg.eval.weights_dir))):
        raise realism.MetricsError(why)  # before any process starts; the trainer loads it once
    return names


def launch_rank() -> int:
    """This process's rank as the launcher numbered it (before any process group)."""
    return int(os.environ.get("RANK", "0"))


@contextlib.contextmanager
def hold_run_folder(cfg: Config) -> Iterator[lease.Lease | None]:
    """Rank 0 holds the run folder's lease from before anything is written into it until
    the run ends (pipeline/lease.py); the other ranks hold nothing (None)."""
    held = lease.Lease(cfg.train.run_dir, cfg.train.lease_seconds) if launch_rank() == 0 else None
    if held:
        held.acquire()
    try:
        yield held
    finally:
        if held:
            held.release()


def start(cfg: Config, launch: Launch, held: lease.Lease | None) -> tuple[Accelerator, RunPlan]:
    """With the folder's lease held (rank 0): the folder, the mirror, the processes, what
    to resume and the batch layout; cfg.train.resume, data.batch_size and train.grad_accum
    are set to what the run uses, then the config is frozen."""
    cfg.train.resume = run_folder.prepare(cfg.train.run_dir, cfg.train.resume,
                                          cfg.train.overwrite, launch_rank(), held)
    if cfg.train.mirror:  # a mirror that cannot be written fails now, in one line
        storage.check_writable(cfg.train.mirror)
    accelerator = make_accelerator(cfg, launch)
    distributed.check_shared_run_dir(cfg.train.run_dir, accelerator.process_index, accelerator.device)
    resume_from = distributed.from_rank0(lambda: resume.choose(cfg.train.run_dir, cfg.train.resume))
    saved = check_resume(cfg, resume_from, launch, accelerator.is_main_process)
    layout = elastic.keep_global_batch(cfg, accelerator.num_processes, resume_from,
                                       deepspeed=launch.engine == "deepspeed", trainer=saved)
    paths = RunPaths.of(cfg.train.run_dir, accelerator.process_index)
    freeze(cfg)  # the config as the run uses it: nothing after start-up changes it
    return accelerator, RunPlan(cfg.train.resume, resume_from, layout, launch.precision,
                                launch.engine, launch.metrics, paths)


def check_resume(cfg: Config, path: str | None, launch: Launch,
                 main_process: bool) -> checkpoint.TrainerInfo | None:
    """What a resume from `path` must match, refused in one line before anything is built:
    the architecture and the engine kind. Another precision is only warned about."""
    if path is None:
        return None
    saved = checkpoint.read_trainer(path)
    checkpoint.check_architecture(saved.config["model"], to_dict(cfg)["model"], path)
    by_deepspeed = deepspeed_engines.saved_by_deepspeed(path)
    if by_deepspeed != (launch.engine == "deepspeed"):
        raise CheckpointMismatch(
            f"train.resume: {path} is a DeepSpeed checkpoint: resume it with DeepSpeed (an "
            "accelerate config with distributed_type: DEEPSPEED)" if by_deepspeed else
            f"train.resume: {path}: no DeepSpeed checkpoint (saved without DeepSpeed? resume it "
            "without DeepSpeed)")
    used = launch.precision.used
    if saved.precision not in (None, used) and main_process:
        names = {"no": "fp32", "bf16": "bf16"}
        log.warning(f"{path} was trained in {names.get(saved.precision, saved.precision)}, this "
                    f"run continues in {names.get(used)}: the losses will not continue exactly "
                    "as they would have")
    return saved


def make_accelerator(cfg: Config, launch: Launch) -> Accelerator:
    """The processes' Accelerator in the launch's precision, refusing a launch whose ranks
    would not form one run; the device-dependent options checked."""
    group = dict(timeout=timedelta(seconds=cfg.train.collective_timeout))
    if launch.engine == "deepspeed" and not torch.cuda.is_available():
        # else accelerate reports world size 1 while the engines all-reduce across ranks
        group["backend"] = "gloo"
    distributed.raise_nccl_errors()
    distributed.init_restarted_group(group["timeout"], group.get("backend"))
    accelerator = Accelerator(log_with=tracking.log_with(cfg.log.tracker), project_dir=cfg.train.run_dir,
                              mixed_precision=launch.precision.used,
                              kwargs_handlers=[InitProcessGroupKwargs(**group)])
    if accelerator.is_main_process:
        log.info(launch.precision.describe())
        if launch.precision.notice:
            log.info(launch.precision.notice)
    launched_world = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched_world:
        raise distributed.StartupError(
            f"accelerate sees {accelerator.num_processes} process(es) but the launcher started "
            f"WORLD_SIZE={launched_world}: the ranks would train independently. On CPU use "
            "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N (DDP), or "
            "an accelerate config with distributed_type: DEEPSPEED and no ACCELERATE_USE_CPU")
    validate_runtime(cfg, accelerator.device.type, accelerator.num_processes)
    host_memory.apply(cfg, accelerator.device.type)
    return accelerator


def environment(accelerator: Accelerator) -> dict:
    import accelerate
    return {"torch": torch.__version__, "accelerate": accelerate.__version__,
            "python": platform.python_version(), "world_size": accelerator.num_processes,
            "device": str(accelerator.device), "mixed_precision": accelerator.mixed_precision,
            "distributed_type": accelerator.distributed_type.value}
