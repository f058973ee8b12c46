"""Paired augmentation: resize to load_size, the same crop and flip for both halves.

All randomness comes from seeds, never from worker RNG state: a sample's crop and flip
are a function of (seed, epoch, sample key), so a sample is augmented identically
whatever the worker or process count, and after a resume. torch's uint8 channels-last
bicubic resize is ~4x faster than PIL's on CPU (benchmarks/bench_data.py), so both the
worker and the device path use it.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F


def derive_seed(*parts) -> int:
    """A 64-bit seed from any values; stable across processes (unlike hash())."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def augment_params(seed: int, epoch: int, key: str, cfg) -> tuple[int, int, int]:
    """(top, left, flip) of one sample, from (seed, epoch, key) only."""
    rng = np.random.default_rng(derive_seed(seed, epoch, key, "augment"))
    top, left = rng.integers(0, cfg.load_size - cfg.crop_size + 1, size=2)
    flip = int(cfg.flip and rng.random() < 0.5)
    return int(top), int(left), flip


def resize_u8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic (antialiased) resize of uint8 Bx C x H x W to size x size, uint8 out.
    On CPU torch's uint8 channels-last kernel is ~4x faster than PIL's; elsewhere it
    runs in float and rounds the same way."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    if images.device.type == "cpu":
        return F.interpolate(images.contiguous(memory_format=torch.channels_last),
                             size=(size, size), mode="bicubic", antialias=True)
    return resize_u8_via_float(images, size)


def resize_u8_via_float(images: torch.Tensor, size: int) -> torch.Tensor:
    """The same resize for devices without a uint8 kernel (CUDA): float, round, clamp."""
    resized = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def augment(images: torch.Tensor, params: torch.Tensor, cfg) -> torch.Tensor:
    """uint8 B x C x H x W -> uint8 B x C x crop x crop: resize to load_size, then each
    sample's crop and flip from `params` (B x 3: top, left, flip). Called with the same
    params for input and target, so the pair stays aligned."""
    resized = resize_u8(images, cfg.load_size)
    size = cfg.crop_size
    crops = [resized[i, :, top:top + size, left:left + size]
             for i, (top, left, _) in enumerate(params.tolist())]
    return torch.stack([crop.flip(-1) if flip else crop
                        for crop, (_, _, flip) in zip(crops, params.tolist())])


def to_unit_range(images: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] (the reference's Normalize(0.5, 0.5))."""
    return images.to(dtype).div_(127.5).sub_(1.0)


def chw(pixels: np.ndarray) -> torch.Tensor:
    """HxWxC numpy -> 1 x C x H x W tensor in channels-last memory (copies only the
    non-contiguous halves of a pair image)."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None]

