"""The trainer's step as the benchmarks build it: variants (a precision plus options),
the config a variant means, seeded synthetic pairs, and the step itself. Shared by
bench_train, bench_peak and bench_scaling (each imports this, none imports another).
"""
from __future__ import annotations

import torch

OPTIONS = {"cl", "fused", "foreach", "compile", "mmap"}


def default_precision() -> str:
    """The precision the trainer runs on this machine with the default accelerate config:
    bf16 where the hardware computes it, else fp32."""
    from pipeline import precision
    from pipeline.config import Config
    used, _ = precision.choose("bf16", Config().train.allow_emulated_bf16)
    return "bf16" if used == "bf16" else "fp32"


def parse_variant(variant: str) -> tuple[str, set[str]]:
    """(precision, options); `default` is (default_precision(), no options): the config's
    defaults decide the layout, the Adam kernel and compile, as in the trainer."""
    if variant == "default":
        return default_precision(), set()
    precision, *options = variant.split("+")
    if precision not in ("fp32", "bf16") or not set(options) <= OPTIONS:
        raise SystemExit(f"bench_train.py: bad variant {variant!r}: a precision (fp32 or bf16), "
                         f"then +options from {', '.join(sorted(OPTIONS))}")
    return precision, set(options)


Size = int | tuple[int, int]  # a side, or (h, w) as tensors are laid out


def hw(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def trainer_config(variant: str, generator: str, batch: int, recipe: str = "", size: Size = 256):
    """The config a variant means, its crop at `size` (crop_height set where not square)."""
    from pipeline.config import from_cli
    _, options = parse_variant(variant)
    cfg, _ = from_cli(["--config", recipe] if recipe else [])
    h, w = hw(size)
    cfg.model.generator, cfg.data.batch_size, cfg.data.crop_size = generator, batch, w
    cfg.data.crop_height = h if h != w else 0
    if variant != "default":
        cfg.train.channels_last, cfg.train.compile = "cl" in options, "compile" in options
        cfg.optim.adam_impl = next((o for o in ("fused", "foreach") if o in options), "auto")
        cfg.train.keep_freed_memory = "mmap" not in options
    return cfg


def synthetic_pairs(count: int, batch: int, size: Size) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Smooth random inputs at `size` and a target the U-Net can learn (a mirrored negative)."""
    generator = torch.Generator().manual_seed(0)
    h, w = hw(size)
    pairs = []
    for _ in range(count):
        coarse = torch.rand(batch, 3, max(h // 16, 1), max(w // 16, 1), generator=generator) * 2 - 1
        x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear")
        pairs.append((x, -x.flip(-1)))
    return pairs


def trainer_step(cfg, engines, device: torch.device):
    """step(x, y) -> losses: gan.train_step with the trainer's objective and its guard
    against non-finite updates (part of every trainer step)."""
    from pipeline.gan import train_step
    from pipeline.train import make_objective

    objective = make_objective(cfg, device)
    hooks = engines.guarded_hooks(lambda model: None)
    return lambda x, y: train_step(engines.G, engines.D, engines.opt_G, engines.opt_D, x, y,
                                   objective, hooks)


def fp32_step(generator: str, batch: int, size: Size, recipe: str = "") -> None:
    """One fp32 CPU step of the trainer's models and objective on seeded pairs, with a
    zero-lr SGD (its update adds nothing worth counting): run it under a FLOP counter or
    a dispatch mode to see what the step computes."""
    from pipeline.engines import build_models
    from pipeline.gan import train_step
    from pipeline.train import make_objective

    cfg = trainer_config("fp32", generator, batch, recipe, size)
    G, D = build_models(cfg, channels_last=False)
    (x, y), = synthetic_pairs(1, batch, size)
    sgd = lambda model: torch.optim.SGD(model.parameters(), lr=0.0)
    train_step(G, D, sgd(G), sgd(D), x, y, make_objective(cfg, x.device))
