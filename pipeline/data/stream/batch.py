"""Samples -> batches: a worker collates its part of a micro-batch, the rank merges its
workers' parts in global sample order, to_device puts a batch on the device.

A batch is {"input", "target": Tensor, "key": list[str]} (+ "aug" when augment_on ==
"device": the per-sample crop and flip that to_device applies there, batched).
Augmentation is seeded by (seed, epoch, sample key): the same on any layout.
"""
from __future__ import annotations

import torch

from pipeline.config import DataConfig
from pipeline.data.augmentation import Geometry, augment, chw, resize_u8, to_unit_range
from pipeline.data.stream.plan import StreamLayout
from pipeline.data.stream.reader import Sample
from pipeline.errors import DataError


def collate(samples: list[Sample], layout: StreamLayout, epoch: int, device_augment: bool) -> dict:
    """Decoded samples -> a batch. Worker augmentation gives float [-1, 1] crops; device
    augmentation (resize_and_crop only) gives uint8 images (their own size when the batch
    agrees on one, else resized to load_size here) plus "aug" params for to_device."""
    geometry = layout.geometry
    keys = [sample.key for sample in samples]
    params = torch.tensor([geometry.params(layout.seed, epoch, s.key, s.pair[0].shape[:2])
                           for s in samples])
    halves = []
    for side in (0, 1):
        images = [_half(sample, side, geometry) for sample in samples]
        if not device_augment:
            crops = [augment(im, params[i:i + 1], geometry) for i, im in enumerate(images)]
            halves.append(to_unit_range(_stack(crops, keys)))
        elif len({im.shape for im in images}) == 1:
            halves.append(torch.cat(images))
        else:
            halves.append(torch.cat([resize_u8(im, geometry.load_size) for im in images]))
    batch = {"input": halves[0], "target": halves[1], "key": keys}
    if device_augment:
        batch["aug"] = params
    return batch


def _half(sample: Sample, side: int, geometry: Geometry) -> torch.Tensor:
    """One half as 1 x C x H x W. A target stored at another size than its input (a
    shard.py --on-size-mismatch skip would have kept it out) is resized to the input's
    first where the geometry depends on the stored size (every mode but resize_and_crop,
    which brings both halves to one square as the reference does)."""
    image = chw(sample.pair[side])
    size = sample.pair[0].shape[:2]
    if side == 1 and geometry.preprocess != "resize_and_crop" and tuple(image.shape[-2:]) != size:
        return resize_u8(image, size)
    return image


def _stack(crops: list[torch.Tensor], keys: list[str]) -> torch.Tensor:
    """One tensor of a batch's crops. Sizes that differ are refused at start-up from the
    manifest's sizes (pipeline/startup.py); a manifest that misstates them ends here."""
    sizes = {tuple(c.shape[-2:]) for c in crops}
    if len(sizes) > 1:
        raise DataError(f"a batch of {', '.join(keys[:4])} came out in sizes "
                        f"{sorted(sizes)}, which the manifest did not record: pack the "
                        "shards again with this version's shard.py, or set data.batch_size=1")
    return torch.cat(crops)


def merge(batches: list[dict], numbers: list[list[int]], cfg: DataConfig) -> dict:
    """The workers' parts of one micro-step (`numbers[i]`: the global sample numbers of
    `batches[i]`, none empty) -> this rank's batch, in global sample order."""
    flat = [j for part in numbers for j in part]
    order = sorted(range(len(flat)), key=flat.__getitem__)
    keys = [k for batch in batches for k in batch["key"]]
    merged = {"key": [keys[i] for i in order]}
    index = torch.tensor(order)
    for name in ("input", "target", "aug"):
        if name not in batches[0]:
            continue
        tensors = [batch[name] for batch in batches]
        if name != "aug" and len({t.shape[1:] for t in tensors}) > 1:
            if "aug" not in batches[0]:  # worker augmentation: sizes the manifest did not record
                _stack(tensors, merged["key"])  # raises, naming them
            tensors = [resize_u8(t, cfg.load_size) for t in tensors]  # device augmentation
        merged[name] = torch.cat(tensors)[index]
    return merged


def to_device(batch: dict, device, *, cfg: DataConfig, channels_last: bool,
              dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target) on `device` (non_blocking), in [-1, 1], as `dtype`. A batch made
    with augment_on == "device" (it has "aug") is resized, cropped and flipped here,
    batched, with the worker-computed (seed, epoch, key) params."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out = []
    for name in ("input", "target"):
        images = batch[name].to(device, non_blocking=True)
        if "aug" in batch:
            images = to_unit_range(augment(images, batch["aug"], Geometry.of(cfg)), dtype)
        out.append(images.to(dtype=dtype, memory_format=memory_format))
    return out[0], out[1]
