"""Decoding: a sample's encoded members -> uint8 H x W x C input and target.

One policy for every reader of images, shard.py included: JPEG through simplejpeg
(libjpeg-turbo, 1.6-2.6x faster than PIL here; CMYK/YCCK through PIL) where it is
installed, else through PIL's own libjpeg-turbo with the same decoder settings (the same
pixels: gray from a colour JPEG is libjpeg's luma channel in both; tested with simplejpeg
hidden), so the package imports on machines without it (a bare GPU image); palette and alpha
images lose the alpha; 16-bit grayscale is scaled to 8 bits (`scale_16bit`, 65535 -> 255,
not clipped); gray <-> RGB converted as requested (RGB -> gray by ITU-R 601 luma); EXIF
orientation ignored (pixels as stored, as the reference pix2pix does: a pair is aligned in
its stored pixel grid, and per-file tags could rotate one half but not the other). The
pixel count is checked from the header before any decoding, against MAX_IMAGE_PIXELS
unless told otherwise: the one default of shard.py and the trainer alike. The format is
the bytes', never the name's (as shard.py's probe): a PNG named .jpg decodes as a PNG, and
a format no shard holds (GIF, BMP, TIFF) is unsupported_format, as shard.py rejects it.
Which files in a folder are images at all: format.list_input_images.
"""
from __future__ import annotations

import functools
import importlib
import io
import json
import logging

import numpy as np
from PIL import Image, JpegImagePlugin

from pipeline.data.format import EXT_OF_PIL_FORMAT, MAX_IMAGE_PIXELS, image_members

log = logging.getLogger(__name__)


class BadSample(Exception):
    """A sample that cannot be used; `reason` is the counter it goes to."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def scale_16bit(im: Image.Image) -> Image.Image:
    """A 16/32-bit grayscale PIL image as 8-bit 'L', scaled (65535 -> 255) and rounded;
    PIL's convert would clip it, a white image. Other modes pass through."""
    if not im.mode.startswith("I"):
        return im
    wide = np.asarray(im, dtype=np.uint32).clip(0, 65535)
    return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))


@functools.cache
def _simplejpeg():
    """The simplejpeg module, or None where it is not installed (a speed-up only)."""
    try:
        return importlib.import_module("simplejpeg")
    except ImportError:
        return None


JPEG_MAGIC = b"\xff\xd8\xff"
# what PIL names the formats a shard may hold (MPO: a camera's JPEG with extra pictures)
READABLE_FORMATS = (*EXT_OF_PIL_FORMAT, "MPO")


def decode_image(data: bytes, ext: str, channels: int,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Encoded bytes -> uint8 HxWxC (C = channels, 1 or 3), by the policy above. The bytes
    decide the format, as shard.py's probe decides it, not `ext` (the file's or member's
    extension, kept for the callers): a PNG named .jpg is a PNG; a format shards cannot
    hold (GIF, BMP, TIFF, ...) is BadSample("unsupported_format")."""
    simplejpeg = _simplejpeg()
    if data[:3] == JPEG_MAGIC and simplejpeg is not None:
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            raise BadSample("corrupt_image") from None
        _check_size(width, height, max_pixels)
        if colorspace in ("Gray", "YCbCr", "RGB"):
            try:
                return simplejpeg.decode_jpeg(data, colorspace="GRAY" if channels == 1 else "RGB")
            except ValueError:
                raise BadSample("corrupt_image") from None
    return _decode_pil(data, channels, max_pixels)


def _decode_pil(data: bytes, channels: int, max_pixels: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in READABLE_FORMATS:
                raise BadSample("unsupported_format")
            _check_size(*im.size, max_pixels)
            if channels == 1 and isinstance(im, JpegImagePlugin.JpegImageFile) and im.mode == "RGB":
                im.draft("L", None)  # libjpeg's luma channel, as simplejpeg's GRAY output
            im.load()
            im = scale_16bit(im)
            if im.mode == "P":
                im = im.convert("RGBA")
            pixels = np.array(im.convert("L" if channels == 1 else "RGB"))  # writable
    except BadSample:
        raise
    except Image.DecompressionBombError:  # PIL's own guard, at 2x its default limit
        raise BadSample("too_large") from None
    except Exception:  # noqa: BLE001 - PIL raises many types on broken data; all mean the same here
        raise BadSample("corrupt_image") from None
    return pixels.reshape(*pixels.shape[:2], channels)


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise BadSample("too_large")


def decode_sample(parts: dict, cfg, in_channels: int, out_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """A sample's members -> (network input, network target) as uint8 HxWxC, with the
    direction applied (cfg is a DataConfig): stored input = A, target = B; BtoA swaps
    them. Each image gets the configured channels whatever its own mode (gray and RGB mix
    freely). Halves of different sizes are kept as they are and later resized alike, each
    to load_size (to crop_size for evaluation), as the reference pix2pix does: shard.py is
    where such a pair is rejected or resized by policy (--on-size-mismatch)."""
    swap = cfg.direction == "BtoA"
    a_channels, b_channels = (out_channels, in_channels) if swap else (in_channels, out_channels)
    found = image_members(parts)
    if "pair" in found:
        whole = _decode_member(parts, found["pair"], max(a_channels, b_channels), cfg)
        split_x = _split_x(parts, whole.shape[1])
        a, b = whole[:, :split_x], whole[:, split_x:]
        a, b = _to_channels(a, a_channels), _to_channels(b, b_channels)
    elif "input" in found and "target" in found:
        a = _decode_member(parts, found["input"], a_channels, cfg)
        b = _decode_member(parts, found["target"], b_channels, cfg)
    else:
        raise BadSample("missing_target" if "input" in found else "missing_input")
    return (b, a) if swap else (a, b)


def _decode_member(parts: dict, suffix: str, channels: int, cfg) -> np.ndarray:
    ext = suffix.rsplit(".", 1)[-1].lower()
    return decode_image(parts[suffix], ext, channels, cfg.max_image_pixels)


def _split_x(parts: dict, width: int) -> int:
    try:
        split_x = int(json.loads(parts["json"]).get("split_x", width // 2)) \
            if "json" in parts else width // 2
    except (ValueError, TypeError, AttributeError):
        raise BadSample("bad_json") from None
    if not 0 < split_x < width:
        raise BadSample("bad_json")
    return split_x


def _to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """RGB -> gray (ITU-R 601, as PIL) or the reverse, for the halves of a pair image."""
    if pixels.shape[2] == channels:
        return pixels
    if channels == 3:
        return np.repeat(pixels, 3, axis=2)
    luma = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.rint(luma).astype(np.uint8)[..., None]


def try_decode(key: str, parts: dict, cfg, in_channels: int,
               out_channels: int) -> tuple[tuple | None, str | None]:
    """(pair, None), or (None, reason): bad data never raises out of a worker. Member
    names that are absolute or climb with `..` make their sample "unsafe_name": nothing
    is extracted from a tar, but keys become file names (translate.py's outputs). Keys
    end at the first dot, so a `..` or `./` leaves a '/' in a suffix or an empty key."""
    if not key or key.startswith("/") or any("/" in suffix for suffix in parts):
        return None, "unsafe_name"
    try:
        return decode_sample(parts, cfg, in_channels, out_channels), None
    except BadSample as bad:
        return None, bad.reason
    except Exception as err:  # noqa: BLE001 - an unforeseen decoder failure is one bad sample
        log.warning("sample %s skipped: %s: %s", key, type(err).__name__, err)
        return None, "decode_error"
