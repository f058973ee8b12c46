"""Translate images with a trained generator: image files, folders or shards -> PNGs.

    python pipeline/translate.py --checkpoint RUN/checkpoints/step_N a.jpg photos/ s3://b/shards --out DIR

Any image size: an image is padded by reflection to a multiple of the generator's size
multiple (2**num_downs for a U-Net, which halves it num_downs times; 4 for a ResNet),
translated whole and cropped back; an image above
--max-whole-pixels is translated in overlapping tiles (>= 25% overlap) blended with a
raised-cosine window, so memory stays bounded by the tile batch (4096x4096 on a CPU).

Test-time behaviour is a choice, not a default hidden in the code:
  --dropout on  --norm-stats batch     the paper's protocol (train-mode U-Net: dropout
                                       noise, each image normalised by its own statistics;
                                       runs one image per forward); the default, and what
                                       the trainer's val metrics measure
  --dropout off --norm-stats running   plain eval(): deterministic, batched, and what the
                                       exports (torch.export, ONNX) compute; use it for
                                       tiled images, whose tiles would otherwise each get
                                       their own statistics and dropout masks
Direction (which half of a shard's pair is the input) and channel counts come from the
checkpoint's generator.json. A file that cannot be read or decoded is reported and
skipped; the others are still translated (exit code 2 when anything was skipped).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import cli, precision, storage
from pipeline.checkpoint import load_generator
from pipeline.config import DataConfig
from pipeline.data import (
    IMAGE_EXTS,
    MAX_IMAGE_PIXELS,
    BadSample,
    Skip,
    decode_image,
    list_shards,
    read_entries,
    to_unit_range,
    try_decode,
)
from pipeline.data.format import is_image_name
from pipeline.errors import DataError, UserError
from pipeline.evaluate import save_png, to_uint8
from pipeline.models import set_test_mode, size_multiple

log = logging.getLogger(__name__)
Forward = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- geometry

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


def make_forward(generator: torch.nn.Module, device: torch.device, bf16: bool) -> Forward:
    """[-1, 1] float CPU batch -> float CPU output, on `device`, in bf16 if asked."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            return generator(x.to(device)).float().cpu()
    return forward


# --------------------------------------------------------------------------- inputs

def is_shards(spec: str) -> bool:
    return (spec.endswith((".tar", "manifest.json")) or "{" in spec
            or storage.exists(storage.join(spec, "manifest.json")))


def image_files(spec: str) -> list[tuple[str, str]]:
    """(url, output name) of an image file, or of every image below a folder/prefix (the
    name keeps the path inside the folder, so equal file names in sub-folders differ)."""
    if is_image_name(spec):
        if not storage.exists(spec):
            raise DataError(f"{spec}: no such file")
        return [(spec, os.path.basename(spec))]
    root = spec.rstrip("/") + "/"
    urls = [u for u in storage.list_files(spec) if is_image_name(u)]
    if not urls:
        raise DataError(f"{spec}: no image file ({', '.join(IMAGE_EXTS)}), shard "
                                "or manifest.json there")
    return [(u, u[len(root):] if u.startswith(root) else os.path.basename(u)) for u in urls]


def plan_inputs(specs: list[str], split: str) -> tuple[list, list, int]:
    """(image files [(url, name)], shard lists, image count), names checked unique."""
    files, shard_lists = [], []
    for spec in specs:
        if is_shards(spec):
            shard_lists.append(list_shards(spec, split))
        else:
            files += image_files(spec)
    names = Counter(output_name(name) for _, name in files)
    clashes = [name for name, count in names.items() if count > 1]
    if clashes:
        raise UserError(f"several inputs would write {clashes[0]}: give their folder "
                         "instead of the files, or translate them separately")
    total = len(files) + sum(s.samples for shards in shard_lists for s in shards)
    return files, shard_lists, total


def check_out(out: str, specs: list[str], files: list[tuple[str, str]]) -> None:
    """--out never inside an input folder (its translations would mix with the inputs, or
    replace those that are PNGs), and no output path that is an input file."""
    for spec in specs:
        if not is_image_name(spec) and not spec.endswith(".tar") and "{" not in spec \
                and storage.contains(spec, out):
            raise UserError(f"--out {out} is inside the input folder {spec}: give an output "
                            "folder outside every input")
    inputs = {url for url, _ in files}
    clash = next((name for _, name in files if storage.join(out, output_name(name)) in inputs), None)
    if clash:
        raise UserError(f"--out {out}: {output_name(clash)} would replace the input file of that "
                        "name: give another output folder")


def existing_outputs(out: str) -> set[str]:
    """The output names (relative to --out) already there: complete files, each written
    atomically by an earlier run."""
    if not storage.exists(out):
        return set()
    root = out.rstrip("/") + "/"
    return {url[len(root):] for url in storage.list_files(out) if url.startswith(root)}


def output_name(name: str) -> str:
    return name.rsplit(".", 1)[0] + ".png"


def is_pair_image(pixels: np.ndarray, split_pair: str) -> bool:
    """--split-pair: auto takes an image exactly twice as wide as high for an A|B pair
    (input and target side by side, the reference's aligned layout, as in its datasets)."""
    height, width = pixels.shape[:2]
    return split_pair == "yes" or split_pair == "auto" and width == 2 * height


def input_half(pixels: np.ndarray, direction: str) -> np.ndarray:
    """The half of an A|B image the generator takes: A (left) for AtoB, B for BtoA."""
    half = pixels.shape[1] // 2
    return pixels[:, :half] if direction == "AtoB" else pixels[:, half:]


def read_images(files: list, shard_lists: list, meta: dict, max_pixels: int,
                split_pair: str = "auto") -> Iterator[tuple[str, np.ndarray | None, str | None]]:
    """(name, uint8 HxWxC network input, None) per image, or (name, None, reason) for one
    that cannot be used: bad data never raises out of here. An image file that is an A|B
    pair (is_pair_image) gives its input half; the count is logged at the end."""
    channels, pairs = meta["model"]["in_channels"], 0
    for url, name in files:
        pixels, reason = None, None
        try:
            pixels = decode_image(storage.read_bytes(url), url.rsplit(".", 1)[-1].lower(),
                                  channels, max_pixels)
            if is_pair_image(pixels, split_pair):
                pixels, pairs = input_half(pixels, meta["data"]["direction"]), pairs + 1
        except BadSample as bad:
            reason = bad.reason
        except (OSError, storage.StorageError) as err:
            reason = f"unreadable ({err})"
        except Exception as err:  # noqa: BLE001 - an unforeseen decoder failure is one bad file
            reason = f"decode_error ({type(err).__name__}: {err})"
        yield name, pixels, reason
    if pairs:
        side = "left (A)" if meta["data"]["direction"] == "AtoB" else "right (B)"
        log.info(f"translate.py: {pairs} image(s) were A|B pairs (width = 2 x height): translated "
                 f"their {side} half, the generator's input; --split-pair no translates them whole")
    cfg = DataConfig(direction=meta["data"]["direction"], max_image_pixels=max_pixels)
    for shards in shard_lists:
        for record in read_entries(shards):
            if isinstance(record, Skip):  # the rest of the shard is lost
                yield "(shard)", None, record.reason
                continue
            pair, reason = try_decode(record.key, record.parts, cfg, channels,
                                      meta["model"]["out_channels"])
            yield record.key, None if pair is None else pair[0], reason


# --------------------------------------------------------------------------- the loop

class Translator:
    """Images in, PNGs out: equal-sized small images batched whole, large ones tiled."""

    def __init__(self, forward: Forward, out: str, *, multiple: int, tile: int, overlap: int,
                 batch_size: int, max_whole_pixels: int, existing: set[str] = frozenset()):
        self.forward, self.out, self.multiple = forward, out, multiple
        self.tile, self.overlap, self.batch_size = tile, overlap, batch_size
        self.max_whole_pixels = max_whole_pixels
        self.pending: list[tuple[str, torch.Tensor]] = []
        self.done, self.tiled, self.kept, self.skipped = 0, 0, 0, Counter()
        self.existing, self.taken = existing, set()  # outputs there before, names of this run

    def wanted(self, name: str) -> bool:
        """False for an output already there (kept, counted) or one this run already
        wrote for another input of the same name (skipped, counted: never overwritten)."""
        if output_name(name) in self.taken:
            self.skip(name, "duplicate_name (an earlier input has the same name; translate "
                            "them into separate --out folders)")
            return False
        self.taken.add(output_name(name))
        if output_name(name) in self.existing:
            self.kept += 1
            return False
        return True

    def add(self, name: str, pixels: np.ndarray) -> None:
        image = to_unit_range(torch.from_numpy(pixels).permute(2, 0, 1)[None])
        if image.shape[-2] * image.shape[-1] > self.max_whole_pixels:
            self.tiled += 1
            output = run_tiled(self.forward, image, self.tile, self.overlap, self.batch_size)
            self.write(name, output)
            return
        if self.pending and self.pending[0][1].shape != image.shape:
            self.flush()
        self.pending.append((name, image))
        if len(self.pending) == self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        names, images = zip(*self.pending)
        self.pending = []
        for name, output in zip(names, run_whole(self.forward, torch.cat(images), self.multiple)):
            self.write(name, output[None])

    def write(self, name: str, output: torch.Tensor) -> None:
        pixels = to_uint8(output)[0].permute(1, 2, 0).numpy()
        if pixels.shape[2] == 1:  # PIL takes grayscale as H x W
            pixels = pixels[..., 0]
        save_png(storage.join(self.out, output_name(name)), pixels)
        self.done += 1

    def skip(self, name: str, reason: str) -> None:
        tqdm.write(f"translate.py: skipped {name}: {reason}", file=sys.stderr)  # under the bar
        self.skipped[reason.split(" (")[0]] += 1


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.Parser(
        prog="translate.py", description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files, folders of images, or shards "
                        "(a folder/prefix with manifest.json, a .tar, a brace pattern); local or s3://")
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint step_N folder, run folder (latest checkpoint), a marker "
                             "(RUN/checkpoints/best or latest) or export folder")
    parser.add_argument("--out", required=True, help="output folder (local or s3://): NAME.png per input")
    parser.add_argument("--split", default="val", help="manifest split to read from shards (default: val)")
    parser.add_argument("--dropout", choices=("on", "off"), default="on",
                        help="dropout at test time (default: on, as the paper)")
    parser.add_argument("--norm-stats", choices=("batch", "running"), default="batch",
                        help="BatchNorm statistics: each image's own (batch, the paper's; one "
                             "image per forward) or the running averages from training "
                             "(default: batch)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dropout masks (default: 0)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--bf16", action="store_true", help=precision.BF16_FLAG_HELP)
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images (equal-sized) or tiles per forward (default: 8)")
    parser.add_argument("--max-whole-pixels", type=int, default=2048 * 2048,
                        help="images with more pixels are tiled (0: tile every image; default: 2048*2048)")
    parser.add_argument("--tile", type=int, default=0,
                        help="tile side in pixels (default 0: twice the training crop)")
    parser.add_argument("--overlap", type=float, default=0.5,
                        help="tile overlap as a fraction of the tile, >= 0.25 (default: 0.5)")
    parser.add_argument("--max-pixels", type=int, default=MAX_IMAGE_PIXELS,
                        help="skip images with more pixels than this (decompression-bomb guard)")
    parser.add_argument("--split-pair", choices=("auto", "yes", "no"), default="auto",
                        help="image files holding input|target side by side: auto takes an image "
                             "exactly twice as wide as high for such a pair and translates its "
                             "input half (as shards of A|B pairs are read); yes: every image; no: "
                             "translate whole images (default: auto)")
    parser.add_argument("--overwrite", action="store_true",
                        help="translate again the inputs whose output is already in --out "
                             "(default: keep it and count it)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    cli.setup_logging()
    generator, meta = load_generator(args.checkpoint)
    multiple = size_multiple(meta["model"]["generator"])
    tile = args.tile or default_tile(meta["data"]["crop_size"], multiple)
    overlap = round(args.overlap * tile)
    check_tiling(tile, overlap, meta["data"]["crop_size"], multiple)
    files, shard_lists, total = plan_inputs(args.inputs, args.split)
    check_out(args.out, args.inputs, files)
    existing = set() if args.overwrite else existing_outputs(args.out)
    device = pick_device(args.device)
    mixed_precision, notice = precision.for_inference(args.bf16, device.type)
    if notice:
        log.warning(f"translate.py: {notice}")
    batch_stats = args.norm_stats == "batch"
    set_test_mode(generator.to(device), args.dropout == "on", batch_stats)
    torch.manual_seed(args.seed)
    # batch statistics mix the images of a batch: one per forward keeps them per image
    bf16 = mixed_precision == "bf16"
    translator = Translator(make_forward(generator, device, bf16), args.out, multiple=multiple,
                            tile=tile, overlap=overlap, batch_size=1 if batch_stats else args.batch_size,
                            max_whole_pixels=args.max_whole_pixels, existing=existing)
    log.info(f"translate.py: {total} images, {meta['model']['generator']} step {meta['step']} on "
             f"{device}{' bf16' if bf16 else ''}; dropout {args.dropout}, {args.norm_stats} "
             f"statistics; tiles {tile}px, overlap {overlap}px")
    with tqdm(total=total, unit="img", disable=args.quiet, dynamic_ncols=True) as bar:
        for name, pixels, reason in read_images(files, shard_lists, meta, args.max_pixels,
                                                args.split_pair):
            if reason is not None:
                translator.skip(name, reason)
            elif translator.wanted(name):
                translator.add(name, pixels)
            bar.update(1)
        translator.flush()
    skipped = sum(translator.skipped.values())
    kept = f"kept {translator.kept} already there (--overwrite redoes them); " if translator.kept else ""
    log.info(f"translate.py: wrote {translator.done} images to {args.out} ({translator.tiled} tiled); "
             f"{kept}skipped {skipped}{' ' + str(dict(translator.skipped)) if skipped else ''}")
    if skipped:
        raise DataError(f"{skipped} input(s) could not be translated "
                        f"({', '.join(f'{k} {n}' for k, n in translator.skipped.items())}); "
                        "the others were written")
    return 0


main = cli.entry_point("translate.py", _main)


if __name__ == "__main__":
    sys.exit(main())
