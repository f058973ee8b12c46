"""The config's checks: the range each numeric option accepts (declared with its field in
pipeline/config.py as `opt(..., range="[0, 1)")`, tested here), the rules between fields,
the rules that depend on where the run happens, and the freeze that keeps the checked
config as it is. Each refusal is a ConfigError of one line naming the key and the value.

    Range.parse("[0, 1)")         an interval as written in mathematics (inf: no bound;
                                  NaN is in no range, inf only in one closed at inf)
    validate(cfg)                 every field's range, then the cross-field rules
    validate_runtime(cfg, device, world_size)   what needs the device and world size
    freeze(cfg)                   the config as the run uses it, read-only from then on:
                                  setting a field raises FrozenInstanceError (a bug, not a
                                  user error)

This module reads the config through its dataclass fields only and imports nothing of
pipeline.config (which re-exports validate, validate_runtime and freeze; its dataclasses
derive from Freezable).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from pipeline import realism, storage
from pipeline.data import augmentation
from pipeline.errors import ConfigError

_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])\s*$")


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)  # inf, -inf, 0.5


@dataclass(frozen=True)
class Range:
    """The values a numeric field accepts, between low and high, each bound in or out."""
    low: int | float
    high: int | float
    open_low: bool = False
    open_high: bool = False

    @classmethod
    def parse(cls, text: str) -> Range:
        """'[0, 1)', '(0, inf)', '[1, 8]'; a malformed one is a bug, raised at import."""
        match = _INTERVAL.match(text)
        low, high = (_number(match.group(2)), _number(match.group(3))) if match else (0, -1)
        if not low <= high:  # also NaN
            raise ValueError(f"not an interval like '[0, 1)': {text!r}")
        return cls(low, high, match.group(1) == "(", match.group(4) == ")")

    def __contains__(self, value: Any) -> bool:
        above = value > self.low if self.open_low else value >= self.low  # False for NaN
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def describe(self, is_float: bool) -> str:
        """`0 <= value < 1`; `value >= 1`; `a finite value > 0` (inf is out)."""
        open_low, low, high, open_high = self.open_low, self.low, self.high, self.open_high
        low_sign, high_sign = "<" if open_low else "<=", "<" if open_high else "<="
        if high == math.inf and open_high:
            if low == -math.inf:
                return "a finite value" if is_float else "any integer"
            lower = f"value {'>' if open_low else '>='} {low}"
            return f"a finite {lower}" if is_float else lower
        if low == -math.inf:
            return f"value {high_sign} {high}"
        return f"{low} {low_sign} value {high_sign} {high}"


class Freezable:
    """The base of the config's dataclasses: once freeze() has marked one, setting or
    deleting any of its attributes is a bug (FrozenInstanceError), never a user error."""

    def __setattr__(self, name: str, value: Any) -> None:
        self._refuse_when_frozen(name)
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        self._refuse_when_frozen(name)
        object.__delattr__(self, name)

    def _refuse_when_frozen(self, name: str) -> None:
        where = self.__dict__.get("_frozen_as")  # the section's name ("" for the whole)
        if where is not None:
            key = f"{where}.{name}" if where else name
            raise dataclasses.FrozenInstanceError(
                f"cannot change {key}: the config is frozen once start-up has decided it "
                "(pipeline.config.freeze); change it before freeze(), or work on a copy")


def freeze(cfg: Any) -> Any:
    """Make cfg (a pipeline.config.Config) read-only, every section and the whole; returns
    it. A deep copy (or a pickled copy, as loader workers get) stays frozen; a section made
    by dataclasses.replace is a new, mutable one."""
    for section in dataclasses.fields(cfg):
        object.__setattr__(getattr(cfg, section.name), "_frozen_as", section.name)
    object.__setattr__(cfg, "_frozen_as", "")
    return cfg


def check_ranges(cfg: Any) -> None:
    """Every numeric field within the range declared with it (metadata "range")."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            allowed, value = f.metadata.get("range"), getattr(values, f.name)
            if allowed is not None and value not in allowed:
                raise ConfigError(f"{section.name}.{f.name}={value} is out of range: expected "
                                  f"{allowed.describe(isinstance(value, float))}")


def validate(cfg: Any) -> Any:
    """A parsed config (a pipeline.config.Config) checked before anything uses it: each
    field's range, then the rules between fields that need no runtime information."""
    check_ranges(cfg)
    _validate_geometry(cfg.data, cfg.model)
    if cfg.data.preprocess in augmentation.CROPPING:  # else at start-up, from the manifest's sizes
        check_discriminator(cfg.model, min(crop_of(cfg.data)))
    _validate_hd(cfg)
    _validate_metrics(cfg)
    if cfg.train.mirror and not cfg.train.mirror.startswith("s3://"):
        raise ConfigError(f"train.mirror: {cfg.train.mirror!r} is not an s3:// prefix")
    for key in ("data.train", "data.val"):
        try:
            storage.check_url(getattr(cfg.data, key.split(".")[1]) or ".")
        except storage.StorageError as err:
            raise ConfigError(f"{key}: {err}") from None
    return cfg


def crop_of(data: Any) -> tuple[int, int]:
    """The crop (height, width): data.crop_height 0 means a square."""
    return data.crop_height or data.crop_size, data.crop_size


def _validate_geometry(data: Any, model: Any) -> None:
    """The crop: multiples of the generator's size multiple, inside resize_and_crop's
    square; device augmentation for the default geometry only."""
    factor = model.size_multiple
    for key, side in (("crop_size", data.crop_size), ("crop_height", data.crop_height)):
        if side % factor:
            raise ConfigError(f"data.{key}: {side} is not divisible by {factor} as "
                              f"model.generator={model.generator} needs")
    if data.preprocess == "resize_and_crop" and data.load_size < max(crop_of(data)):
        raise ConfigError(f"data.load_size: {data.load_size} is smaller than the crop "
                          f"{data.crop_size}x{crop_of(data)[0]} (data.crop_size x crop_height)")
    if data.preprocess == "scale_width_and_crop" and data.crop_size > data.load_size:
        raise ConfigError(f"data.crop_size: {data.crop_size} is wider than data.load_size "
                          f"{data.load_size}, the width scale_width_and_crop gives every image")
    if data.augment_on == "device" and data.preprocess != "resize_and_crop":
        raise ConfigError(f"data.augment_on=device batches one resize for all images, which "
                          f"data.preprocess={data.preprocess} does not have: use augment_on=worker")


def check_discriminator(m: Any, side: int, what: str = "data.crop_size") -> None:
    """A PatchGAN's strided convs must leave its coarsest scale >= 3 px on the smallest side
    the networks see (`side`): its last norm needs more than one pixel, its logits at least
    one. The start-up gate calls it again with the manifest's sizes for uncropped modes."""
    if m.discriminator == "patch" and side // 2 ** m.d_layers < 3:
        raise ConfigError(f"model.d_layers: a {m.d_layers}-layer PatchGAN needs images of at least "
                          f"{3 * 2 ** m.d_layers} px a side ({what}: {side}): lower d_layers")
    if m.discriminator == "multiscale":
        coarsest = -(-side // 2 ** (m.num_d - 1))  # each pooling rounds up
        if coarsest // 2 ** m.d_layers < 3:
            raise ConfigError(f"model.num_d: {m.num_d} scales of a {m.d_layers}-layer PatchGAN need "
                              f"images of at least {3 * 2 ** (m.d_layers + m.num_d - 1)} px a side "
                              f"({what}: {side}): lower num_d or d_layers")



def _validate_hd(cfg: Any) -> None:
    """The pix2pixHD options: each only where it means something."""
    if cfg.loss.lambda_feat and cfg.model.discriminator != "multiscale":
        raise ConfigError(f"loss.lambda_feat: feature matching compares a multiscale D's features; "
                          f"set model.discriminator=multiscale (now {cfg.model.discriminator})")
    if cfg.train.freeze_global_steps and cfg.model.generator != "local":
        raise ConfigError(f"train.freeze_global_steps: only a local generator has a global part "
                          f"to freeze (model.generator is {cfg.model.generator})")


def _validate_metrics(cfg: Any) -> None:
    """eval.metrics names known metrics; train.best_metric is one of them, with a val split."""
    try:
        names = realism.parse(cfg.eval.metrics)
    except realism.MetricsError as err:
        raise ConfigError(f"eval.metrics: {err}") from None
    best = cfg.train.best_metric
    if best and names is not None and best not in names:
        raise ConfigError(f"train.best_metric: {best} is not among eval.metrics ({cfg.eval.metrics}); "
                          f"add it there")
    if best and not cfg.data.val:
        raise ConfigError(f"train.best_metric: {best} needs a validation split: set data.val")


def validate_runtime(cfg: Any, device_type: str, world_size: int) -> None:
    """Checks that depend on where the run happens (called by the trainer at start-up)."""
    if cfg.model.norm == "syncbatch" and (device_type != "cuda" or world_size < 2):
        raise ConfigError(f"model.norm: syncbatch needs >= 2 CUDA processes, this run has "
                          f"{world_size} {device_type} process(es); use batch or instance")
