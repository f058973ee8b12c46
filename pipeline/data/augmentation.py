"""Geometry and paired augmentation: the size an image is brought to (data.preprocess),
then the same crop and flip for both halves.

One owner for every reader of images (the training stream, evaluation, p2p-translate,
shard.py's pre-resizing), in two steps: `Geometry.resize_target` (the stored H x W -> the
size it is resized to), then, in the cropping modes, a random crop_height x crop_size crop
(data.crop_height 0: a square), and a flip. Evaluation and translation use `eval_size`:
the same scale without the crop.

    mode                      resized to                          crop  eval/translate size
    resize_and_crop (default) load_size x load_size (squashed)    yes   the crop size
    crop                      its stored size                     yes   stored, rounded
    scale_width               width load_size, aspect kept,       no    the same
                              rounded to the generator's multiple
    scale_width_and_crop      width load_size, aspect kept        yes   scaled, rounded
    scale_shortside_and_crop  short side load_size, aspect kept   yes   scaled, rounded
    none                      its stored size, rounded            no    the same

"rounded": each side to the nearest multiple of the generator's size multiple (at least
one; halves up, where pix2pixHD's round() takes halves to even), as pix2pixHD rounds to
2**n_downsample; the rounding resizes (a slight aspect change
of under one multiple), never pads. Unlike the reference, scale_width does not stretch a
wide image's height up to the crop size: the aspect is kept, and an image whose scaled
height is below the crop is refused at start-up (pipeline/startup.py, from the sizes the
manifest records) instead.

All randomness comes from seeds, never from worker RNG state: a sample's crop and flip
are a function of (seed, epoch, sample key, its size), so a sample is augmented
identically whatever the worker or process count, and after a resume. torch's uint8
channels-last bicubic resize is ~4x faster than PIL's on CPU (benchmarks/bench_data.py),
so both the worker and the device path use it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import DataError

Size = tuple[int, int]  # (height, width), as tensors are laid out

PREPROCESS = {
    "resize_and_crop": "both halves to load_size x load_size (a non-square image is squashed), "
                       "then a random crop (the reference's default)",
    "crop": "a random crop at the stored resolution",
    "scale_width": "width to load_size, the height keeping the aspect; no crop "
                   "(pix2pixHD's Cityscapes)",
    "scale_width_and_crop": "width to load_size keeping the aspect, then a random crop",
    "scale_shortside_and_crop": "the short side to load_size keeping the aspect, then a "
                                "random crop (SPADE's)",
    "none": "the stored size, rounded to the generator's size multiple",
}
CROPPING = ("resize_and_crop", "crop", "scale_width_and_crop", "scale_shortside_and_crop")
KEEPS_ASPECT = ("scale_width", "scale_width_and_crop", "scale_shortside_and_crop")


def derive_seed(*parts) -> int:
    """A 64-bit seed from any values; stable across processes (unlike hash())."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def round_to(side: int, multiple: int) -> int:
    """The nearest multiple of `multiple` (halves up), at least one multiple."""
    return max(multiple, (2 * side + multiple) // (2 * multiple) * multiple)


def scale_to(mode: str, load_size: int, size: Size) -> Size:
    """The stored (h, w) resized by `mode`'s scale step (no rounding, no crop). The aspect-
    keeping sides truncate, as the reference and pix2pixHD compute them."""
    h, w = size
    if mode == "resize_and_crop":
        return load_size, load_size
    if mode in ("scale_width", "scale_width_and_crop"):
        return max(1, int(load_size * h / w)), load_size
    if mode == "scale_shortside_and_crop":
        if w <= h:
            return max(1, int(load_size * h / w)), load_size
        return load_size, max(1, int(load_size * w / h))
    return h, w  # crop, none


@dataclass(frozen=True)
class Geometry:
    """One run's geometry: data.preprocess, load_size, the crop (h, w), flip, and the
    generator's size multiple (what the uncropped sizes are rounded to)."""
    preprocess: str = "resize_and_crop"
    load_size: int = 286
    crop: Size = (256, 256)
    multiple: int = 1
    flip: bool = True

    @classmethod
    def of(cls, data, multiple: int = 1, flip: bool | None = None) -> Geometry:
        """From a DataConfig (or anything with its preprocess, load_size, crop_size,
        crop_height and flip)."""
        crop = (getattr(data, "crop_height", 0) or data.crop_size, data.crop_size)
        return cls(getattr(data, "preprocess", None) or "resize_and_crop", data.load_size, crop,
                   multiple, data.flip if flip is None else flip)

    @property
    def crops(self) -> bool:
        return self.preprocess in CROPPING

    def rounded(self, size: Size) -> Size:
        return round_to(size[0], self.multiple), round_to(size[1], self.multiple)

    def resize_target(self, size: Size) -> Size:
        """What an image stored at `size` is resized to before its crop (if any)."""
        scaled = scale_to(self.preprocess, self.load_size, size)
        return scaled if self.crops else self.rounded(scaled)

    def train_size(self, size: Size) -> Size:
        """The size the networks see in training for an image stored at `size`."""
        return self.crop if self.crops else self.resize_target(size)

    def eval_size(self, size: Size) -> Size:
        """The size validation, p2p-evaluate and p2p-translate bring an image to: the
        reference's test protocol (the crop size) for resize_and_crop, else the scale
        without the crop, rounded."""
        if self.preprocess == "resize_and_crop":
            return self.crop
        return self.rounded(scale_to(self.preprocess, self.load_size, size))

    def params(self, seed: int, epoch: int, key: str, size: Size) -> tuple[int, int, int]:
        """(top, left, flip) of one sample stored at `size`, from (seed, epoch, key) only."""
        rng = np.random.default_rng(derive_seed(seed, epoch, key, "augment"))
        h, w = self.resize_target(size)
        crop_h, crop_w = self.crop if self.crops else (h, w)
        if crop_h > h or crop_w > w:
            raise DataError(f"sample {key}: stored {size[1]}x{size[0]}, resized to {w}x{h}, is "
                            f"smaller than the crop {crop_w}x{crop_h}")
        top, left = rng.integers(0, [h - crop_h + 1, w - crop_w + 1])
        flip = int(self.flip and rng.random() < 0.5)
        return int(top), int(left), flip


def resize_u8(images: torch.Tensor, size: int | Size) -> torch.Tensor:
    """Bicubic (antialiased) resize of uint8 B x C x H x W to `size` (a side, or (h, w)),
    uint8 out. On CPU torch's uint8 channels-last kernel is ~4x faster than PIL's;
    elsewhere it runs in float and rounds the same way."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[-2:]) == size:
        return images
    if images.device.type == "cpu":
        return F.interpolate(images.contiguous(memory_format=torch.channels_last),
                             size=size, mode="bicubic", antialias=True)
    return resize_u8_via_float(images, size)


def resize_u8_via_float(images: torch.Tensor, size: int | Size) -> torch.Tensor:
    """The same resize for devices without a uint8 kernel (CUDA): float, round, clamp."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    resized = F.interpolate(images.float(), size=size, mode="bicubic", antialias=True)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def augment(images: torch.Tensor, params: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """uint8 B x C x H x W (one stored size) -> uint8 B x C x h x w: resize to the
    geometry's target, then each sample's crop and flip from `params` (B x 3: top, left,
    flip). Called with the same params for input and target, so the pair stays aligned."""
    resized = resize_u8(images, geometry.resize_target(tuple(images.shape[-2:])))
    h, w = geometry.crop if geometry.crops else tuple(resized.shape[-2:])
    crops = [resized[i, :, top:top + h, left:left + w]
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
