"""Export a trained generator for use without this code base's trainer.

    python pipeline/export.py --checkpoint RUN/checkpoints/step_N --out DIR \
        [--format safetensors,torch-export,onnx]

Formats (all in eval mode: dropout off, BatchNorm running statistics; the graph exports
cannot switch that at run time, the safetensors export can):
  safetensors    DIR/generator.safetensors + DIR/generator.json: the weights and the
                 model config; pipeline.checkpoint.load_generator(DIR) rebuilds it
  torch-export   DIR/generator.pt2 (torch.export.save): load with torch.export.load,
                 call .module()(x); batch, height and width are dynamic
  onnx           DIR/generator.onnx (opset 18, the same dynamic axes; the run's data
                 settings in its metadata), checked against PyTorch with onnxruntime
                 when it is installed (pip install '.[export]')
Input x: N x in_channels x H x W float32 in [-1, 1] (RGB or gray), output y the same
layout and range with out_channels. Any H and W: the graphs reflect-pad to the
generator's size multiple inside (2**num_downs for a U-Net, 4 for a ResNet, 16 global, 32
local) and crop back, as p2p-translate does, since a user's first image is rarely a
multiple. They take images as given: resize each to the run's scale first, the eval size
of its geometry (data.preprocess in generator.json and the ONNX metadata: crop_size x
crop_size for resize_and_crop, width load_size keeping the aspect for scale_width, ...),
as its validation and p2p-translate do. docs/export.md: how to call them, with an
onnxruntime example that does.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import logging
import sys
import warnings
from collections.abc import Iterator

import torch
import torch.fx.experimental._config as shape_config

from pipeline import cli, storage, weights
from pipeline.checkpoint import load_generator
from pipeline.data import PREPROCESS
from pipeline.errors import RunError, UserError
from pipeline.models import size_multiple
from pipeline.run_folder import check_out_folder
from pipeline.translate_geometry import AnySize, run_geometry, scale_phrase
from pipeline.weights import GeneratorInfo

log = logging.getLogger(__name__)


def prog() -> str:
    """The name the user called this tool by: p2p-export or export.py."""
    return cli.prog_name("export.py")


FORMATS = ("safetensors", "torch-export", "onnx")
NEEDS = {"onnx": ("onnx", "onnxscript")}  # packages a format needs beyond the base install
ONNX_TOLERANCE = 1e-4  # max |onnxruntime - PyTorch| accepted (measured ~1e-6 in fp32)


def example_input(info: GeneratorInfo, multiple: int, batch: int = 2, tiles: tuple = (2, 3)) -> torch.Tensor:
    """A non-square example, so that H and W are traced as separate dimensions."""
    h, w = (multiple * t for t in tiles)
    return torch.rand(batch, info.model.in_channels, h, w) * 2 - 1


MAX_SIDE = 16384  # pixels: the exported programs take any height and width up to this


def smallest_side(generator: torch.nn.Module, info: GeneratorInfo) -> int:
    """The smallest height and width the padded generator takes: 1 for a U-Net (it halves
    a multiple down to 1 x 1); the ResNets' residual blocks reflect-pad 1 px (and instance
    norm needs 2 px), so they need two multiples: sides above one multiple."""
    multiple, channels = size_multiple(info.model.generator), info.model.in_channels
    for k in (1, 2, 3, 4):
        try:
            with torch.no_grad():
                generator(torch.zeros(1, channels, k * multiple, k * multiple))
            return (k - 1) * multiple + 1
        except (RuntimeError, ValueError):  # a pad or a norm with too few pixels
            continue
    raise RunError(f"the generator takes no square of up to 4 x {multiple} px: cannot export it")


def dynamic_shapes(smallest: int = 1) -> dict:
    side = {"min": smallest, "max": MAX_SIDE}
    return {"x": {0: torch.export.Dim("batch", min=1, max=1024),
                  2: torch.export.Dim("height", **side), 3: torch.export.Dim("width", **side)}}


def any_size(generator: torch.nn.Module, info: GeneratorInfo) -> AnySize:
    """The generator behind the in-graph padding to its size multiple (AnySize)."""
    return AnySize(generator, size_multiple(info.model.generator)).eval()


def export_safetensors(generator: torch.nn.Module, info: GeneratorInfo, out: str) -> None:
    weights.write_generator(out, generator.state_dict(), info)


def export_program(generator: torch.nn.Module, info: GeneratorInfo, out: str,
                   smallest: int | None = None) -> torch.export.ExportedProgram:
    multiple, smallest = size_multiple(info.model.generator), smallest or smallest_side(generator, info)
    # size-oblivious: else a size-1 bottleneck (H or W = 2**num_downs) is guarded out
    with shape_config.patch(backed_size_oblivious=True):
        program = torch.export.export(any_size(generator, info), (example_input(info, multiple),),
                                      dynamic_shapes=dynamic_shapes(smallest))
    path = storage.join(out, "generator.pt2")
    storage.makedirs(out)
    torch.export.save(program, path)
    return program


# what torch.onnx.export says that is no news to the user: the torchlib registry's four
# lines for torchvision's ops when torchvision is not installed (the base install), and
# torch 2.13's FutureWarning from its own deep copy of a pytree LeafSpec
TORCHVISION_SKIP = "torchvision is not installed. Skipping torchvision::"
LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
REGISTRY_LOGGER = "torch.onnx._internal.exporter._registration"


class _DropTorchvisionSkips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(TORCHVISION_SKIP)


@contextlib.contextmanager
def exporter_quiet() -> Iterator[None]:
    """Silence exactly those messages (TORCHVISION_SKIP, LEAFSPEC_WARNING) for the block."""
    logger, drop = logging.getLogger(REGISTRY_LOGGER), _DropTorchvisionSkips()
    logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=LEAFSPEC_WARNING, category=FutureWarning)
            yield
    finally:
        logger.removeFilter(drop)


def onnx_metadata(info: GeneratorInfo, smallest: int) -> dict[str, str]:
    """The run's settings a caller of the ONNX file needs, as its metadata_props."""
    model, data = info.model, dataclasses.asdict(info.data)
    return {"generator": model.generator, "step": str(info.step),
            "in_channels": str(model.in_channels), "out_channels": str(model.out_channels),
            "size_multiple": str(size_multiple(model.generator)), "min_side": str(smallest),
            "value_range": "-1,1", **{k: str(v) for k, v in data.items() if v is not None}}


def export_onnx(generator: torch.nn.Module, info: GeneratorInfo, out: str,
                smallest: int | None = None) -> float | None:
    """Writes generator.onnx; returns max |onnxruntime - PyTorch| on an example input of
    an odd size (None when onnxruntime is not installed)."""
    multiple, smallest = size_multiple(info.model.generator), smallest or smallest_side(generator, info)
    model, path = any_size(generator, info), storage.join(out, "generator.onnx")
    storage.makedirs(out)
    with exporter_quiet():
        program = torch.onnx.export(model, (example_input(info, multiple),), dynamo=True,
                                    dynamic_shapes=dynamic_shapes(smallest), input_names=["x"],
                                    output_names=["y"], opset_version=18, verbose=False)
    program.model.metadata_props.update(onnx_metadata(info, smallest))
    graph = program.model.graph
    x_shape, y_shape = graph.inputs[0].shape, graph.outputs[0].shape  # y's H, W named as x's
    graph.outputs[0].shape = type(y_shape)([x_shape[0], y_shape[1], x_shape[2], x_shape[3]])
    program.save(path, external_data=False)
    return check_onnx(model, path, info.model.in_channels, multiple, smallest)


def check_onnx(model: torch.nn.Module, path: str, channels: int, multiple: int,
               smallest: int) -> float | None:
    """max |onnxruntime - PyTorch| on 3 images of other sizes than traced, neither side a
    multiple (the in-graph padding is checked too); None without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    h = smallest + multiple - 2
    x = torch.rand(3, channels, h, h + multiple) * 2 - 1
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (onnx_output,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        return (torch.from_numpy(onnx_output) - model(x)).abs().max().item()


def interface(info: GeneratorInfo, smallest: int) -> str:
    """One line on how to call the graph exports, with the run's scale: the graphs take
    any size, so nothing else tells the caller which one the generator learnt."""
    model, multiple = info.model, size_multiple(info.model.generator)
    colours = {1: "gray", 3: "RGB"}
    sides = "any H and W" + (f" >= {smallest}" if smallest > 1 else "")
    geometry = run_geometry(info.data, multiple)
    scale = f"; the run's scale: inputs {scale_phrase(geometry)} (data.preprocess " \
            f"{geometry.preprocess})" if geometry and geometry.preprocess in PREPROCESS else ""
    return (f"input x: N x {model.in_channels} ({colours.get(model.in_channels, 'channels')}) "
            f"x H x W float32 in [-1, 1], {sides} (reflect-padded inside to multiples of "
            f"{multiple}); output y: N x {model.out_channels} x H x W in [-1, 1]{scale}"
            " (docs/export.md)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = cli.Parser(prog="export.py", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint step_N folder, run folder (latest checkpoint), a marker "
                             "(RUN/checkpoints/best or latest) or export folder")
    parser.add_argument("--out", required=True, help="local folder for the exports")
    parser.add_argument("--format", default="",
                        help=f"comma-separated subset of {','.join(FORMATS)} (default: every "
                             "format the installed packages allow; onnx needs pip install -e '.[export]')")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.format.split(",")) - set(FORMATS)) if args.format else []
    if unknown:
        parser.error(f"unknown format {unknown[0]!r}: choose from {', '.join(FORMATS)}")
    return args


def missing_packages(fmt: str) -> list[str]:
    return [name for name in NEEDS.get(fmt, ()) if importlib.util.find_spec(name) is None]


def choose_formats(asked: str) -> list[str]:
    """The formats to write: those asked for (a missing package is a user error), or by
    default every format whose packages are installed, saying in one line what was left out."""
    if asked:
        formats = asked.split(",")
        for fmt in formats:
            if missing := missing_packages(fmt):
                raise UserError(f"--format {fmt} needs {', '.join(missing)}: pip install -e '.[export]'")
        return formats
    formats = [fmt for fmt in FORMATS if not missing_packages(fmt)]
    for fmt in sorted(set(FORMATS) - set(formats)):
        log.warning(f"{prog()}: skipped {fmt}: {', '.join(missing_packages(fmt))} not installed "
                    "(pip install -e '.[export]' brings it)")
    return formats


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    cli.setup_logging()
    check_out_folder(args.out)
    formats = choose_formats(args.format)
    generator, info = load_generator(args.checkpoint)
    torch.manual_seed(0)
    if "safetensors" in formats:
        export_safetensors(generator, info, args.out)
        log.info(f"{prog()}: {storage.join(args.out, 'generator.safetensors')} + generator.json")
    smallest = smallest_side(generator, info) if {"torch-export", "onnx"} & set(formats) else 1
    if "torch-export" in formats:
        export_program(generator, info, args.out, smallest)
        log.info(f"{prog()}: {storage.join(args.out, 'generator.pt2')} (torch.export)")
    if "onnx" in formats:
        error = export_onnx(generator, info, args.out, smallest)
        check = "onnxruntime not installed: unchecked" if error is None else \
            f"onnxruntime vs PyTorch max |diff| {error:.2e} (tolerance {ONNX_TOLERANCE:.0e})"
        log.info(f"{prog()}: {storage.join(args.out, 'generator.onnx')}; {check}")
        if error is not None and error > ONNX_TOLERANCE:
            raise RunError(f"the ONNX export does not match PyTorch (max |diff| {error:.2e})")
    if {"torch-export", "onnx"} & set(formats):
        log.info(f"{prog()}: {interface(info, smallest)}")
    return 0


main = cli.entry_point("export.py", _main)


if __name__ == "__main__":
    sys.exit(main())
