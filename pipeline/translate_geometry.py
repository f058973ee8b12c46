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
scale: the trainer's validation protocol, the eval size of the run's geometry,
pipeline/data/augmentation.py's Geometry from generator.json, bicubic and antialiased
with pipeline/data/eval_stream.py's own calls, so the output is what evaluation measured;
see input_scale), and resize the output back to the input's own size. The pair helpers
decide which image files are A|B pairs (--split-pair) and take their input half.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.augmentation import Geometry, Size, chw, resize_u8, to_unit_range
from pipeline.data.format import parse_size, size_name
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


# --------------------------------------------------------------------------- A|B pairs

def is_pair_image(pixels: np.ndarray, split_pair: str, layout: str | None = None,
                  size: str | None = None) -> bool:
    """--split-pair: auto follows the run's recorded source layout (generator.json
    data.layout and data.size): "separate", whole images; "pair", an image with an A|B
    pair's aspect (twice its training halves', within 2%: a photo of the input alone stays
    whole); else (not recorded, or "mixed") an image exactly twice as wide as high (the
    reference's aligned layout). A run on 2:1 street scenes must not have its inputs
    halved; a run on 3:1 A|B pairs takes 6:1 images for pairs."""
    if split_pair != "auto":
        return split_pair == "yes"
    if layout == "separate":
        return False
    height, width = pixels.shape[:2]
    if layout == "pair" and size:
        half_height, half_width = parse_size(size)
        pair_aspect = 2 * half_width / half_height
        return abs(width / height - pair_aspect) <= 0.02 * pair_aspect
    return width == 2 * height


def pair_rule(split_pair: str, layout: str | None, size: str | None = None) -> str:
    """Why images were taken for A|B pairs, for the log (is_pair_image's rule)."""
    if split_pair == "yes":
        return "--split-pair yes"
    if layout == "pair" and size:
        return (f"the run trained on A|B pair images of {size} halves (generator.json data.layout "
                f"pair): an image twice as wide is taken for a pair")
    return "width = 2 x height"


def input_half(pixels: np.ndarray, direction: str) -> np.ndarray:
    """The half of an A|B image the generator takes: A (left) for AtoB, B for BtoA."""
    half = pixels.shape[1] // 2
    return pixels[:, :half] if direction == "AtoB" else pixels[:, half:]


# --------------------------------------------------------------------------- scale

SCALES = ("eval", "train", "native")
REFERENCE_CROP = 256  # the default tile's base for a generator.json without data.crop_size


def parse_input_size(text: str) -> str | int:
    """--input-size: eval, train, native or a side in pixels."""
    if text in SCALES:
        return text
    side = int(text) if text.isdigit() else 0
    if side < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give eval, train, native or a side in "
                                         "pixels such as 512")
    return side


def crop_side(data: TrainedOn) -> int:
    """The larger side of the training crop (data.crop_size, data.crop_height): the
    default tile's base and its least side, so that a tile holds what the networks saw."""
    return max(data.crop_size or 0, data.crop_height or 0) or REFERENCE_CROP


@dataclass(frozen=True)
class InputScale:
    """What translate.py brings each input to: `rule` maps an input's (h, w) to the size it
    is translated at (None: its own), which depends on the input's aspect in the aspect-
    keeping modes; `said` is the log line saying so and why, a warning when `other` (a
    scale the generator was not trained at)."""
    rule: Callable[[Size], Size] | None
    said: str
    other: bool = False

    def target(self, size: Size) -> Size | None:
        return None if self.rule is None else tuple(self.rule(tuple(size)))


def scale_phrase(geometry: Geometry, which: str = "eval") -> str:
    """How Geometry.eval_size ("eval") or resize_target ("train") sizes an image, in words."""
    mode, load, multiple = geometry.preprocess, geometry.load_size, geometry.multiple
    rounds = multiple > 1 and (which == "eval" or not geometry.crops)
    rounding = f", each side rounded to a multiple of {multiple}" if rounds else ""
    if mode == "resize_and_crop":
        return f"resized to {load}x{load}" if which == "train" else f"resized to {size_name(*geometry.crop)}"
    if mode in ("scale_width", "scale_width_and_crop"):
        return f"resized to width {load}, the aspect kept{rounding}"
    if mode == "scale_shortside_and_crop":
        return f"resized to short side {load}, the aspect kept{rounding}"
    return f"at their own size{rounding}"  # crop, none


def protocol(geometry: Geometry) -> str:
    """The run's geometry in a few words, for the log line's parenthesis."""
    crop = size_name(*geometry.crop)
    if geometry.preprocess == "resize_and_crop":
        load = geometry.load_size
        return f"its validation resized inputs to {crop}; training to {load}x{load}, then cropped {crop}"
    return (f"data.preprocess {geometry.preprocess}, load_size {geometry.load_size}, " +
            (f"training cropped {crop}" if geometry.crops else "uncropped in training"))


def run_geometry(data: TrainedOn, multiple: int) -> Geometry | None:
    """The run's Geometry from generator.json (None: it records no load_size and
    crop_size); a missing data.preprocess is resize_and_crop, older files' behaviour."""
    if data.crop_size is None or data.load_size is None:
        return None
    return Geometry.of(data, multiple)


def input_scale(data: TrainedOn, multiple: int, asked: str | int) -> InputScale:
    """The size each input is translated at, by --input-size: eval, the run's scale
    (Geometry.eval_size: what its validation and p2p-evaluate measured), train
    (resize_target: what its random crops were cut from), native, or N x N."""
    geometry = run_geometry(data, multiple)  # an unknown preprocess: refused by GeneratorInfo
    if geometry is None:  # not written by this project's trainer
        side = asked if isinstance(asked, int) else None
        return InputScale(square(side), "generator.json records no data.crop_size and "
                          "data.load_size (the run's scale): inputs translated at " +
                          (f"{side}x{side}" if side else "their own size, as before"))
    why = protocol(geometry)
    if asked == "eval":
        if geometry.preprocess == "resize_and_crop":
            crop, load = size_name(*geometry.crop), geometry.load_size
            why = f"data.crop_size; training resized to {load}x{load}, then cropped {crop}"
        return InputScale(geometry.eval_size, f"inputs {scale_phrase(geometry)}, the run's scale "
                          f"as its validation and p2p-evaluate resize them ({why})")
    if asked == "train":
        crops = " before its crops" if geometry.crops else ""
        return InputScale(geometry.resize_target, f"inputs {scale_phrase(geometry, 'train')}, "
                          f"training's resize{crops} ({why})")
    if asked == "native":
        if geometry.preprocess in ("crop", "none"):  # the run's scale, unrounded
            return InputScale(None, f"--input-size native: inputs translated at their own size, "
                              f"the scale the run trained at ({why})")
        return InputScale(None, f"--input-size native: inputs translated at their own size, not "
                          f"at the run's scale ({why}): other sizes are scales it was not "
                          "trained at", True)
    return side_scale(geometry, asked, why)


def side_scale(geometry: Geometry, side: int, why: str) -> InputScale:
    """--input-size N: every input to N x N, today's meaning (a square whatever the
    run's geometry): a warning unless the run's own resize or validation was that square."""
    said = f"inputs resized to {side}x{side}"
    if geometry.preprocess != "resize_and_crop":
        return InputScale(square(side), f"--input-size {side}: {said}, not the run's scale "
                          f"({why}): another aspect is squashed, and other sizes are scales it "
                          "was not trained at", True)
    if (side, side) in (geometry.crop, (geometry.load_size,) * 2):
        return InputScale(square(side), f"{said} ({why})")
    return InputScale(square(side), f"--input-size {side}: {said}, {side / geometry.crop[1]:.3g}x "
                      f"the run's scale ({why}): a scale it was not trained at", True)


def square(side: int | None) -> Callable[[Size], Size] | None:
    return None if side is None else lambda _: (side, side)


def to_network(pixels: np.ndarray, size: Size | None) -> torch.Tensor:
    """uint8 HxWxC -> 1 x C x H x W float in [-1, 1], resized to `size` (h, w) if given as
    the trainer's validation resizes (pipeline/data/eval_stream.py: the same calls)."""
    image = chw(pixels)
    return to_unit_range(resize_u8(image, size) if size else image)


def resize_back(output: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A float [-1, 1] output (B x C x h x w) to `size` (H, W): bicubic, antialiased when
    shrinking, as the input was resized; unchanged when already that size."""
    if tuple(output.shape[-2:]) == tuple(size):
        return output
    return F.interpolate(output.float(), size=tuple(size), mode="bicubic", antialias=True)
