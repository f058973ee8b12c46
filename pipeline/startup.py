"""The start-up gate: what a training run must pass before it trains, in one place and in
a fixed order, and the plan it then follows. Adding a refusal has one obvious place: here.

    check_before_launch(cfg) -> Launch     needs no process group and writes nothing:
        1. log.tracker is installed (accelerate would train untracked)
        2. what this launch's engines cannot do (DeepSpeed: deepspeed_engines.check_supported,
           on the launch's DeepSpeed JSON)
        3. the precision the launcher asks for (fp16 is refused)
        4. the inputs: the shards exist and hold their splits; model.init_from holds a
           generator; the val metrics are here; loss.lambda_vgg's VGG19 is here
        5. the geometry (data.preprocess) against the train split's recorded image sizes:
           pre-resized shards match it, images at least the crop, sizes a batch can hold
           together, the discriminator on the smallest side (check_geometry)
    hold_run_folder(cfg)                   rank 0 holds the run folder's lease meanwhile
    start(cfg, launch, held) -> (Accelerator, RunPlan)   with the lease held:
        6. the folder: a run there is refused or set aside (run_folder.prepare)
        7. the mirror can be written
        8. the processes: the world size as launched, config.validate_runtime (device and
           world size), host memory
        9. the run folder is one that every rank shares
       10. the checkpoint to resume (resume.choose: the newest intact one) and what it must
           match: the architecture and the engine kind (another precision is warned about)
       11. the batch layout, kept across world sizes (elastic.keep_global_batch), and the
           image sizes a batch of that size can hold (check_batchable again)

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
from pipeline.config_checks import check_discriminator
from pipeline.data.augmentation import KEEPS_ASPECT, Size
from pipeline.data.format import SizeCount, size_name
from pipeline.errors import CheckpointMismatch
from pipeline.validation import metric_names

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainImages:
    """What the train split's manifest says of its images, for the geometry checks."""
    sizes: tuple[tuple[Size, SizeCount], ...] | None  # ((h, w), count), most common first
    layout: str | None  # "pair", "separate", "mixed"; None: not recorded

    @property
    def common_size(self) -> str | None:
        """The most common stored half size, "WxH" (None: not recorded)."""
        return size_name(*self.sizes[0][0]) if self.sizes else None


@dataclass(frozen=True)
class Launch:
    """What check_before_launch decided, for start() to complete into the RunPlan."""
    engine: str  # "ddp" or "deepspeed" (engines.engine_kind)
    precision: precision.Precision
    metrics: tuple[str, ...]  # the validation metrics (empty: no val split)
    images: TrainImages = TrainImages(None, None)


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
    data_layout: str | None = None  # the training pairs' source layout (generator.json's)
    data_size: str | None = None  # their most common stored half size, "WxH" (generator.json's)


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
    metrics = check_inputs(cfg)
    images = check_geometry(cfg)
    return Launch(engine, chosen, metrics, images)


def check_inputs(cfg: Config) -> tuple[str, ...]:
    """The shards named by data.train (and data.val) exist and hold their splits; what
    this launch cannot do is refused. Returns the validation metrics' names."""
    data.list_shards(cfg.data.train, cfg.data.train_split, key="data.train")
    source = cfg.model.init_from
    if source and not weights.has_generator(checkpoint.generator_folder(source)):
        raise ConfigError(f"model.init_from: {source} holds no generator (give a run folder, a "
                          "checkpoint step_N folder, a marker such as RUN/checkpoints/best, or an export)")
    names: tuple[str, ...] = ()
    if cfg.data.val:
        data.list_shards(cfg.data.val, cfg.data.val_split, key="data.val")
        names = tuple(metric_names(cfg))
    if cfg.loss.lambda_vgg and (why := realism.missing_vgg19(realism.weights_dir(cfg.eval.weights_dir))):
        raise realism.MetricsError(why)  # before any process starts; the trainer loads it once
    return names


def check_geometry(cfg: Config) -> TrainImages:
    """data.preprocess against the train split's images, as its manifest records them:
    pre-resized shards match the geometry; every image is at least the crop; sizes that
    cannot be batched together are refused (check_batchable); the discriminator fits the
    smallest side of an uncropped mode. Nothing here decodes an image."""
    manifest = data.manifest_of(cfg.data.train)
    split = manifest.splits.get(cfg.data.train_split) if manifest else None
    geometry = data.Geometry.of(cfg.data, cfg.model.size_multiple)
    if manifest:
        check_packed(cfg, manifest.options)
    images = TrainImages(tuple(split.size_list()) if split and split.sizes is not None else None,
                         _layout(split.layouts if split else None))
    if geometry.preprocess == "resize_and_crop":
        return images  # every image becomes load_size x load_size: nothing to check per size
    if images.sizes is None:
        why = "has no manifest.json beside its shards" if manifest is None else \
            "does not record (packed by an older shard.py)"
        raise ConfigError(f"data.preprocess={geometry.preprocess} needs the images' sizes, which "
                          f"{cfg.data.train} {why}: pack the images again with this version's "
                          "shard.py into a new folder, or use data.preprocess=resize_and_crop")
    small = [(size, n) for size, n in images.sizes
             if geometry.crops and _smaller(geometry.resize_target(size), geometry.crop)]
    if small:
        (h, w), count = small[0]
        rh, rw = geometry.resize_target((h, w))
        raise ConfigError(f"data.preprocess={geometry.preprocess}: {sum(n.samples for _, n in small)} "
                          f"training images are smaller than the crop {geometry.crop[1]}x"
                          f"{geometry.crop[0]} (e.g. {count.example}: {w}x{h}, resized to {rw}x{rh}): "
                          "lower data.crop_size / data.crop_height, or " +
                          ("raise data.load_size" if geometry.preprocess in KEEPS_ASPECT else
                           "choose a mode that scales them up (scale_shortside_and_crop)"))
    check_batchable(cfg, images)
    if not geometry.crops:
        side = min(min(geometry.train_size(size)) for size, _ in images.sizes)
        check_discriminator(cfg.model, side, f"the smallest side data.preprocess={geometry.preprocess} gives")
    return images


def check_batchable(cfg: Config, images: TrainImages) -> None:
    """With data.batch_size > 1 every training image must come out at one size (called
    again once the batch layout is final: an elastic resume may raise the batch)."""
    if images.sizes is None or cfg.data.batch_size == 1:
        return
    geometry = data.Geometry.of(cfg.data, cfg.model.size_multiple)
    out: dict[Size, list[SizeCount]] = {}
    for size, count in images.sizes:
        out.setdefault(geometry.train_size(size), []).append(count)
    if len(out) > 1:
        (a, a_counts), (b, b_counts) = list(out.items())[:2]
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size}, but data.preprocess={geometry.preprocess} gives "
            f"the training images {len(out)} sizes (e.g. {a[1]}x{a[0]} for {a_counts[0].example}, "
            f"{b[1]}x{b[0]} for {b_counts[0].example}): pre-resize them (shard.py --load-size N "
            "--preprocess MODE), use a crop mode (scale_width_and_crop), or data.batch_size=1")


def check_packed(cfg: Config, options: dict) -> None:
    """Shards pre-resized by shard.py --load-size N [--preprocess MODE] are used with the
    same resize (a scale_width resize serves scale_width_and_crop as well)."""
    packed = int(options.get("load_size") or 0)
    if not packed:
        return
    mode = options.get("preprocess", "resize_and_crop")
    same = {"scale_width_and_crop": "scale_width"}
    if packed != cfg.data.load_size or same.get(mode, mode) != same.get(cfg.data.preprocess,
                                                                         cfg.data.preprocess):
        what = f"to {packed} x {packed} (shard.py --load-size {packed})" if mode == "resize_and_crop" \
            else f"by shard.py --load-size {packed} --preprocess {mode}"
        fix = f"--data.load_size={packed}" + \
            (f" --data.preprocess={mode}" if mode != cfg.data.preprocess else "")
        raise ConfigError(f"data.load_size={cfg.data.load_size} (data.preprocess={cfg.data.preprocess}), "
                          f"but {cfg.data.train} holds pairs already resized {what}: pass {fix}, "
                          "or use shards of the original images")


def _smaller(size: Size, crop: Size) -> bool:
    return size[0] < crop[0] or size[1] < crop[1]


def _layout(layouts: dict[str, int] | None) -> str | None:
    """"pair" or "separate" when every training pair was so at the source, else "mixed"."""
    if not layouts:
        return None
    present = [name for name, n in layouts.items() if n]
    return present[0] if len(present) == 1 else "mixed"


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
    check_batchable(cfg, launch.images)  # the batch as decided
    paths = RunPaths.of(cfg.train.run_dir, accelerator.process_index)
    freeze(cfg)  # the config as the run uses it: nothing after start-up changes it
    return accelerator, RunPlan(cfg.train.resume, resume_from, layout, launch.precision,
                                launch.engine, launch.metrics, paths, launch.images.layout,
                                launch.images.common_size)


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
