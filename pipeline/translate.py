"""Translate images with a trained generator: image files, folders or shards -> PNGs.

    python pipeline/translate.py --checkpoint RUN/checkpoints/step_N a.jpg photos/ s3://b/shards --out DIR

At the run's scale by default: a generator learns one scale of detail, so an input of
another size than the training images is, to it, another kind of picture (600 px
photos that training resized to 286 px, translated as they are, are at 2.1x its scale).
Each input (the input half of an A|B pair) is resized as the trainer's validation and
p2p-evaluate resize it, bicubic and antialiased to the eval size of the run's geometry
from the checkpoint's generator.json (data.preprocess: crop_size x crop_size for
resize_and_crop, the default and older files', a non-square input squashed as training
squashed it; width load_size keeping the aspect for scale_width, ...), so the output is
what evaluation measured; it is then resized back to the input's own size and shape.
--input-size asks for another scale: train (training's resize before its crops), native
(as it is) or N (N x N pixels), the last two with a warning; --output-size translated
keeps the output at the size it was translated at.

Any size: an image is padded by reflection to a multiple of the generator's size
multiple (2**num_downs for a U-Net, which halves it num_downs times; 4 for a ResNet),
translated whole and cropped back; an image above --max-whole-pixels (at --input-size
native or a large N) is translated in overlapping tiles (>= 25% overlap) blended with a
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
skipped; the others are still translated (exit code 2 when anything was skipped). Folders
are read by p2p-shard's policy: its image names (a TIFF, GIF or BMP is skipped and counted
as unsupported_format), the format from the bytes (a PNG named .jpg is a PNG), hidden
files (a name starting with '.') skipped and counted.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
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
    try_decode,
)
from pipeline.data.format import is_image_name, is_input_image_name, list_input_images
from pipeline.errors import DataError, UserError
from pipeline.evaluate import add_generator_options, save_png, to_uint8
from pipeline.models import set_test_mode, size_multiple
from pipeline.progress import Progress
from pipeline.run_folder import check_out_folder
from pipeline.translate_geometry import (
    Forward,
    InputScale,
    check_tiling,
    crop_side,
    default_tile,
    input_half,
    input_scale,
    is_pair_image,
    pair_rule,
    parse_input_size,
    resize_back,
    run_tiled,
    run_whole,
    to_network,
)
from pipeline.weights import GeneratorInfo

log = logging.getLogger(__name__)


def prog() -> str:
    """The name the user called this tool by: p2p-translate or translate.py."""
    return cli.prog_name("translate.py")



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


def image_files(spec: str, hidden: list) -> list[tuple[str, str]]:
    """(url, output name) of an image file, or of every image below a folder/prefix (the
    name keeps the path inside the folder, so equal file names in sub-folders differ), by
    shard.py's policy (format.list_input_images): a TIFF or GIF is an input, skipped and
    counted as unsupported_format once read; hidden files are appended to `hidden`."""
    if is_input_image_name(spec):
        if not storage.exists(spec):
            raise DataError(f"{spec}: no such file")
        return [(spec, os.path.basename(spec))]
    found = list_input_images(spec)
    hidden += [storage.join(spec, rel) for rel in found.hidden]
    if not found.images:
        also = f" ({len(found.hidden)} hidden ones skipped)" if found.hidden else ""
        raise DataError(f"{spec}: no image file ({', '.join(IMAGE_EXTS)}){also}, shard "
                        "or manifest.json there")
    return [(storage.join(spec, rel), rel) for rel in found.images]


def plan_inputs(specs: list[str], split: str, hidden: list | None = None) -> tuple[list, list, int]:
    """(image files [(url, name)], shard lists, image count), names checked unique (an
    unsupported format's name aside: it is skipped as such, or as a duplicate_name if it
    decodes after all); hidden files skipped are appended to `hidden`."""
    files, shard_lists = [], []
    for spec in specs:
        if is_shards(spec):
            shard_lists.append(list_shards(spec, split))
        else:
            files += image_files(spec, [] if hidden is None else hidden)
    names = Counter(output_name(name) for _, name in files if is_image_name(name))
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
        if not is_input_image_name(spec) and not spec.endswith(".tar") and "{" not in spec \
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


def read_images(files: list, shard_lists: list, info: GeneratorInfo, max_pixels: int,
                split_pair: str = "auto") -> Iterator[tuple[str, np.ndarray | None, str | None]]:
    """(name, uint8 HxWxC network input, None) per image, or (name, None, reason) for one
    that cannot be used: bad data never raises out of here. An image file that is an A|B
    pair (is_pair_image) gives its input half; the count is logged at the end."""
    channels, pairs, layout, size = info.model.in_channels, 0, info.data.layout, info.data.size
    if files and split_pair == "auto" and (layout == "mixed" or layout is None or
                                           layout == "pair" and not size):
        recorded = {"mixed": "records its training data as mixed A|B pairs and separate files",
                    "pair": "records A|B pairs but not their size (generator.json data.size)"
                    }.get(layout, "records no source layout (generator.json data.layout)")
        log.info(f"{prog()}: --split-pair auto: the run {recorded}: an image exactly twice as "
                 "wide as high is taken for an A|B pair (--split-pair yes/no decide instead)")
    for url, name in files:
        pixels, reason = None, None
        try:
            pixels = decode_image(storage.read_bytes(url), url.rsplit(".", 1)[-1].lower(),
                                  channels, max_pixels)
            if is_pair_image(pixels, split_pair, layout, size):
                if pixels.shape[1] < 2:
                    raise BadSample(f"cannot_split ({pixels.shape[1]} pixel wide: no input|target "
                                    "halves; --split-pair no translates it whole)")
                pixels, pairs = input_half(pixels, info.data.direction), pairs + 1
        except BadSample as bad:
            reason = bad.reason
        except (OSError, storage.StorageError) as err:
            reason = f"unreadable ({err})"
        except Exception as err:  # noqa: BLE001 - an unforeseen decoder failure is one bad file
            reason = f"decode_error ({type(err).__name__}: {err})"
        yield name, pixels, reason
    if pairs:  # a warning where no one asked for it: a photo would come out half as wide
        side = "left (A)" if info.data.direction == "AtoB" else "right (B)"
        say = log.info if split_pair == "yes" else log.warning
        say(f"{prog()}: {pairs} image(s) were taken for A|B pairs ({pair_rule(split_pair, layout, size)}): "
            f"translated their {side} half, the generator's input; --split-pair no "
            "translates them whole")
    cfg = DataConfig(direction=info.data.direction, max_image_pixels=max_pixels)
    for shards in shard_lists:
        for record in read_entries(shards):
            if isinstance(record, Skip):  # the rest of the shard is lost
                yield "(shard)", None, record.reason
                continue
            pair, reason = try_decode(record.key, record.parts, cfg, channels,
                                      info.model.out_channels)
            yield record.key, None if pair is None else pair[0], reason


# --------------------------------------------------------------------------- the loop

class Translator:
    """Images in, PNGs out: each resized to `scale`'s target for its size (None: as it
    is), equal-sized small images batched whole, large ones tiled; outputs resized back to
    their input's own size when `keep_size`."""

    def __init__(self, forward: Forward, out: str, *, multiple: int, tile: int, overlap: int,
                 batch_size: int, max_whole_pixels: int, existing: set[str] = frozenset(),
                 scale: InputScale = InputScale(None, ""), keep_size: bool = True):
        self.forward, self.out, self.multiple = forward, out, multiple
        self.tile, self.overlap, self.batch_size = tile, overlap, batch_size
        self.max_whole_pixels, self.scale, self.keep_size = max_whole_pixels, scale, keep_size
        self.pending: list[tuple[str, torch.Tensor, tuple | None]] = []
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
        back = pixels.shape[:2] if self.keep_size else None
        image = to_network(pixels, self.scale.target(pixels.shape[:2]))
        if image.shape[-2] * image.shape[-1] > self.max_whole_pixels:
            self.tiled += 1
            output = run_tiled(self.forward, image, self.tile, self.overlap, self.batch_size)
            self.write(name, output, back)
            return
        if self.pending and self.pending[0][1].shape != image.shape:
            self.flush()
        self.pending.append((name, image, back))
        if len(self.pending) == self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        names, images, sizes = zip(*self.pending)
        self.pending = []
        outputs = run_whole(self.forward, torch.cat(images), self.multiple)
        for name, output, back in zip(names, outputs, sizes):
            self.write(name, output[None], back)

    def write(self, name: str, output: torch.Tensor, back: tuple | None = None) -> None:
        """One output as NAME.png, first resized to `back` (H, W) when given."""
        pixels = to_uint8(resize_back(output, back) if back else output)[0].permute(1, 2, 0).numpy()
        if pixels.shape[2] == 1:  # PIL takes grayscale as H x W
            pixels = pixels[..., 0]
        save_png(storage.join(self.out, output_name(name)), pixels)
        self.done += 1

    def skip(self, name: str, reason: str) -> None:
        tqdm.write(f"{prog()}: skipped {name}: {reason}", file=sys.stderr)  # under the bar
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
    add_generator_options(parser)
    parser.add_argument("--out", required=True, help="output folder (local or s3://): NAME.png per input")
    parser.add_argument("--split", default="val", help="manifest split to read from shards (default: val)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--bf16", action="store_true", help=precision.BF16_FLAG_HELP)
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images (equal-sized) or tiles per forward (default: 8)")
    parser.add_argument("--max-whole-pixels", type=int, default=2048 * 2048,
                        help="images with more pixels are tiled (0: tile every image; default: 2048*2048)")
    parser.add_argument("--tile", type=int, default=0,
                        help="tile side in pixels (default 0: twice the training crop's larger side)")
    parser.add_argument("--overlap", type=float, default=0.5,
                        help="tile overlap as a fraction of the tile, >= 0.25 (default: 0.5)")
    parser.add_argument("--max-pixels", type=int, default=MAX_IMAGE_PIXELS,
                        help="skip images with more pixels than this (decompression-bomb guard)")
    parser.add_argument("--input-size", type=parse_input_size, default="eval", metavar="SIZE",
                        help="the scale inputs are translated at: eval, the run's (each input "
                             "resized to the eval size of the run's geometry in generator.json, "
                             "data.preprocess: crop_size x crop_size for resize_and_crop, width "
                             "load_size keeping the aspect for scale_width, ...; as the trainer's "
                             "validation and p2p-evaluate resize: the output is what they "
                             "measured); train: training's resize, the size its crops were cut "
                             "from; native: as it is (another scale than training's: a warning); "
                             "N: to N x N pixels (default: eval)")
    parser.add_argument("--output-size", choices=("input", "translated"), default="input",
                        help="input: each output resized back to its input's own size (default); "
                             "translated: as the generator gave it, at --input-size")
    parser.add_argument("--split-pair", choices=("auto", "yes", "no"), default="auto",
                        help="image files holding input|target side by side: auto follows the "
                             "run's recorded source layout (generator.json data.layout: pair, "
                             "an image with twice the aspect of its training halves is one; "
                             "separate, none is), else takes an image exactly "
                             "twice as wide as high for such a pair; a pair's input half is "
                             "translated (as shards of A|B pairs are read); yes: every image; no: "
                             "translate whole images (default: auto)")
    parser.add_argument("--overwrite", action="store_true",
                        help="translate again the inputs whose output is already in --out "
                             "(default: keep it and count it)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def make_translator(args: argparse.Namespace, generator: torch.nn.Module, info: GeneratorInfo,
                    total: int, existing: set[str]) -> Translator:
    """The Translator the options describe, the generator on its device and test mode;
    logs the scale (a warning when it is not the run's) and the run's settings."""
    multiple = size_multiple(info.model.generator)
    tile = args.tile or default_tile(crop_side(info.data), multiple)
    overlap = round(args.overlap * tile)
    check_tiling(tile, overlap, crop_side(info.data) if info.data.crop_size else multiple, multiple)
    scale = input_scale(info.data, multiple, args.input_size)
    keep_size = args.output_size == "input" and scale.rule is not None
    outputs = "outputs resized back to each input's own size" if keep_size else \
        "outputs kept at the size translated at" if scale.rule else "outputs at each input's own size"
    (log.warning if scale.other else log.info)(f"{prog()}: {scale.said}; {outputs}")
    device = pick_device(args.device)
    mixed_precision, notice = precision.for_inference(args.bf16, device.type)
    if notice:
        log.warning(f"{prog()}: {notice}")
    batch_stats, bf16 = args.norm_stats == "batch", mixed_precision == "bf16"
    set_test_mode(generator.to(device), args.dropout == "on", batch_stats)
    log.info(f"{prog()}: {total} images, {info.model.generator} step {info.step} on "
             f"{device}{' bf16' if bf16 else ''}; dropout {args.dropout}, {args.norm_stats} "
             f"statistics; tiles {tile}px, overlap {overlap}px")
    # batch statistics mix the images of a batch: one per forward keeps them per image
    return Translator(make_forward(generator, device, bf16), args.out, multiple=multiple,
                      tile=tile, overlap=overlap, batch_size=1 if batch_stats else args.batch_size,
                      max_whole_pixels=args.max_whole_pixels, existing=existing, scale=scale,
                      keep_size=keep_size)


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    cli.setup_logging()
    check_out_folder(args.out)
    generator, info = load_generator(args.checkpoint)
    hidden = []
    files, shard_lists, total = plan_inputs(args.inputs, args.split, hidden)
    check_out(args.out, args.inputs, files)
    if hidden:
        log.warning(f"{prog()}: skipped {len(hidden)} hidden image files (a name or folder starting "
                    f"with '.', as p2p-shard skips them; first: {hidden[0]})")
    existing = set() if args.overwrite else existing_outputs(args.out)
    translator = make_translator(args, generator, info, total, existing)
    torch.manual_seed(args.seed)
    bar = Progress(total, desc="translate", unit="image", enabled=not args.quiet)
    for name, pixels, reason in read_images(files, shard_lists, info, args.max_pixels, args.split_pair):
        if reason is not None:
            translator.skip(name, reason)
        elif translator.wanted(name):
            translator.add(name, pixels)
        bar.update(1)
    translator.flush()
    bar.close()
    skipped = sum(translator.skipped.values())
    kept = f"kept {translator.kept} already there (--overwrite redoes them); " if translator.kept else ""
    log.info(f"{prog()}: wrote {translator.done} images to {args.out} ({translator.tiled} tiled); "
             f"{kept}skipped {skipped}{' ' + str(dict(translator.skipped)) if skipped else ''}")
    if skipped:
        raise DataError(f"{skipped} input(s) could not be translated "
                        f"({', '.join(f'{k} {n}' for k, n in translator.skipped.items())}); "
                        "the others were written")
    return 0


main = cli.entry_point("translate.py", _main)


if __name__ == "__main__":
    sys.exit(main())
