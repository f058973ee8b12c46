"""shard.py's option values: the argparse types, and the checks across options that
decide what --load-size records (a mistake is one line, exit 2, before any work).

No torch here (nor through pipeline.data.augmentation): shard.py's packing processes import
this module, and a copy-only run must not pay torch's ~1.7 s start-up in each of them.
"""
from __future__ import annotations

import argparse

from pipeline.data.format import RESIZING_MODES
from pipeline.errors import UserError

# data.preprocess modes whose scale step --load-size can store: the manifest format's list
# (augmentation.PREPROCESS's resizing modes; tests/unit/test_shard_sizes.py keeps them in step)
RESIZES = RESIZING_MODES
NO_RESIZE = ("crop", "none")  # data.preprocess modes that train at the stored size


def preprocess_arg(text: str) -> str:
    """--preprocess: a mode whose resize can be stored; crop and none resize nothing,
    so the way to train with them is to store the originals."""
    if text in NO_RESIZE:
        raise argparse.ArgumentTypeError(
            f"{text!r} resizes nothing: store the originals (leave out --load-size and "
            f"--preprocess) and train with data.preprocess={text}")
    return text


def load_size_options(args: argparse.Namespace) -> dict:
    """What --load-size adds to the recorded options: {} (not used), {"load_size": N}
    (the N x N squash, as before), or with "preprocess" too for an aspect-keeping mode.
    Recorded only when used, so plans made before these options keep their digests."""
    preprocess = getattr(args, "preprocess", None) or "resize_and_crop"
    if not args.load_size:
        if preprocess != "resize_and_crop":
            raise UserError(f"--preprocess {preprocess} says how --load-size resizes; give "
                            "--load-size N too (or leave both out to store the originals)")
        return {}
    if args.resize:
        raise UserError("--load-size and --resize: choose one (--load-size stores the "
                        "trainer's own resize to N x N; --resize caps the longer side)")
    if preprocess == "resize_and_crop":
        return {"load_size": args.load_size}
    return {"load_size": args.load_size, "preprocess": preprocess}


# ------------------------------------------------------------------------ argparse types

def parse_slice(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/n, got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"need 0 <= i < n, got {text!r}")
    return index, count


def parse_size(text: str) -> int:
    """Bytes from '536870912', '512M', '2G': at least 1."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    text = text.strip().upper().removesuffix("B")
    try:
        size = int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)
    except (ValueError, OverflowError):  # 'x', 'nanM', 'infM'
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    return in_range(size, 1, None)


def in_range(value: int, low: int, high: int | None) -> int:
    """value, if low <= value (<= high); else the config's one-line range refusal."""
    if value < low or (high is not None and value > high):
        expected = f"value >= {low}" if high is None else f"{low} <= value <= {high}"
        raise argparse.ArgumentTypeError(f"{value} is out of range: expected {expected}")
    return value


def integer(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high] (high None: no bound). Not an integer:
    argparse's `invalid integer value: 'x'`."""
    def integer(text: str) -> int:  # named for argparse's message
        return in_range(int(text), low, high)
    return integer


positive = integer(1)


def workers_arg(text: str) -> int | str:
    return "auto" if text == "auto" else positive(text)
