"""One typed config: the single source of every default.

Nested dataclasses (model, loss, data, optim, train, log, eval), loaded from YAML and overridden
on the command line with `--section.key=value`. Defaults are the reference pix2pix's
(junyanz/pytorch-CycleGAN-and-pix2pix) wherever it has one. Any mistake (unknown key,
wrong type, a choice that does not exist, a value out of its range, an inconsistent
combination) raises ConfigError with a one-line message naming the key, at start-up rather
than hours into a run. Every numeric field declares its range here, with the field
(`opt(..., range="[0, 1)")`); pipeline/config_checks.py tests ranges and the rules between
fields, and freezes the config. Fields with a registry (generators, discriminators, norms,
inits, GAN losses) take their choices from the module that defines them, never from a list
of their own here. YAML files and `--section.key=value` read values alike.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from pipeline import cli, losses, models, realism
from pipeline.config_checks import Freezable, Range, validate
from pipeline.config_checks import freeze as freeze  # re-exported: the trainer's, from here
from pipeline.config_checks import validate_runtime as validate_runtime
from pipeline.data import augmentation
from pipeline.data.format import MAX_IMAGE_PIXELS
from pipeline.errors import ConfigError


def opt(default: Any, help: str, choices: Any = None, range: str | None = None) -> Any:
    """A config field with its help text (shown by --help) and, for registry-backed
    fields, the registry (a tuple or dict of names) it must be one of; for numeric fields,
    the interval it must lie in ('[0, 1)', '(0, inf)': NaN and inf are never in one)."""
    metadata: dict[str, Any] = {"help": help}
    if range is not None:
        metadata["range"] = Range.parse(range)
    if choices is not None:
        metadata["choices"] = tuple(choices)
        if isinstance(choices, dict):  # name -> its help (a string, or an object's .help)
            described = [f"{name}: {getattr(v, 'help', v)}" for name, v in choices.items()]
            metadata["help"] = f"{help} ({'; '.join(described)})"
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig(Freezable):
    generator: str = opt("unet_256", "the generator network", choices=models.GENERATORS)
    # 1 or 3: the data pipeline decodes images as grey or RGB (pipeline/data/decode.py)
    in_channels: Literal[1, 3] = opt(3, "channels of the input image (after direction is applied)")
    out_channels: Literal[1, 3] = opt(3, "channels of the output image")
    g_filters: int = opt(64, "generator filters in the outermost layer (ngf)", range="[1, inf)")
    discriminator: str = opt("patch", "the discriminator network", choices=models.DISCRIMINATORS)
    d_layers: int = opt(3, "strided conv layers of the PatchGAN (3 = 70x70 receptive field)",
                        range="[0, inf)")  # the crop bounds it: config_checks
    d_filters: int = opt(64, "discriminator filters in the first layer (ndf)", range="[1, inf)")
    num_d: int = opt(2, "scales of the multiscale discriminator (pix2pixHD's num_D)", range="[1, inf)")
    norm: str = opt("batch", "normalisation layer; syncbatch needs >= 2 CUDA processes",
                    choices=models.NORMS)
    dropout: bool = opt(True, "dropout 0.5 in the inner decoder blocks (pix2pix's noise)")
    init: str = opt("normal", "weight initialisation", choices=models.INITS)
    init_gain: float = opt(0.02, "std of normal init / gain of xavier init", range="(0, inf)")
    activation_checkpointing: bool = opt(
        False, "recompute parts of G in backward instead of keeping their activations (the U-Net's "
               "outer blocks, the ResNet generators' residual blocks): less memory, more time")
    init_from: str = opt("", "start G from a trained one (a run, checkpoint, marker or export): "
                             "the same generator, or a global run's G as a local one's global "
                             "part (pix2pixHD's staged training); a fresh run only (empty: off)")

    @property
    def size_multiple(self) -> int:
        """Crops (and translated images) must be multiples of this."""
        return models.size_multiple(self.generator)


@dataclass
class LossConfig(Freezable):
    gan: str = opt("vanilla", "GAN loss", choices=losses.GAN_LOSSES)
    lambda_l1: float = opt(100.0, "weight of the L1 term in the generator loss (0: the GAN alone)",
                           range="[0, inf)")
    lambda_feat: float = opt(0.0, "weight of pix2pixHD's feature matching (10 there; 0: off); "
                                  "needs model.discriminator=multiscale", range="[0, inf)")
    lambda_vgg: float = opt(0.0, "weight of pix2pixHD's VGG19 perceptual loss (10 there; 0: off); "
                                 "its ImageNet weights from eval.weights_dir (never downloaded)",
                            range="[0, inf)")


@dataclass
class DataConfig(Freezable):
    train: str = opt("", "training shards: a folder or s3:// prefix with manifest.json, "
                         "a manifest.json URL, or a brace pattern like dir/train-{000000..000007}.tar")
    val: str = opt("", "validation shards, same forms as data.train (empty: no evaluation)")
    train_split: str = opt("train", "split name to read from the manifest for training")
    val_split: str = opt("val", "split name to read from the manifest for evaluation")
    direction: Literal["AtoB", "BtoA"] = opt(
        "AtoB", "AtoB translates the stored input into the target; BtoA the reverse")
    preprocess: str = opt("resize_and_crop", "how an image is brought to the networks' size "
                          "(docs/large-images.md)", choices=augmentation.PREPROCESS)
    load_size: int = opt(286, "the resize before cropping: the side (resize_and_crop), the width "
                              "(scale_width*), the short side (scale_shortside_and_crop)",
                         range="[1, inf)")
    crop_size: int = opt(256, "random crop width (the size the networks see; the height too unless "
                              "data.crop_height is set)", range="[1, inf)")
    crop_height: int = opt(0, "random crop height (0: data.crop_size, a square crop)", range="[0, inf)")
    flip: bool = opt(True, "random horizontal flip (the same for input and target)")
    batch_size: int = opt(1, "batch size per process; global batch = this x processes",
                          range="[1, inf)")
    num_workers: int = opt(2, "DataLoader worker processes per training process", range="[0, inf)")
    mode: Literal["exact", "resampled"] = opt(
        "exact", "exact: each sample at most once per epoch; resampled: shards drawn with "
                 "replacement, epochs sized from the manifest")
    shuffle_buffer: int = opt(64, "samples per shuffle block of each stream (a worker holds "
                                  "streams / (processes x workers) blocks)", range="[1, inf)")
    streams: int = opt(0, "virtual streams the epoch is cut into; the sample order depends on "
                          "(seed, epoch, streams) only, so a run resumes mid-epoch on any "
                          "processes x workers dividing it (0: the checkpoint's on resume, else "
                          "lcm(processes x workers, 12) with >= 1000 samples each, else one "
                          "stream per process x worker)", range="[0, inf)")
    record_keys: bool = opt(False, "write every step's sample keys to RUN/keys/rank{R}.jsonl "
                                   "(for checking the data order across resumes)")
    augment_on: Literal["worker", "device"] = opt(
        "worker", "where resize/crop/flip run: in the loader workers or batched on the device")
    max_image_pixels: int = opt(
        MAX_IMAGE_PIXELS, "skip images with more pixels than this (decompression-bomb guard; "
                          "shard.py --max-pixels has the same default)", range="[1, inf)")


@dataclass
class OptimConfig(Freezable):
    lr: float = opt(2e-4, "Adam learning rate for G and D (not scaled with the batch)",
                    range="(0, inf)")
    beta1: float = opt(0.5, "Adam beta1", range="[0, 1)")
    beta2: float = opt(0.999, "Adam beta2", range="[0, 1)")
    constant_steps: int = opt(0, "steps at the initial lr before the linear decay "
                                 "(0 with decay_steps 0: constant lr)", range="[0, inf)")
    decay_steps: int = opt(0, "steps of linear decay to zero after constant_steps", range="[0, inf)")
    grad_clip: float = opt(0.0, "clip gradient norm to this (0: no clipping, as pix2pix)",
                           range="[0, inf)")
    adam_impl: Literal["auto", "foreach", "fused"] = opt(
        "fused", "Adam kernel: fused (one kernel for all parameters; measured faster), foreach, "
                 "or auto (torch's choice: foreach on CUDA, a per-tensor loop on CPU)")


@dataclass
class TrainConfig(Freezable):
    run_dir: str = opt("runs/pix2pix", "run folder: config, logs, checkpoints, samples")
    max_steps: int = opt(1000, "optimisation steps to train (one D and one G update each)",
                         range="[1, inf)")
    # < 2**47: the trainer seeds torch with seed x 100003 + rank x 7919 + step, at most 2**64 - 1
    seed: int = opt(0, "seed for init, data order and augmentation", range=f"[0, {2 ** 47})")
    ckpt_every: int = opt(500, "save a checkpoint every N steps (and at the end)", range="[1, inf)")
    keep_last: int = opt(3, "checkpoints to keep (older ones removed after a new one commits)",
                         range="[1, inf)")
    resume: str = opt("", "'auto' (latest in run_dir), a checkpoint path, or empty (a fresh "
                          "run: refused when run_dir already holds one)")
    overwrite: bool = opt(False, "start fresh in a run_dir that holds a run, moving that run "
                                 "aside to RUN_DIR.old-TIME first (it is never deleted)")
    eval_every: int = opt(500, "evaluate on the val split every N steps (0: only at the end)",
                          range="[0, inf)")
    eval_at_start: bool = opt(True, "evaluate the untrained G at step 0 (the baseline the final "
                                    "line compares with); false: the first evaluation is at "
                                    "train.eval_every")
    ema_decay: float = opt(0.0, "exponential moving average of G's weights (e.g. 0.999; 0: off): "
                                "evaluation, sample grids and the export use it, training goes "
                                "on with the raw G (under ZeRO each rank averages its own "
                                "partition)", range="[0, 1)")
    freeze_global_steps: int = opt(0, "with model.generator=local: train only the enhancer for "
                                      "the first N steps, then the global part too (pix2pixHD's "
                                      "niter_fix_global)", range="[0, inf)")
    grad_accum: int = opt(1, "micro-batches of data.batch_size per update: K D micro-steps and "
                             "one D update, then K G micro-steps and one G update (global batch: "
                             "batch_size x K x processes; DeepSpeed: its own accumulation, fp32 sums)",
                          range="[1, inf)")
    allow_batch_change: bool = opt(False, "resume even when the global batch cannot be kept (a resume on "
                                          "another world size keeps it through grad_accum or batch_size "
                                          "where it can, and refuses otherwise)")
    best_metric: str = opt("", "mark the checkpoint with the best value of this validation metric "
                               "as checkpoints/best (saved when it improves, never rotated away; "
                               "empty: off)", choices=("", *realism.METRICS))
    mirror: str = opt("", "copy each committed checkpoint to this s3:// prefix (empty: off)")
    lease_seconds: float = opt(60.0, "the run folder's lease: a holder whose heartbeat is older "
                               "is taken as dead and its folder taken over (pipeline/lease.py); "
                               "renewed every lease_seconds / 4", range="[1, inf)")
    collective_timeout: int = opt(
        600, "seconds a rank waits in a collective before failing (a dead peer ends the run)",
        range="[1, 1000000000]")  # torch counts it in int64 microseconds: ~9e12 s overflow
    on_nonfinite: Literal["stop", "skip"] = opt(
        "stop", "a step with NaN/inf losses or gradients: 'stop' exits with code 1 before "
                "applying it (the last checkpoint stays the newest); 'skip' applies no update "
                "with non-finite gradients, logs the step and trains on (not under DeepSpeed)")
    channels_last: Literal["auto", True, False] = opt(
        "auto", "channels_last memory format for models and batches; auto: for bf16 on GPUs "
                "and on bf16 CPUs (AMX, AVX-512 BF16) from batch 2, where it measures faster; "
                "fp32 stays NCHW (DDP only: DeepSpeed needs contiguous weights)")
    compile: bool = opt(False, "torch.compile the models")
    keep_freed_memory: bool = opt(
        True, "CPU runs: glibc's malloc keeps freed large blocks instead of unmapping them "
              "(no page faults on every step's large tensors; 1.2x at batch 1 measured); "
              "false: glibc's defaults")
    allow_emulated_bf16: bool = opt(
        False, "keep bf16 (from the accelerate config) on a device that only emulates it, "
               "far slower than fp32; by default such a run trains in fp32 and says so")


# log.tracker's choices; pipeline/tracking.py knows what each needs and does
TRACKERS = ("tensorboard", "wandb", "mlflow", "none")


@dataclass
class LogConfig(Freezable):
    every: int = opt(20, "log scalars every N steps", range="[1, inf)")
    tracker: Literal[TRACKERS] = opt(
        "tensorboard", "experiment tracker, files under train.run_dir (wandb, mlflow: "
                       "pip install -e '.[tracking]')")
    sample_every: int = opt(500, "write a sample grid every N steps (0: only at the end)",
                            range="[0, inf)")
    samples: int = opt(4, "val pairs shown in the sample grid", range="[1, inf)")
    progress: bool = opt(True, "show progress on the main process: a live bar at a terminal, "
                               "else a line every 30 s (P2P_PROGRESS_INTERVAL seconds)")
    level: str = opt("", f"log level: one of {', '.join(cli.LOG_LEVELS)} (empty: "
                         f"${cli.LOG_LEVEL_ENV}, else info)")


@dataclass
class EvalConfig(Freezable):
    metrics: str = opt("auto", "validation metrics, a comma list of " + ", ".join(realism.METRICS)
                       + " (auto: l1, psnr, ssim plus every metric whose package and weights "
                       "are here; the trainer never downloads: see evaluate.py --help)")
    weights_dir: str = opt("", f"folder of the metrics' weights (and loss.lambda_vgg's VGG19), "
                               f"torch.hub's layout (empty: ${realism.WEIGHTS_ENV}, else torch's cache)")
    max_images: int = opt(200, "images each validation measures: a fixed subset of the val split "
                               "drawn with train.seed, the same on any number of processes "
                               "(p2p-evaluate --max-images N --seed SEED takes the same one); "
                               "0: the whole split", range="[0, inf)")


@dataclass
class Config(Freezable):
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass(frozen=True)
class BatchLayout:
    """The one owner of the global batch: samples per optimiser update, over all ranks."""
    batch_size: int  # data.batch_size, per process and micro-step
    grad_accum: int  # train.grad_accum, micro-steps per update
    world_size: int  # processes

    @classmethod
    def of(cls, cfg: Config, world_size: int) -> BatchLayout:
        return cls(cfg.data.batch_size, cfg.train.grad_accum, world_size)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def __str__(self) -> str:
        return f"{self.global_batch} ({self.batch_size} x {self.grad_accum} x {self.world_size} processes)"


# --------------------------------------------------------------------------- conversion

def _sections(cfg: Config) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _field_types(section: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(section))
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def _closest(name: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(key: str, value: Any, expected: Any, choices: tuple | None = None) -> Any:
    """Check `value` against the field's annotation (and registry); ints are accepted for
    floats, and so are the strings float() reads (YAML 1.1 reads 2e-4 and nan as strings, from
    a file and from the command line alike). Ranges are checked by validate()."""
    if choices is not None:
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}"
                              f"{_closest(str(value), list(choices))}")
        return value
    if typing.get_origin(expected) is Literal:
        choices = typing.get_args(expected)
        if not any(value == c and type(value) is type(c) for c in choices):  # 1 is not true
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(_choice_text, choices))}")
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass  # refused below, as the string the user wrote
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(f"{key}: expected {expected.__name__}, got {value!r}")
    return value


def set_value(cfg: Config, dotted_key: str, value: Any) -> None:
    """Set `section.key` on cfg, checking that the key exists and the type fits."""
    sections = _sections(cfg)
    section_name, _, key = dotted_key.partition(".")
    if section_name not in sections or not key:
        raise ConfigError(f"unknown config key '{dotted_key}'"
                          f"{_closest(section_name, list(sections))}: keys look like "
                          f"'section.key' with section one of {', '.join(sections)}")
    section = sections[section_name]
    types_by_key = _field_types(section)
    if key not in types_by_key:
        candidates = [f"{section_name}.{k}" for k in types_by_key]
        raise ConfigError(f"unknown config key '{dotted_key}'{_closest(dotted_key, candidates)}")
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(section)}[key]
    setattr(section, key, _coerce(dotted_key, value, types_by_key[key], choices))


def from_dict(tree: dict) -> Config:
    """Build a Config from a nested dict (as YAML gives), on top of the defaults."""
    cfg = Config()
    if not isinstance(tree, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(tree).__name__}")
    for section_name, values in tree.items():
        if values is None:  # `model:` with every key commented out: an empty section
            values = {}
        if not isinstance(values, dict):
            if section_name in _sections(cfg):
                raise ConfigError(f"config section '{section_name}' must be a mapping of its keys "
                                  f"({section_name}.KEY: VALUE), got {values!r}")
            set_value(cfg, str(section_name), values)  # raises: a bare key is not a section
        for key, value in values.items():
            set_value(cfg, f"{section_name}.{key}", value)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def load_yaml(path: str) -> Config:
    """A YAML config file on top of the defaults; any fault of the file is one line naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} "
                          f"at offset {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if tree is not None and not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections (model:, data:, ...), "
                          f"got a {type(tree).__name__}")
    return from_dict(tree or {})


# --------------------------------------------------------------------------- command line

def _type_name(annotation: Any, choices: tuple | None = None) -> str:
    if choices is not None:
        return "{" + ",".join(choices) + "}"
    if typing.get_origin(annotation) is Literal:
        return "{" + ",".join(map(_choice_text, typing.get_args(annotation))) + "}"
    return annotation.__name__


def _choice_text(choice: Any) -> str:
    """A Literal choice as a user types it: true, not True."""
    return str(choice).lower() if isinstance(choice, bool) else str(choice)


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser listing every config key with its type, default and help."""
    parser = cli.Parser(
        prog=prog, description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("--config", help="YAML config file; command-line keys override it")
    defaults = Config()
    for section_name, section in _sections(defaults).items():
        group = parser.add_argument_group(section_name)
        for f in dataclasses.fields(section):
            annotation = _field_types(section)[f.name]
            metavar = _type_name(annotation, f.metadata.get("choices"))
            allowed = f.metadata.get("range")
            text = f.metadata["help"] + (f" [{allowed.describe(annotation is float)}]" if allowed else "")
            group.add_argument(f"--{section_name}.{f.name}", metavar=metavar,
                               default=getattr(section, f.name), help=text,
                               dest=f"override.{section_name}.{f.name}")
    return parser


def parse_value(text: str) -> Any:
    """A command-line value as YAML reads it: 3 -> int, 1.5 -> float, true -> bool; 2e-4 is
    a string to YAML 1.1, made a float by the field's coercion, as in a file."""
    return yaml.safe_load(text) if text != "" else ""


def from_cli(argv: list[str] | None, prog: str = "train.py",
             description: str = "") -> tuple[Config, argparse.Namespace]:
    """YAML (--config) + `--section.key=value` overrides -> a validated Config.

    Only keys given explicitly on the command line override the file: argparse's own
    defaults (shown by --help) are never applied on top of YAML values.
    """
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(prog, description)
    args, unknown = parser.parse_known_args(argv)
    cfg = load_yaml(args.config) if args.config else Config()
    for token in unknown:  # argparse cannot suggest the closest key; set_value can
        if token.startswith("--"):
            set_value(cfg, token[2:].split("=")[0], None)
        raise ConfigError(f"unexpected command-line argument {token!r}")
    for dotted_key in _explicit_keys(argv):
        raw = getattr(args, f"override.{dotted_key}")
        section_name, key = dotted_key.split(".")
        expected = _field_types(_sections(cfg)[section_name])[key]
        # Strings stay verbatim (a run name "1e3" is not a number); others parse as YAML.
        set_value(cfg, dotted_key, raw if expected is str else parse_value(raw))
    return validate(cfg), args


def _explicit_keys(argv: list[str]) -> list[str]:
    """The `section.key` names given on the command line, as `--k=v` or `--k v`."""
    return [token[2:].split("=")[0] for token in argv
            if token.startswith("--") and "." in token.split("=")[0]]
