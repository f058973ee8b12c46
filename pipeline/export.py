"""Export a trained generator for use without this code base's trainer.

    python pipeline/export.py --checkpoint RUN/checkpoints/step_N --out DIR \
        [--format safetensors,torch-export,onnx]

Formats (all in eval mode: dropout off, BatchNorm running statistics; the graph exports
cannot switch that at run time, the safetensors export can):
  safetensors    DIR/generator.safetensors + DIR/generator.json: the weights and the
                 model config; pipeline.checkpoint.load_generator(DIR) rebuilds it
  torch-export   DIR/generator.pt2 (torch.export.save): load with torch.export.load,
                 call .module()(x); batch, height and width are dynamic (H and W
                 multiples of the generator's size multiple: 2**num_downs for a U-Net, 4 for a ResNet)
  onnx           DIR/generator.onnx (opset 18, the same dynamic axes), checked against
                 PyTorch with onnxruntime when it is installed (pip install '.[export]')
Inputs are N x in_channels x H x W floats in [-1, 1]; outputs the same range.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys

import torch
import torch.fx.experimental._config as shape_config

from pipeline import cli, storage, weights
from pipeline.checkpoint import load_generator
from pipeline.errors import RunError, UserError
from pipeline.models import size_multiple

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "torch-export", "onnx")
NEEDS = {"onnx": ("onnx", "onnxscript")}  # packages a format needs beyond the base install
ONNX_TOLERANCE = 1e-4  # max |onnxruntime - PyTorch| accepted (measured ~1e-6 in fp32)


def example_input(meta: dict, multiple: int, batch: int = 2, tiles: tuple = (2, 3)) -> torch.Tensor:
    """A non-square example, so that H and W are traced as separate dimensions."""
    h, w = (multiple * t for t in tiles)
    return torch.rand(batch, meta["model"]["in_channels"], h, w) * 2 - 1


MAX_SIDE = 16384  # pixels: the exported programs take any multiple of the size multiple up to this


def dynamic_shapes(multiple: int) -> dict:
    most = MAX_SIDE // multiple
    rows, cols = torch.export.Dim("rows", min=1, max=most), torch.export.Dim("cols", min=1, max=most)
    return {"x": {0: torch.export.Dim("batch", min=1, max=1024), 2: multiple * rows, 3: multiple * cols}}


def export_safetensors(generator: torch.nn.Module, meta: dict, out: str) -> None:
    weights.write_generator(out, generator.state_dict(), meta)


def export_program(generator: torch.nn.Module, meta: dict, out: str) -> torch.export.ExportedProgram:
    multiple = size_multiple(meta["model"]["generator"])
    # size-oblivious: else a size-1 bottleneck (H or W = 2**num_downs) is guarded out
    with shape_config.patch(backed_size_oblivious=True):
        program = torch.export.export(generator, (example_input(meta, multiple),),
                                      dynamic_shapes=dynamic_shapes(multiple))
    path = storage.join(out, "generator.pt2")
    storage.makedirs(out)
    torch.export.save(program, path)
    return program


def export_onnx(generator: torch.nn.Module, meta: dict, out: str) -> float | None:
    """Writes generator.onnx; returns max |onnxruntime - PyTorch| on an example input
    (None when onnxruntime is not installed)."""
    multiple = size_multiple(meta["model"]["generator"])
    path = storage.join(out, "generator.onnx")
    storage.makedirs(out)
    torch.onnx.export(generator, (example_input(meta, multiple),), path, dynamo=True,
                      dynamic_shapes=dynamic_shapes(multiple), input_names=["x"],
                      output_names=["y"], opset_version=18, external_data=False)
    try:
        import onnxruntime
    except ImportError:
        return None
    x = example_input(meta, multiple, batch=3, tiles=(1, 2))  # other shapes than traced
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (onnx_output,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        return (torch.from_numpy(onnx_output) - generator(x)).abs().max().item()


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
        log.warning(f"export.py: skipped {fmt}: {', '.join(missing_packages(fmt))} not installed "
                    "(pip install -e '.[export]' brings it)")
    return formats


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    cli.setup_logging()
    formats = choose_formats(args.format)
    generator, meta = load_generator(args.checkpoint)
    torch.manual_seed(0)
    if "safetensors" in formats:
        export_safetensors(generator, meta, args.out)
        log.info(f"export.py: {storage.join(args.out, 'generator.safetensors')} + generator.json")
    if "torch-export" in formats:
        export_program(generator, meta, args.out)
        log.info(f"export.py: {storage.join(args.out, 'generator.pt2')} (torch.export)")
    if "onnx" in formats:
        error = export_onnx(generator, meta, args.out)
        check = "onnxruntime not installed: unchecked" if error is None else \
            f"onnxruntime vs PyTorch max |diff| {error:.2e} (tolerance {ONNX_TOLERANCE:.0e})"
        log.info(f"export.py: {storage.join(args.out, 'generator.onnx')}; {check}")
        if error is not None and error > ONNX_TOLERANCE:
            raise RunError(f"the ONNX export does not match PyTorch (max |diff| {error:.2e})")
    return 0


main = cli.entry_point("export.py", _main)


if __name__ == "__main__":
    sys.exit(main())
