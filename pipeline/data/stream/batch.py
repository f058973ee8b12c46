"""Samples -> batches: a worker collates its part of a micro-batch, the rank merges its
workers' parts in global sample order, to_device puts a batch on the device.

A batch is {"input", "target": Tensor, "key": list[str]} (+ "aug" when augment_on ==
"device": the per-sample crop and flip that to_device applies there, batched).
Augmentation is seeded by (seed, epoch, sample key): the same on any layout.
"""
from __future__ import annotations

import torch

from pipeline.config import DataConfig
from pipeline.data.augmentation import augment, augment_params, chw, resize_u8, to_unit_range
from pipeline.data.stream.plan import StreamLayout
from pipeline.data.stream.reader import Sample


def collate(samples: list[Sample], layout: StreamLayout, epoch: int, device_augment: bool) -> dict:
    """Decoded samples -> a batch. Worker augmentation gives float [-1, 1] crops; device
    augmentation gives uint8 images (their own size when the batch agrees on one, else
    resized to load_size here) plus "aug" params for to_device."""
    cfg = layout.cfg
    keys = [sample.key for sample in samples]
    params = torch.tensor([augment_params(layout.seed, epoch, k, cfg) for k in keys])
    halves = []
    for side in (0, 1):
        images = [chw(sample.pair[side]) for sample in samples]
        if not device_augment:
            crops = [augment(im, params[i:i + 1], cfg) for i, im in enumerate(images)]
            halves.append(to_unit_range(torch.cat(crops)))
        elif len({im.shape for im in images}) == 1:
            halves.append(torch.cat(images))
        else:
            halves.append(torch.cat([resize_u8(im, cfg.load_size) for im in images]))
    batch = {"input": halves[0], "target": halves[1], "key": keys}
    if device_augment:
        batch["aug"] = params
    return batch


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
        if name != "aug" and len({t.shape[1:] for t in tensors}) > 1:  # device augmentation, mixed sizes
            tensors = [resize_u8(t, cfg.load_size) for t in tensors]
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
            images = to_unit_range(augment(images, batch["aug"], cfg), dtype)
        out.append(images.to(dtype=dtype, memory_format=memory_format))
    return out[0], out[1]
