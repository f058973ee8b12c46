"""SSIM (Wang et al. 2004) per image: the validation's and p2p-evaluate's structure metric.

Written here rather than imported from torchmetrics because importing any part of
torchmetrics imports all of it (its text, audio and image packages, with torchvision,
torch._dynamo and transformers): 2-6 s added to the start of every trainer rank and every
p2p-evaluate on a 2-core machine, for one 2-D convolution. The conventions are the usual
ones and torchmetrics' (tests/unit/test_similarity.py holds them equal): an 11 x 11
Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, the image reflected at its borders
so that the SSIM map has the image's size, variances clamped at 0, the map averaged over
every pixel and channel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

WINDOW, SIGMA, K1, K2 = 11, 1.5, 0.01, 0.03


def gaussian_window(channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """channels x 1 x WINDOW x WINDOW: one normalised 2-D Gaussian per channel."""
    offsets = torch.arange(WINDOW, dtype=dtype, device=device) - (WINDOW - 1) / 2
    line = torch.exp(-(offsets / SIGMA) ** 2 / 2)
    line = (line / line.sum()).unsqueeze(0)
    return (line.T @ line).expand(channels, 1, WINDOW, WINDOW)


def ssim(images: torch.Tensor, references: torch.Tensor, data_range: float) -> torch.Tensor:
    """N: the mean SSIM of each image of an N x C x H x W batch against its reference."""
    channels, pad = images.shape[1], (WINDOW - 1) // 2
    window = gaussian_window(channels, images.dtype, images.device)
    x, y = (F.pad(t, (pad, pad, pad, pad), mode="reflect") for t in (images, references))
    moments = F.conv2d(torch.cat((x, y, x * x, y * y, x * y)), window, groups=channels)
    mu_x, mu_y, xx, yy, xy = moments.split(images.shape[0])
    var_x = (xx - mu_x ** 2).clamp_min(0)
    var_y = (yy - mu_y ** 2).clamp_min(0)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    structure = (2 * (xy - mu_x * mu_y) + c2) / (var_x + var_y + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1)
    return (luminance * structure).flatten(1).mean(1)
