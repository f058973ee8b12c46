"""Validation metrics and sample grids; as a script, a report on a trained generator.

    python pipeline/evaluate.py --checkpoint RUN/checkpoints/step_N --data SHARDS --out DIR
    accelerate launch pipeline/evaluate.py ...      (the split shared among the processes)

writes DIR/metrics.json (L1, PSNR, SSIM over the split, and per sample shown),
DIR/samples.png (rows of input | output | target for the first --samples pairs) and
DIR/index.html, a page showing both.

The metrics follow the reference's test protocol: L1 on the [-1, 1] scale, PSNR on
uint8 images (converted as the reference does, by truncation), averaged per image, and
SSIM; G runs as the caller leaves it (the reference keeps train mode: dropout on and
batch statistics), one image per forward with its dropout masks seeded from its sample
key, so the trainer's validation and this script give the same numbers on any number of
processes. Sums are reduced across ranks by a function the caller passes, so ranks may
hold different numbers of images.
"""
from __future__ import annotations

import argparse
import contextlib
import html
import io
import json
import logging
import sys
from collections.abc import Callable, Iterable

import numpy as np
import torch
from PIL import Image

from pipeline import cli, storage
from pipeline.data import derive_seed, make_eval_loader
from pipeline.errors import UserError
from pipeline.realism import (
    METRICS,
    PAIRWISE,
    WEIGHTS_ENV,
    MetricsError,
    Realism,
    choose,
    download_missing,
    value_key,
    weights_dir,
)
from pipeline.similarity import ssim

log = logging.getLogger(__name__)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8, truncating like the reference's tensor2im."""
    return ((images.float().clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8)


def per_image_metrics(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """N x 3: L1, PSNR (dB, capped at 100), SSIM for each image of a batch."""
    output, target = output.float(), target.float()
    l1 = (output - target).abs().flatten(1).mean(1)
    out8, tgt8 = to_uint8(output).float(), to_uint8(target).float()
    mse = (out8 - tgt8).square().flatten(1).mean(1)
    psnr = (10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))).clamp_max(100.0)
    structure = ssim(out8, tgt8, data_range=255.0)
    return torch.stack([l1, psnr, structure], 1)


@contextlib.contextmanager
def untouched_state(model: torch.nn.Module, device: torch.device):
    """Run train-mode inference without disturbing training: BatchNorm running stats
    and the global RNG (dropout) are as they were afterwards, so evaluating never
    changes the losses of the steps that follow."""
    buffers = [b.clone() for b in model.buffers()]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        yield
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), buffers):
            buffer.copy_(saved)


def translate_each(generator: torch.nn.Module, x: torch.Tensor, keys: list[str],
                   autocast: Callable, seed: int) -> torch.Tensor:
    """G(x), one image per forward with its dropout masks seeded from (seed, its key):
    batch statistics are then each image's own, and an image's output is the same
    whatever the batch size, the process count or the tool (trainer or evaluate.py)."""
    outputs = []
    for i, key in enumerate(keys):
        torch.manual_seed(derive_seed(seed, key, "eval"))
        with autocast():
            outputs.append(generator(x[i:i + 1]))
    return torch.cat(outputs)


def evaluate(generator: torch.nn.Module,
             batches: Iterable[tuple[torch.Tensor, torch.Tensor, list[str]]],
             device: torch.device, autocast: Callable = contextlib.nullcontext,
             reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
             seed: int = 0, names: Iterable[str] = PAIRWISE, realism: Realism | None = None,
             gather: Callable[[list], list[list]] = lambda rows: [rows],
             stop: Callable[[], bool] = lambda: False,
             progress: Callable[[int], None] = lambda images: None) -> dict[str, float] | None:
    """The `names` metrics over all ranks' images of (input, target, keys) batches: mean
    L1, PSNR and SSIM, and FID, KID and LPIPS through `realism` (pipeline/realism.py);
    `images` is the count. `stop()` is asked before each batch: once it says yes this rank
    reads no more, and the evaluation is abandoned (None) on every rank, which learn it
    from the one reduction they share. `progress(n)` hears of each batch's n images."""
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # L1, PSNR, SSIM, images, stopped
    with untouched_state(generator, device):
        for x, y, keys in batches:
            if stop():
                sums[4] = 1
                break
            output = translate_each(generator, x, keys, autocast, seed)
            metrics = per_image_metrics(output, y).double()
            sums[:3] += metrics.sum(0)
            sums[3] += len(metrics)
            if realism:
                realism.add(keys, to_uint8(output), to_uint8(y))
            progress(len(keys))
    sums = reduce_sum(sums)
    if sums[4].item():
        if realism:
            realism.discard()
        return None
    count = max(sums[3].item(), 1.0)
    result = {name: sums[i].item() / count for i, name in enumerate(PAIRWISE) if name in names}
    result["images"] = int(sums[3].item())
    if realism:
        result.update(realism.result(gather))
    return result


def sample_grid(generator: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, keys: list[str],
                device: torch.device, autocast: Callable = contextlib.nullcontext,
                seed: int = 0) -> np.ndarray:
    """One row per sample: input | output | target, as an H x W x 3 uint8 array (the
    outputs the metrics measure: translate_each)."""
    with untouched_state(generator, device):
        output = translate_each(generator, x, keys, autocast, seed)
    return grid_image(x, output, y)


def grid_image(x: torch.Tensor, output: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    columns = [to_uint8(t) for t in (x, output, y)]
    columns = [c.expand(-1, 3, -1, -1) if c.shape[1] == 1 else c[:, :3] for c in columns]
    rows = torch.cat(columns, dim=3)  # side by side
    return torch.cat(list(rows), dim=1).permute(1, 2, 0).cpu().numpy()  # rows stacked


def save_png(path: str, pixels: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    storage.write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------- the report

def sample_rows(generator: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, keys: list[str],
                device: torch.device, autocast: Callable, seed: int,
                realism: Realism | None = None) -> tuple[np.ndarray, list]:
    """(grid, metrics per row), each row the output the metrics over the split measured
    (translated once): the pairwise ones, and LPIPS where it is measured."""
    with untouched_state(generator, device):
        output = translate_each(generator, x, keys, autocast, seed)
    rows = [dict(zip(PAIRWISE, values.tolist())) for values in per_image_metrics(output, y).double()]
    if realism is not None and realism.lpips_net is not None:
        for row, score in zip(rows, realism.lpips_each(to_uint8(output), to_uint8(y))):
            row["lpips"] = score
    return grid_image(x, output, y), rows


# name in metrics.json -> (column heading, format): the one place metrics get their names
# and formats for people (the report's table, the console lines, the trainer's summary)
COLUMNS = {"l1": ("L1 ([-1, 1] scale)", ".4f"), "psnr": ("PSNR (dB)", ".2f"), "ssim": ("SSIM", ".3f"),
           "fid": ("FID", ".2f"), "kid_mean": ("KID (mean)", ".4f"), "kid_std": ("KID (std)", ".4f"),
           "lpips": ("LPIPS", ".4f")}


def shown(key: str, value: float, before: float | None = None) -> str:
    """`PSNR 23.85 dB`, or with the value at step 0: `L1 0.1200 (untrained 0.3192, -62%)`."""
    heading, fmt = COLUMNS[key]
    unit = " dB" if "(dB)" in heading else ""
    change = f" (untrained {before:{fmt}}, {value / before - 1:+.0%})" if before else ""
    return f"{heading.split(' (')[0]} {value:{fmt}}{unit}{change}"


def _cells(values: dict, tag: str = "td") -> str:
    shown = [k for k in COLUMNS if k in values]
    if tag == "th":
        return "".join(f"<th>{COLUMNS[k][0]}</th>" for k in shown)
    return "".join("<td>n/a</td>" if values[k] is None else f"<td>{values[k]:{COLUMNS[k][1]}}</td>"
                   for k in shown)


def report_html(summary: dict) -> str:
    """The page: what was evaluated and how, the metrics, the grid with a row per sample.
    The grid's onload marks <body data-grid-width=...>, which a headless browser test reads."""
    esc = lambda v: html.escape(str(v))
    samples = summary["samples"]
    rows = "".join(f"<tr><td>{i}</td><td>{esc(s['key'])}</td>{_cells(s)}</tr>"
                   for i, s in enumerate(samples))
    mode, precision = summary["test_mode"], summary["precision"]
    subset = (f" (a subset drawn with seed {esc(mode['seed'])}: --max-images {summary['max_images']})"
              if summary.get("max_images") else "")
    kid = (f" KID: {summary['kid_subsets']} subsets of {summary['kid_subset_size']} images."
           if "kid_subset_size" in summary else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>pix2pix evaluation: {esc(summary['checkpoint'])}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
img{{image-rendering:pixelated;max-width:100%}}</style>
</head><body>
<h1>pix2pix evaluation</h1>
<p>Checkpoint <code>{esc(summary['checkpoint'])}</code> (step {esc(summary['step'])}), data
<code>{esc(summary['data'])}</code> split <code>{esc(summary['split'])}</code>: {summary['images']} images
on {summary['world_size']} process(es){subset}, in {esc(precision['used'])} ({esc(precision['why'])}).
Test-time mode: dropout {esc(mode['dropout'])}, {esc(mode['norm_stats'])} statistics.{kid}</p>
<table><tr>{_cells(summary, "th")}</tr>
<tr>{_cells(summary)}</tr></table>
<h2>Samples: input | output | target</h2>
<img id="grid" src="samples.png" alt="rows of input, output and target"
 onload="document.body.dataset.gridWidth = this.naturalWidth">
<table><tr><th>row</th><th>key</th>{_cells(samples[0], "th") if samples else ""}</tr>{rows}</table>
</body></html>
"""


def add_generator_options(parser: argparse.ArgumentParser) -> None:
    """The options p2p-evaluate and p2p-translate share: which generator, and how it runs
    at test time (one definition, one help text)."""
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint step_N folder, run folder (latest checkpoint), a marker "
                             "(RUN/checkpoints/best or latest) or export folder")
    parser.add_argument("--dropout", choices=("on", "off"), default="on",
                        help="dropout at test time (default: on, the paper's protocol and the "
                             "trainer's metrics)")
    parser.add_argument("--norm-stats", choices=("batch", "running"), default="batch",
                        help="BatchNorm statistics: each image's own (batch, the paper's; one "
                             "image per forward) or the running averages from training "
                             "(default: batch)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the dropout masks, with each sample's key (default: 0, the "
                             "trainer's train.seed default)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.Parser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generator_options(parser)
    parser.add_argument("--data", required=True, help="shards: folder or s3:// prefix with "
                        "manifest.json, a manifest URL, or a brace pattern")
    parser.add_argument("--split", default="val", help="manifest split (default: val)")
    parser.add_argument("--out", required=True, help="report folder (local or s3://)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="images loaded at a time (each still gets its own forward; default: 16)")
    parser.add_argument("--samples", type=int, default=8, help="pairs in the grid (default: 8)")
    parser.add_argument("--num-workers", type=int, default=1, help="loader workers per process")
    parser.add_argument("--max-images", type=int, default=0,
                        help="evaluate a fixed subset of this many images, drawn with --seed "
                             "(the run's eval.max_images and train.seed give the trainer's own "
                             "subset; default: 0, the whole split)")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--bf16", action="store_true",
                        help="bf16 autocast, also where the hardware only emulates it (default: "
                             "the launcher's setting, else the precision the run trained and "
                             "validated in where this device computes it, else fp32)")
    chosen.add_argument("--fp32", action="store_true", help="fp32, whatever the run used")
    parser.add_argument("--metrics", default="auto",
                        help="comma list of " + ", ".join(METRICS) + " (default: auto = l1, psnr, "
                             "ssim plus every metric whose package and weights are here; one asked "
                             "for by name is downloaded if missing, unless --no-download)")
    parser.add_argument("--weights-dir", default="",
                        help=f"folder of the metrics' weights, torch.hub's layout (hub/checkpoints/...; "
                             f"default: ${WEIGHTS_ENV}, else torch's cache)")
    parser.add_argument("--no-download", action="store_true",
                        help="never download weights (offline clusters): a missing file is an error")
    return parser.parse_args(argv)


def _main(argv: list[str]) -> int:
    from accelerate import Accelerator

    from pipeline import distributed, precision
    from pipeline.checkpoint import generator_folder, load_generator
    from pipeline.models import set_test_mode
    from pipeline.progress import Progress
    from pipeline.run_folder import check_out_folder

    args = parse_args(argv)
    cli.setup_logging()
    check_out_folder(args.out)
    root = weights_dir(args.weights_dir)
    try:
        names = choose(args.metrics, root, allow_download=not args.no_download)
        download_missing(names, root)  # every process, before any waits for another
    except MetricsError as err:
        raise MetricsError(f"--metrics: {err}") from None
    if args.max_images < 0:
        raise UserError(f"--max-images: must be >= 0 (0: the whole split), got {args.max_images}")
    folder = generator_folder(args.checkpoint)  # found once: the weights' and their precision's
    generator, info = load_generator(folder)
    force = "bf16" if args.bf16 else "no" if args.fp32 else None
    trained = trained_precision(folder)
    used, why = precision.for_evaluation(force, precision.launch_device_type(), trained)
    accelerator = Accelerator(mixed_precision=used)
    chosen = {"used": "bf16" if used == "bf16" else "fp32", "why": why}
    if accelerator.is_main_process:
        log.info(f"precision: {chosen['used']} ({why})")
    device = accelerator.device
    set_test_mode(generator.to(device), args.dropout == "on", args.norm_stats == "batch")
    cfg, channels = eval_data(args, info)
    channels["multiple"] = info.model.size_multiple
    realism = Realism(names, device, root)
    loader = make_eval_loader(cfg, rank=accelerator.process_index, world_size=accelerator.num_processes,
                              max_images=args.max_images, seed=args.seed, **channels)
    bar = Progress(loader.rank_images, desc="evaluate", unit="image", enabled=accelerator.is_main_process)
    metrics = evaluate(generator, (_on(device, b) for b in loader), device, accelerator.autocast,
                       distributed.sum_across_ranks, seed=args.seed, names=names, realism=realism,
                       gather=distributed.gather_objects, progress=bar.update)
    bar.close()
    if accelerator.is_main_process:
        first = next(iter(make_eval_loader(cfg, rank=0, world_size=1, batch_size=args.samples, **channels)))
        write_report(args, info.step, chosen, metrics, first, generator, device, accelerator, realism)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def trained_precision(folder: str) -> str | None:
    """The precision the run behind generator folder `folder` (checkpoint.generator_folder's)
    trained in ("no", "bf16"), from the checkpoint's trainer.json; None for an export (it
    records none)."""
    from pipeline import checkpoint
    if not storage.exists(storage.join(folder, checkpoint.TRAINER)):
        return None
    return checkpoint.read_trainer(folder).precision


def eval_data(args: argparse.Namespace, info) -> tuple:
    """(the DataConfig of the split to evaluate, the generator's channel counts), from the
    generator's weights.GeneratorInfo: its direction and geometry (data.preprocess,
    load_size, crop_size, crop_height), so each image is evaluated at the eval size the
    trainer's validation used; what an older generator.json does not record (preprocess)
    keeps DataConfig's default, resize_and_crop, as those runs trained."""
    from pipeline.config import DataConfig
    recorded = {k: getattr(info.data, k) for k in info.data.GEOMETRY if getattr(info.data, k) is not None}
    cfg = DataConfig(val=args.data, val_split=args.split, num_workers=args.num_workers,
                     batch_size=args.batch_size, **recorded)
    return cfg, {"in_channels": info.model.in_channels, "out_channels": info.model.out_channels}


def _on(device: torch.device, batch: dict) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    return batch["input"].to(device), batch["target"].to(device), batch["key"]


def write_report(args, step: int | None, chosen: dict, metrics: dict, first: dict, generator, device,
                 accelerator, realism: Realism) -> None:
    """OUT/samples.png, OUT/metrics.json and OUT/index.html (main process)."""
    grid, per_sample = sample_rows(generator, *_on(device, first), device, accelerator.autocast,
                                   args.seed, realism)
    names = [n for n in METRICS if n in metrics or value_key(n) in metrics]
    summary = {"checkpoint": args.checkpoint, "step": step, "data": args.data,
               "split": args.split, "max_images": args.max_images, "precision": chosen,
               "world_size": accelerator.num_processes, **metrics,
               "metrics": {n: METRICS[n].help for n in names},
               "test_mode": {"dropout": args.dropout, "norm_stats": args.norm_stats, "seed": args.seed},
               "samples": [{"key": k, **m} for k, m in zip(first["key"], per_sample)]}
    save_png(storage.join(args.out, "samples.png"), grid)
    storage.write_bytes(storage.join(args.out, "metrics.json"), json.dumps(summary, indent=1).encode())
    storage.write_bytes(storage.join(args.out, "index.html"), report_html(summary).encode())
    said = ", ".join(shown(k, metrics[k]) for k in COLUMNS if metrics.get(k) is not None and k != "kid_std")
    log.info(f"{cli.prog_name('evaluate.py')}: {said} over {metrics['images']} images in "
             f"{chosen['used']}; report in {storage.join(args.out, 'index.html')}")


main = cli.entry_point("evaluate.py", _main)


if __name__ == "__main__":
    sys.exit(main())
