"""Validation metrics and sample grids.

The metrics follow the reference's test protocol: L1 on the [-1, 1] scale, PSNR on
uint8 images (converted as the reference does, by truncation), averaged per image, and
SSIM; G runs as the caller leaves it (the reference keeps train mode: dropout on and
batch statistics). Sums are reduced across ranks by a function the caller passes, so
ranks may hold different numbers of images.
"""
from __future__ import annotations

import contextlib
import io
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image
from torchmetrics.functional.image import structural_similarity_index_measure as ssim

from pipeline import storage


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8, truncating like the reference's tensor2im."""
    return ((images.float().clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8)


def per_image_metrics(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """N x 3: L1, PSNR (dB, capped at 100), SSIM for each image of a batch."""
    output, target = output.float(), target.float()
    l1 = (output - target).abs().flatten(1).mean(1)
    out8, tgt8 = to_uint8(output).float(), to_uint8(target).float()
    mse = (out8 - tgt8).square().flatten(1).mean(1)
    psnr = (10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))).clamp_max(100.0)
    structure = ssim(out8, tgt8, data_range=255.0, reduction="none")
    return torch.stack([l1, psnr, structure], 1)


@contextlib.contextmanager
def untouched_state(model: torch.nn.Module, device: torch.device):
    """Run train-mode inference without disturbing training: BatchNorm running stats
    and the global RNG (dropout) are as they were afterwards, so evaluating never
    changes the losses of the steps that follow."""
    buffers = [b.clone() for b in model.buffers()]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        yield
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), buffers):
            buffer.copy_(saved)


def evaluate(generator: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device, autocast: Callable = contextlib.nullcontext,
             reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
             seed: int = 0) -> dict[str, float]:
    """Mean L1, PSNR and SSIM over all ranks' images; `images` is the count."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    with untouched_state(generator, device):
        torch.manual_seed(seed)  # the same dropout masks at every evaluation
        for x, y in batches:
            with autocast():
                output = generator(x)
            metrics = per_image_metrics(output, y).double()
            sums[:3] += metrics.sum(0)
            sums[3] += len(metrics)
    sums = reduce_sum(sums)
    count = max(sums[3].item(), 1.0)
    return {"l1": sums[0].item() / count, "psnr": sums[1].item() / count,
            "ssim": sums[2].item() / count, "images": int(sums[3].item())}


def sample_grid(generator: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                device: torch.device, autocast: Callable = contextlib.nullcontext,
                seed: int = 0) -> np.ndarray:
    """One row per sample: input | output | target, as an H x W x 3 uint8 array."""
    with untouched_state(generator, device):
        torch.manual_seed(seed)
        with autocast():
            output = generator(x)
    columns = [to_uint8(t) for t in (x, output, y)]
    columns = [c.expand(-1, 3, -1, -1) if c.shape[1] == 1 else c[:, :3] for c in columns]
    rows = torch.cat(columns, dim=3)  # side by side
    return torch.cat(list(rows), dim=1).permute(1, 2, 0).cpu().numpy()  # rows stacked


def save_png(path: str, pixels: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    storage.write_bytes(path, buffer.getvalue())
