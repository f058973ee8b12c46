"""A GPU memory estimate for a config, from parameter, optimiser and activation sizes, with
no GPU and no real tensors (the models run on torch's meta device):

    python benchmarks/estimate_memory.py --config configs/hd_512.yaml [--size 1024] [--batch 1]
    python benchmarks/estimate_memory.py --config configs/hd_2048x1024.yaml --image 2048x1024

Sizes are WxH, width first, as the manifest writes them (2048x1024 is 2048 wide, 1024
high), or one number for a square. The size the networks see is --size if given, else
what the config's data.preprocess makes of a stored --image (scale_width brings a
2048x1024 image to load_size wide, aspect kept), else the config's crop (crop_size x
crop_height); the modes without a crop need --image or --size, as their size is the
image's.

Per process under DDP: fp32 weights, gradients and Adam's two moments for G and D (16 bytes
a parameter), the EMA of G (4 bytes) when train.ema_decay is on, and the activations a
step keeps for backward, counted as every leaf module's output (2 bytes an element under
bf16, 4 in fp32): G's forward once, D's on the fake and the real pair in the D update and
on the fake again in the G update. It leaves out what a measurement would include (the
CUDA context, ~0.5 GiB; allocator fragmentation; cuDNN workspaces; DDP's gradient buckets,
about the gradients' size again), so read it as a floor, and check it with a real run
(`bench_memory.py` measures the CPU's resident peak, `gpu_check.sh` a GPU's).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.report import report  # noqa: E402
from pipeline.config import from_cli  # noqa: E402
from pipeline.data.augmentation import Geometry  # noqa: E402
from pipeline.data.format import parse_size, size_name  # noqa: E402
from pipeline.models import build_discriminator, build_generator  # noqa: E402

GiB = 2 ** 30


def size_arg(text: str) -> tuple[int, int]:
    """A --size / --image value: WxH (width first, the manifest's way) or N (N x N) ->
    (height, width), as tensors are laid out. Shared by bench_train and bench_memory, so
    that a size means one thing in every benchmark."""
    try:
        height, width = parse_size(text) if "x" in text else (int(text), int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WxH (width first, e.g. 2048x1024) "
                                         "or one side") from None
    if min(height, width) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: sides must be at least 1")
    return height, width


def network_size(cfg, size: tuple[int, int] | None, image: tuple[int, int] | None) -> tuple[int, int]:
    """(h, w) the networks see: --size, else the config's geometry applied to --image, else
    its crop. The uncropped modes have no size of their own: refused in one line."""
    geometry = Geometry.of(cfg.data, cfg.model.size_multiple)
    if size:
        return size
    if image:
        return geometry.train_size(image)
    if not geometry.crops:
        raise SystemExit(f"estimate_memory.py: data.preprocess={geometry.preprocess} trains at "
                         "each image's own size: give --image WxH (a stored size) or --size WxH")
    return geometry.crop


def activation_elements(model: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """Elements of every leaf module's output in one forward (on the meta device), but
    the in-place ones'."""
    total = 0

    def count(module, args, output):
        nonlocal total
        outputs = output if isinstance(output, (list, tuple)) else [output]
        total += sum(o.numel() for o in outputs if isinstance(o, torch.Tensor))
    # in-place activations write over their input: no new memory
    leaves = [m for m in model.modules() if not list(m.children()) and not getattr(m, "inplace", False)]
    handles = [m.register_forward_hook(count) for m in leaves]
    with torch.no_grad():
        model(*inputs)
    for handle in handles:
        handle.remove()
    return total


def estimate(cfg, size: tuple[int, int], batch: int, bf16: bool) -> list[dict]:
    """The parts of one process's memory at `size` (h, w), in GiB."""
    with torch.device("meta"):
        G, D = build_generator(cfg.model), build_discriminator(cfg.model)
        x = torch.empty(batch, cfg.model.in_channels, *size)
        pair = torch.empty(batch, cfg.model.in_channels + cfg.model.out_channels, *size)
        g_act, d_act = activation_elements(G, x), activation_elements(D, pair)
    g_params, d_params = (sum(p.numel() for p in m.parameters()) for m in (G, D))
    element = 2 if bf16 else 4
    rows = [{"part": "G weights + grads + Adam (fp32)", "GiB": 16 * g_params / GiB},
            {"part": "D weights + grads + Adam (fp32)", "GiB": 16 * d_params / GiB},
            {"part": "G activations (one forward)", "GiB": element * g_act / GiB},
            {"part": "D activations (3 forwards a step)", "GiB": 3 * element * d_act / GiB}]
    if cfg.train.ema_decay > 0:
        rows.append({"part": "G's EMA (fp32)", "GiB": 4 * g_params / GiB})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a training config (YAML)")
    parser.add_argument("--size", type=size_arg, help="the size the networks see, WxH (width "
                        "first, e.g. 2048x1024) or N for N x N (default: from --image, else the "
                        "config's crop_size x crop_height)")
    parser.add_argument("--image", type=size_arg, help="a stored image size, WxH: the networks' "
                        "size is what the config's data.preprocess makes of it (needed for "
                        "scale_width and none, whose size is the image's)")
    parser.add_argument("--batch", type=int, default=0, help="per-process batch (default: the config's)")
    parser.add_argument("--fp32", action="store_true", help="activations in fp32 (default: bf16)")
    parser.add_argument("--generator", default="", help="override model.generator")
    args, overrides = parser.parse_known_args(argv)
    if args.generator:
        overrides.append(f"--model.generator={args.generator}")
    cfg, _ = from_cli(["--config", args.config, *overrides])
    size, batch = network_size(cfg, args.size, args.image), args.batch or cfg.data.batch_size
    rows = estimate(cfg, size, batch, not args.fp32)
    total = sum(r["GiB"] for r in rows)
    figures = {"config": args.config, "generator": cfg.model.generator,
               "discriminator": f"{cfg.model.discriminator} x {cfg.model.num_d}",
               "preprocess": cfg.data.preprocess, "image": args.image and size_name(*args.image),
               "size": size_name(*size),
               "batch": batch, "precision": "fp32" if args.fp32 else "bf16", "total_GiB": total,
               "fits_24GiB_floor": total < 24}
    report("estimate_memory", rows, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
