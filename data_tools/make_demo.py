"""Make the built-in demo dataset: synthetic facades, on the spot, no download.

Each sample is a label map (input, left) beside its rendering (target, right) in the
reference's aligned A|B layout, like the real facades set: rows of windows, a door,
balconies and ornaments over a wall. The rendering is a fixed function of the labels
with structure at several scales (per-class colour, per-class texture, soft outlines,
one global light), so pix2pix can learn it in a few hundred steps.

    python data_tools/make_demo.py demo_data            # train/ and val/ folders

A run that finishes leaves DEST/.make_demo.json (hidden: shard.py lists no dot files)
with its parameters and each file's digest; a run with the same parameters that finds
every file as recorded says so in one line and writes nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys

import numpy as np
import PIL
from PIL import Image
from tqdm import tqdm

from pipeline import cli

# class -> (label colour in the input, base colour of the rendering)
CLASSES = {
    "wall": ((40, 40, 180), (196, 170, 140)),
    "window": ((0, 120, 255), (60, 80, 110)),
    "door": ((255, 160, 0), (110, 60, 30)),
    "balcony": ((200, 255, 60), (170, 170, 175)),
    "ornament": ((255, 60, 60), (230, 215, 190)),
    "sill": ((0, 255, 200), (240, 240, 235)),
}
NAMES = list(CLASSES)
STAMP = ".make_demo.json"
VERSION = 1  # of the generator: raise it when make_pair's pixels change


def layout(rng: np.random.Generator, size: int) -> np.ndarray:
    """A label map (class index per pixel): a facade with rows of windows."""
    labels = np.zeros((size, size), np.uint8)
    rows, cols = rng.integers(2, 5), rng.integers(2, 6)
    cell_h, cell_w = size // (rows + 1), size // cols
    win_h, win_w = int(cell_h * rng.uniform(0.45, 0.7)), int(cell_w * rng.uniform(0.35, 0.6))
    for r in range(rows):
        top = r * cell_h + (cell_h - win_h) // 2
        if rng.random() < 0.4:  # a balcony under the whole row
            labels[top + win_h: top + win_h + cell_h // 8, :] = NAMES.index("balcony")
        for c in range(cols):
            left = c * cell_w + (cell_w - win_w) // 2
            labels[top:top + win_h, left:left + win_w] = NAMES.index("window")
            labels[top + win_h:top + win_h + 3, left - 2:left + win_w + 2] = NAMES.index("sill")
    door_w = int(size * rng.uniform(0.12, 0.2))
    door_left = int(rng.integers(0, size - door_w))
    labels[size - cell_h + cell_h // 5:, door_left:door_left + door_w] = NAMES.index("door")
    yy, xx = np.mgrid[:size, :size]
    for _ in range(rng.integers(0, 4)):  # small round ornaments between windows
        cy, cx, radius = rng.integers(0, size, 2).tolist() + [int(rng.integers(4, 10))]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2
        labels[disc & (labels == 0)] = NAMES.index("ornament")
    return labels


def texture(labels: np.ndarray) -> np.ndarray:
    """Per-class texture in [-1, 1], anchored to pixel positions so it is predictable."""
    size = labels.shape[0]
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    bricks = np.sign(np.sin(yy * np.pi / 6)) * np.sign(np.sin((xx + 6 * (yy // 6 % 2)) * np.pi / 12))
    patterns = {
        "wall": 0.5 * bricks,
        "window": np.sin((xx + yy) * np.pi / 16),  # a reflection gradient
        "door": np.sin(xx * np.pi / 4),  # vertical planks
        "balcony": np.sign(np.sin(xx * np.pi / 5)),  # railings
        "ornament": np.zeros_like(xx),
        "sill": np.zeros_like(xx),
    }
    out = np.zeros_like(xx)
    for index, name in enumerate(NAMES):
        out[labels == index] = patterns[name][labels == index]
    return out


def render(labels: np.ndarray) -> np.ndarray:
    """The target image for a label map: colour x texture x light, with dark outlines."""
    size = labels.shape[0]
    base = np.array([CLASSES[name][1] for name in NAMES], np.float32)[labels]
    image = base * (1.0 + 0.18 * texture(labels))[..., None]
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    image *= (1.15 - 0.35 * (0.6 * yy + 0.4 * xx))[..., None]  # light from the top left
    edges = np.zeros((size, size), bool)
    edges[1:, :] |= labels[1:, :] != labels[:-1, :]
    edges[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    image[edges] *= 0.35
    return np.clip(image, 0, 255).astype(np.uint8)


def make_pair(seed: int, split: str, index: int, size: int) -> np.ndarray:
    """One aligned sample, input|target side by side, deterministic in its arguments."""
    rng = np.random.default_rng([seed, sum(map(ord, split)), index])
    labels = layout(rng, size)
    colours = np.array([CLASSES[name][0] for name in NAMES], np.uint8)[labels]
    return np.concatenate([colours, render(labels)], axis=1)


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG" if fmt == "jpg" else "PNG",
                                 **({"quality": 95} if fmt == "jpg" else {}))
    return buffer.getvalue()


def write_split(out_dir: str, split: str, count: int, seed: int, size: int, fmt: str) -> dict:
    """Writes the split's images; returns {path relative to out_dir: sha256}."""
    split_dir = os.path.join(out_dir, split)
    os.makedirs(split_dir, exist_ok=True)
    digests = {}
    for index in tqdm(range(count), desc=f"demo {split}", unit="pair", leave=False):
        data = encode(make_pair(seed, split, index, size), fmt)
        _write(os.path.join(split_dir, f"{index}.{fmt}"), data)
        digests[f"{split}/{index}.{fmt}"] = hashlib.sha256(data).hexdigest()
    return digests


def _write(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:  # aside, then rename: no half-written files
        f.write(data)
    os.replace(path + ".tmp", path)


def already_made(out_dir: str, parameters: dict) -> bool:
    """Whether out_dir holds what a run with these parameters writes: a finished run's
    stamp with the same parameters, and every file it lists with the same digest."""
    try:
        with open(os.path.join(out_dir, STAMP)) as f:
            stamp = json.load(f)
        if stamp["parameters"] != parameters:
            return False
        for rel, digest in stamp["files"].items():
            with open(os.path.join(out_dir, rel), "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != digest:
                    return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


def _main(argv: list[str]) -> int:
    parser = cli.Parser(
        prog="make_demo.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("out_dir", help="folder to write train/ and val/ into")
    parser.add_argument("--train", type=int, default=320, help="training pairs")
    parser.add_argument("--val", type=int, default=64, help="validation pairs")
    parser.add_argument("--size", type=int, default=256, help="height and width of each half")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg", help="image format")
    args = parser.parse_args(argv)
    if args.size < 32:
        parser.error(f"--size must be >= 32, got {args.size}")
    what = (f"{args.train} train + {args.val} val pairs ({2 * args.size} wide x {args.size} "
            f"high: input | target, {args.format})")
    parameters = {"version": VERSION, "pillow": PIL.__version__, "train": args.train,
                  "val": args.val, "size": args.size, "seed": args.seed, "format": args.format}
    if already_made(args.out_dir, parameters):
        print(f"demo data: {args.out_dir} already holds these {what}; nothing written")
        return 0
    os.makedirs(args.out_dir, exist_ok=True)
    stamp = os.path.join(args.out_dir, STAMP)
    if os.path.exists(stamp):
        os.remove(stamp)  # first: a run cut short must not look finished
    files = {}
    for split, count in (("train", args.train), ("val", args.val)):
        files.update(write_split(args.out_dir, split, count, args.seed, args.size, args.format))
    _write(stamp, (json.dumps({"parameters": parameters, "files": files}, indent=1) + "\n").encode())
    print(f"demo data: {what} in {args.out_dir}")
    return 0


main = cli.entry_point("make_demo.py", _main)


if __name__ == "__main__":
    sys.exit(main())
