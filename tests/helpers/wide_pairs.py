"""A non-square shard folder made on the spot: pairs whose input is a white disc on black
and whose target is its inverse (255 - input: a black disc on white), packed by
data_tools/shard.py in this process, so the folder is exactly what a user's would be
(shards, manifest.json, whatever shard.py records about sizes and layouts).

A disc is the shape that shows a squash: in what the networks see, a disc whose
horizontal and vertical extents differ has been resized without keeping the aspect.
Each pair's disc has its own centre and radius (`WidePairs.discs`, in stored pixels),
always whole inside the image, so a test can also check where it went.

    pairs = write_wide_pairs(tmp_path / "wide")                # 24 train + 8 val, 96 x 32
    cfg = DataConfig(train=pairs.path, val=pairs.path, preprocess="scale_width", ...)

Fast (~0.05 s for the defaults): tiny PNGs, one process (shard.py --workers 1).
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from data_tools import shard
from pipeline.data import derive_seed

Size = tuple[int, int]  # (width, height), as people write image sizes


@dataclass(frozen=True)
class Disc:
    """A disc in stored pixel coordinates: centre column x, centre row y, radius r (a
    pixel is inside when its centre is within r of (x, y))."""
    x: float
    y: float
    r: float


@dataclass
class WidePairs:
    path: str  # the shard folder: give it as data.train and data.val
    layout: str  # "pair" (A|B images) or "separate" (input and target files)
    discs: dict[str, dict[str, Disc]] = field(default_factory=dict)  # {split: {key: Disc}}
    sizes: dict[str, Size] = field(default_factory=dict)  # {key: (width, height)} stored

    def keys(self, split: str = "train") -> list[str]:
        return sorted(self.discs[split])


def disc_image(size: Size, disc: Disc) -> np.ndarray:
    """H x W x 3 uint8: 255 inside `disc`, 0 outside."""
    width, height = size
    rows, cols = np.mgrid[0:height, 0:width]
    inside = (cols + 0.5 - disc.x) ** 2 + (rows + 0.5 - disc.y) ** 2 <= disc.r ** 2
    return np.repeat((inside * 255).astype(np.uint8)[..., None], 3, axis=2)


def pick_disc(key: str, size: Size) -> Disc:
    """A disc of radius 20-38 % of the short side at a position seeded by `key`, whole
    inside the image with at least one pixel to spare."""
    width, height = size
    rng = np.random.default_rng(derive_seed("wide_pairs", key))
    r = float(rng.uniform(0.2, 0.38) * min(width, height))
    x = float(rng.uniform(r + 1, width - r - 1))
    y = float(rng.uniform(r + 1, height - r - 1))
    return Disc(round(x, 2), round(y, 2), round(r, 2))


def write_wide_pairs(folder, count: int = 24, size: Size | list[Size] = (96, 32),
                     layout: str = "pair", val_count: int = 8, shards: int = 4) -> WidePairs:
    """Packs `count` train and `val_count` val pairs into the shard folder `folder` (made
    if missing) and returns where and what they are.

    size: (width, height) of each half, or a list of sizes given to the pairs of each
    split in turn (pair i gets size[i % len]): mixed sizes, for preprocess modes that
    keep each image's own.
    layout: "pair" writes A|B side-by-side images (stored as KEY.pair.png, split at the
    middle by the reader); "separate" writes A/ and B/ files (KEY.input.png and
    KEY.target.png).
    shards: shard.py's --min-shards (a split smaller than it gets one shard per pair).
    Keys are "train_000", "val_000", ...: unique across splits. PNG, so the discs are
    bit-exact in the shards."""
    if layout not in ("pair", "separate"):
        raise ValueError(f"layout {layout!r}: 'pair' or 'separate'")
    sizes = [tuple(size)] if isinstance(size[0], int) else [tuple(s) for s in size]
    if any(min(s) < 8 for s in sizes):
        raise ValueError(f"sizes {sizes}: each side at least 8 pixels, so a disc fits")
    dest = Path(folder)
    pairs = WidePairs(str(dest), layout)
    with tempfile.TemporaryDirectory(prefix="wide_pairs_") as source:
        for split, n in (("train", count), ("val", val_count)):
            pairs.discs[split] = {}
            for i in range(n):
                key, stored = f"{split}_{i:03d}", sizes[i % len(sizes)]
                disc = pick_disc(key, stored)
                a = disc_image(stored, disc)
                b = 255 - a
                if layout == "pair":
                    _save(Path(source, split, f"{key}.png"), np.concatenate([a, b], axis=1))
                else:
                    _save(Path(source, "A", split, f"{key}.png"), a)
                    _save(Path(source, "B", split, f"{key}.png"), b)
                pairs.discs[split][key], pairs.sizes[key] = disc, stored
        code = shard.main([source, str(dest), "--workers", "1", "--min-shards", str(shards),
                           "--layout", "aligned" if layout == "pair" else "folders", "--quiet"])
    if code != 0:
        raise RuntimeError(f"shard.py exited {code} packing the wide pairs into {dest}")
    return pairs


def extent(mask) -> tuple[int, int]:
    """(width, height) in pixels of the rows and columns a boolean H x W mask (a torch or
    numpy array) touches: 0 x 0 for an empty one."""
    mask = np.asarray(mask, dtype=bool)
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    if not cols.size:
        return 0, 0
    return int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def centre(mask) -> tuple[float, float]:
    """(x, y) of a boolean H x W mask's centroid, in pixel coordinates (a pixel's centre
    is at +0.5), as Disc writes them; nan when the mask is empty."""
    mask = np.asarray(mask, dtype=bool)
    rows, cols = np.nonzero(mask)
    if not rows.size:
        return math.nan, math.nan
    return float(cols.mean() + 0.5), float(rows.mean() + 0.5)


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
