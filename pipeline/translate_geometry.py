"""How an image of any size meets a generator that takes only some sizes, and the run's scale.

A generator takes heights and widths that are multiples of its size multiple
(2**num_downs for a U-Net, 4 for a ResNet, 16 and 32 for pix2pixHD's global and local
generators); anything else fails inside it (a U-Net's skip concatenation). So an image is
reflect-padded to the multiple (centred), translated and cropped back: in translate.py
with Python integers (`run_whole`), above a pixel budget in overlapping tiles
(`run_tiled`), and inside the exported graphs with tensor arithmetic on symbolic sizes
(`AnySize`), so that the ONNX and torch.export files take any size too and compute exactly
what translate.py computes. Both paddings are the same signal: the image mirrored about
its edge pixels, repeated (replicated for a side of one pixel).

The scale helpers pick the size translate.py brings each input to (by default the run's
scale: the trainer's validation protocol, bicubic and antialiased to crop_size x crop_size
with pipeline/data/eval_stream.py's own calls, so the output is what evaluation measured;
see input_side), and resize the output back to the input's own size.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data import chw, resize_u8, to_unit_range
from pipeline.errors import UserError
from pipeline.weights import TrainedOn

Forward = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- padding

def reflect_pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Reflection padding of any width: F.pad's needs pad < size, so pad in rounds; a side
    of one pixel has nothing to reflect and is replicated."""
    pads = [left, right, top, bottom]
    while any(pads):
        h, w = x.shape[-2:]
        step = [min(p, limit - 1) for p, limit in zip(pads, (w, w, h, h))]
        if not any(step):
            return F.pad(x, pads, mode="replicate")
        x = F.pad(x, step, mode="reflect")
        pads = [p - s for p, s in zip(pads, step)]
    return x


def run_whole(forward: Forward, images: torch.Tensor, multiple: int) -> torch.Tensor:
    """B x C x H x W of any size: pad to a multiple of `multiple` (centred), translate,
    crop back."""
    h, w = images.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    top, left = pad_h // 2, pad_w // 2
    output = forward(reflect_pad(images, top, pad_h - top, left, pad_w - left))
    return output[..., top:top + h, left:left + w]


def reflect_index(length, before, padded: int, device: torch.device) -> torch.Tensor:
    """The source index of each of `padded` positions starting `before` pixels ahead of a
    signal of `length`: the signal mirrored about its end pixels and repeated, which is what
    reflect_pad's rounds give (index 0 throughout for a length of 1). Plain tensor
    arithmetic, so torch.export traces it with symbolic sizes."""
    period = torch.clamp(torch.tensor(2 * length - 2, device=device), min=1)
    offset = torch.remainder(torch.arange(padded, device=device) - before, period)
    return torch.where(offset >= length, period - offset, offset)


class AnySize(torch.nn.Module):
    """A generator that takes any height and width: reflect-pad to its size multiple
    inside the graph (run_whole's padding, by gathering rows and columns), translate, crop
    back. The graph exports wrap the generator in it."""

    def __init__(self, generator: torch.nn.Module, multiple: int):
        super().__init__()
        self.generator, self.multiple = generator, multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w, m = x.shape[-2], x.shape[-1], self.multiple
        # m * ceil(size / m), written so the exporter sees a multiple of m
        padded_h, padded_w = m * ((h + m - 1) // m), m * ((w + m - 1) // m)
        top, left = (padded_h - h) // 2, (padded_w - w) // 2
        rows = reflect_index(h, top, padded_h, x.device)
        cols = reflect_index(w, left, padded_w, x.device)
        output = self.generator(x.index_select(2, rows).index_select(3, cols))
        return output[:, :, top:top + h, left:left + w]


# --------------------------------------------------------------------------- tiles

def blend_window(size: int) -> torch.Tensor:
    """size x size raised-cosine (Hann) weights, never zero: tiles fade in and out, and
    at 50% overlap the shifted windows sum to a constant."""
    ramp = torch.sin(math.pi * (torch.arange(size) + 0.5) / size) ** 2
    return ramp[:, None] * ramp[None, :]


def tile_layout(length: int, tile: int, stride: int, margin: int) -> tuple[int, int]:
    """(tiles along an axis, padded length) covering `length` plus `margin` each side."""
    count = max(0, math.ceil((length + 2 * margin - tile) / stride)) + 1
    return count, tile + (count - 1) * stride


def run_tiled(forward: Forward, image: torch.Tensor, tile: int, overlap: int,
              batch_size: int) -> torch.Tensor:
    """1 x C x H x W of any size -> 1 x C' x H x W from overlapping tile x tile windows,
    `batch_size` tiles per forward, blended by blend_window on the CPU. The image is
    first reflect-padded by overlap/2, so its own border lies where a tile's weight is
    already high rather than at a tile's (weakest) edge."""
    stride, margin = tile - overlap, overlap // 2
    h, w = image.shape[-2:]
    rows, padded_h = tile_layout(h, tile, stride, margin)
    cols, padded_w = tile_layout(w, tile, stride, margin)
    padded = reflect_pad(image, margin, padded_h - h - margin, margin, padded_w - w - margin)
    window = blend_window(tile)
    corners = [(r * stride, c * stride) for r in range(rows) for c in range(cols)]
    total, weights = None, torch.zeros(padded_h, padded_w)
    for start in range(0, len(corners), batch_size):
        chunk = corners[start:start + batch_size]
        outputs = forward(torch.cat([padded[..., y:y + tile, x:x + tile] for y, x in chunk]))
        if total is None:
            total = torch.zeros(outputs.shape[1], padded_h, padded_w)
        for (y, x), output in zip(chunk, outputs.float().cpu()):
            total[:, y:y + tile, x:x + tile] += output * window
            weights[y:y + tile, x:x + tile] += window
    return (total / weights)[None, :, margin:margin + h, margin:margin + w]


def default_tile(crop_size: int, multiple: int) -> int:
    """Twice the training crop (more context per tile, closer to whole-image output),
    rounded up to the U-Net's multiple."""
    return math.ceil(2 * crop_size / multiple) * multiple


def check_tiling(tile: int, overlap: int, crop_size: int, multiple: int) -> None:
    if tile < crop_size or tile % multiple:
        raise UserError(f"--tile {tile}: must be >= the training crop {crop_size} and a "
                         f"multiple of {multiple} (the generator's size multiple)")
    if not tile / 4 <= overlap < tile:
        raise UserError(f"tile overlap {overlap} px: must be >= 25% of the tile ({tile}) "
                         "and smaller than the tile")


# --------------------------------------------------------------------------- scale

SCALES = ("eval", "train", "native")


def parse_input_size(text: str) -> str | int:
    """--input-size: eval, train, native or a side in pixels."""
    if text in SCALES:
        return text
    side = int(text) if text.isdigit() else 0
    if side < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give eval, train, native or a side in "
                                         "pixels such as 512")
    return side


def input_side(data: TrainedOn, asked: str | int) -> tuple[int | None, str, bool]:
    """(the side each input is resized to, None for its own size; the log line saying
    so; whether that line is a warning: a scale other than the run's). The run's scale is
    its validation's: crop_size x crop_size, which evaluation measured; `train` is the
    load_size its random crops were cut from."""
    crop, load = data.crop_size, data.load_size
    if crop is None or load is None:  # not written by this project's trainer
        side = asked if isinstance(asked, int) else None
        return side, ("generator.json records no data.crop_size and data.load_size (the "
                      "run's scale): inputs translated at " +
                      (f"{side}x{side}" if side else "their own size, as before")), False
    protocol = f"its validation resized inputs to {crop}x{crop}; training to {load}x{load}, " \
               f"then cropped {crop}x{crop}"
    if asked == "eval":
        return crop, (f"inputs resized to {crop}x{crop}, the run's scale as its validation "
                      f"and p2p-evaluate resize them (data.crop_size; training resized to "
                      f"{load}x{load}, then cropped {crop}x{crop})"), False
    if asked == "train":
        return load, f"inputs resized to {load}x{load}, training's resize ({protocol})", False
    if asked == "native":
        return None, (f"--input-size native: inputs translated at their own size, not at the "
                      f"run's scale ({protocol}): other sizes are scales it was not trained at"), True
    if asked in (crop, load):
        return asked, f"inputs resized to {asked}x{asked} ({protocol})", False
    return asked, (f"--input-size {asked}: inputs resized to {asked}x{asked}, {asked / crop:.3g}x "
                   f"the run's scale ({protocol}): a scale it was not trained at"), True


def to_network(pixels: np.ndarray, side: int | None) -> torch.Tensor:
    """uint8 HxWxC -> 1 x C x H x W float in [-1, 1], resized to side x side if given as
    the trainer's validation resizes (pipeline/data/eval_stream.py: the same calls)."""
    image = chw(pixels)
    return to_unit_range(resize_u8(image, side) if side else image)


def resize_back(output: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A float [-1, 1] output (B x C x h x w) to `size` (H, W): bicubic, antialiased when
    shrinking, as the input was resized; unchanged when already that size."""
    if tuple(output.shape[-2:]) == tuple(size):
        return output
    return F.interpolate(output.float(), size=tuple(size), mode="bicubic", antialias=True)
