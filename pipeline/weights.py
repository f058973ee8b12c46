"""The generator export format, and weight files loaded with their shapes checked.

An export folder (also inside every checkpoint) holds:
    generator.safetensors   the generator's fp32 state dict (weights and buffers)
    generator.json          {"format": EXPORT_FORMAT, "version": 1, "step", "model": the
                            ModelConfig fields, "data": TrainedOn's fields: direction,
                            the geometry (preprocess, load_size, crop_size,
                            crop_height, flip), the source layout}
checkpoint.py and export.py both write it through `write_generator`; `read_generator`
rebuilds the generator from it without the trainer, and hands out the metadata as a
`GeneratorInfo` (typed: nothing else parses generator.json). Nothing else names these files.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipeline import storage
from pipeline.config import ModelConfig
from pipeline.data.augmentation import PREPROCESS
from pipeline.errors import CheckpointMismatch
from pipeline.models import build_generator

EXPORT_FORMAT = "pix2pix-at-scale/generator"
WEIGHTS, META = "generator.safetensors", "generator.json"


@dataclass(frozen=True)
class TrainedOn:
    """generator.json's "data": what the generator learned on (None: not recorded, in a
    file this project's trainer did not write, or an older one). The geometry's fields are
    DataConfig's (pipeline/data/augmentation.py: Geometry.of reads them); `layout` is how
    the training pairs were stored at the source ("pair": A|B images, "separate": input
    and target files, "mixed") and `size` the training halves' most common stored size
    ("WxH"), from the manifest: p2p-translate's --split-pair auto takes an input for an
    A|B pair when the run's were and it has a pair's aspect."""
    direction: str = "AtoB"
    load_size: int | None = None
    crop_size: int | None = None
    preprocess: str | None = None
    crop_height: int | None = None
    flip: bool | None = None
    layout: str | None = None
    size: str | None = None  # "WxH": the training halves' most common stored size

    GEOMETRY = ("direction", "preprocess", "load_size", "crop_size", "crop_height", "flip")


@dataclass(frozen=True)
class GeneratorInfo:
    """generator.json, typed: the one reader of the export format's metadata; translate,
    evaluate, export and the trainer's init_from read it through this."""
    step: int | None
    model: ModelConfig
    data: TrainedOn

    @classmethod
    def of_run(cls, config: dict, step: int, layout: str | None = None,
               size: str | None = None) -> GeneratorInfo:
        """What a run's config (to_dict) says about its generator at `step`; `layout` and
        `size`: the training data's source layout and most common half size (TrainedOn)."""
        data = {k: config["data"][k] for k in TrainedOn.GEOMETRY if k in config["data"]}
        return cls(step, ModelConfig(**config["model"]), TrainedOn(**data, layout=layout, size=size))

    @classmethod
    def from_json(cls, meta: dict, where: str) -> GeneratorInfo:
        """Refuses (CheckpointMismatch, one line naming `where`) what this code cannot build."""
        if meta.get("format") != EXPORT_FORMAT or meta.get("version") != 1:
            raise CheckpointMismatch(f"{where} is not a {EXPORT_FORMAT} version 1 export (format "
                                     f"{meta.get('format')!r}, version {meta.get('version')!r})")
        try:
            model = ModelConfig(**meta["model"])
            data = TrainedOn(**meta.get("data", {}))
        except (TypeError, KeyError) as err:
            raise CheckpointMismatch(f"{where}: a model config this code cannot build: {err}") from None
        if data.preprocess is not None and data.preprocess not in PREPROCESS:
            raise CheckpointMismatch(f"{where}: data.preprocess {data.preprocess!r} is not one this "
                                     f"version knows ({', '.join(PREPROCESS)}): use the version "
                                     "that trained it")
        return cls(meta.get("step"), model, data)

    def to_json(self) -> dict:
        data = {k: v for k, v in dataclasses.asdict(self.data).items() if v is not None}
        return {"format": EXPORT_FORMAT, "version": 1, "step": self.step,
                "model": dataclasses.asdict(self.model), "data": data}


def contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous() for k, v in state.items()}


def write_generator(folder: str, state: dict[str, torch.Tensor], info: GeneratorInfo) -> None:
    """The export: weights first, then the metadata that makes the folder loadable."""
    storage.write_bytes(storage.join(folder, WEIGHTS), save_safetensors(contiguous(state)))
    storage.write_bytes(storage.join(folder, META),
                        json.dumps(info.to_json(), indent=1, sort_keys=True).encode())


def has_generator(folder: str) -> bool:
    return storage.exists(storage.join(folder, META))


def read_generator(folder: str) -> tuple[torch.nn.Module, GeneratorInfo]:
    """(generator in eval mode, its generator.json) from an export folder, local or s3://.
    Anything that is not this project's export fails with a one-line CheckpointMismatch."""
    meta_url = storage.join(folder, META)
    if not storage.exists(meta_url):
        raise CheckpointMismatch(f"{folder}: no {META} (give a checkpoint step_N folder, "
                                 "a run folder or an export folder)")
    info = GeneratorInfo.from_json(json.loads(storage.read_bytes(meta_url)), meta_url)
    # checkpointing only matters in backward; inference and export want the plain graph
    generator = build_generator(dataclasses.replace(info.model, activation_checkpointing=False))
    load_weights(generator, storage.join(folder, WEIGHTS))
    return generator.eval(), info


def load_weights(module: torch.nn.Module, path: str) -> None:
    """A safetensors file with exactly this module's tensors and shapes into it; anything
    else fails in one line naming the first difference (load_state_dict would list them all)."""
    try:
        state = load_safetensors(storage.read_bytes(path))
    except SafetensorError as err:
        raise CheckpointMismatch(f"{path} is not a safetensors weights file ({err})") from None
    differences = _differences(module.state_dict(), state)
    if differences:
        raise CheckpointMismatch(f"{path} does not fit this model (another architecture or "
                                 f"config?): {differences}")
    module.load_state_dict(state)


def _differences(expected: dict, found: dict) -> str:
    """'' when `found` has exactly the tensor names and shapes of `expected`, else the count
    and first name of each kind of difference, on one line."""
    kinds = {"tensors of another shape": [k for k in expected if k in found
                                          and found[k].shape != expected[k].shape],
             "missing": [k for k in expected if k not in found],
             "unexpected": [k for k in found if k not in expected]}
    shapes = lambda k: (f" is {list(found[k].shape)} in the file, {list(expected[k].shape)} "
                        "here") if k in found and k in expected else ""
    return "; ".join(f"{len(keys)} {kind} (first: {keys[0]}{shapes(keys[0])})"
                     for kind, keys in kinds.items() if keys)
