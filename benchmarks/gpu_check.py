"""The steps of benchmarks/gpu_check.sh, each timed, each a row; one JSON line at the end.

    python benchmarks/gpu_check.py [--out DIR] [--cpu-dry-run]

On a GPU: `pytest -m gpu` (bf16, channels_last, compile, device augmentation, translate
and evaluate on CUDA), the bf16 matmul peak this device reaches (the MFU denominator:
about 790 TFLOP/s on an H200, not the 989 of the datasheet), bench_train (fp32 at batch 1
against bf16 variants at growing batches, MFU against the measured peak), bench_data with
augmentation on the device, and a 300-step demo run through p2p-train with its data-wait
share. --cpu-dry-run runs the same steps on the CPU at tiny sizes (the gpu tests skip).
A failing step is a row with its error; the others still run; exit 1 if any failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_peak import matmul_peak_tflops  # noqa: E402
from report import report  # noqa: E402


def significant(value: float) -> float:
    """4 significant digits: an emulated bf16 matmul (AVX2-only CPUs) runs at ~0.005 TFLOP/s,
    which 2 decimals would report as 0."""
    return float(f"{value:.4g}")


def run_step(name: str, command: list[str], timeout: int, env: dict | None = None) -> dict:
    """A child process; its last stdout line, if JSON, becomes the row's figures."""
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                timeout=timeout, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"step": name, "ok": False, "seconds": timeout, "error": "timed out"}
    row = {"step": name, "ok": result.returncode == 0,
           "seconds": round(time.perf_counter() - start, 1)}
    lines = result.stdout.strip().splitlines()
    if lines and lines[-1].startswith("{"):
        row["figures"] = json.loads(lines[-1]).get("figures", {})
    elif lines:
        row["last_line"] = lines[-1][-300:]
    if result.returncode != 0:
        row["error"] = (result.stderr.strip().splitlines() or ["?"])[-1][-300:]
    return row


def plan(dry: bool, out: Path, peak: float | None) -> list[tuple[str, list[str], int]]:
    """(name, command, timeout) of each step; tiny sizes for a CPU dry run."""
    py = sys.executable
    if dry:
        sweep = ["--generator", "unet_128", "--size", "128", "--batch", "1", "--steps", "1",
                 "--warmup", "1", "--variants", "fp32", "default", "--gemm-size", "256"]
        data = ["--pairs", "16", "--size", "64", "--batch", "4", "--no-s3", "--step-steps", "0",
                "--pre-resize"]
        demo = ["--train", "16", "--val", "4", "--size", "64"]
        steps, tiny = 5, ["--model.generator=unet_128", "--model.g_filters=8", "--data.crop_size=128",
                          "--data.load_size=136", "--train.eval_every=0", "--log.sample_every=0"]
    else:
        sweep = ["--batch", "1", "16", "64", "--steps", "10", "--warmup", "3", "--variants", "fp32",
                 "default", "bf16+fused", "bf16+cl+fused", "bf16+cl+fused+compile"]
        sweep += ["--peak-tflops", str(peak)] if peak else []
        data = ["--pairs", "400", "--size", "256", "--batch", "64", "--no-s3", "--device", "cuda",
                "--pre-resize"]
        demo, steps, tiny = [], 300, []
    shards, run_dir = out / "demo_shards", out / "demo_run"
    train = [py, "-m", "pipeline.launch", "--config_file", "accelerate_config.yaml", "--",
             "--config", "configs/demo.yaml", f"--data.train={shards}", f"--data.val={shards}",
             f"--train.run_dir={run_dir}", f"--train.max_steps={steps}", "--train.overwrite=true",
             "--data.augment_on=device", "--log.progress=false", *tiny]
    return [
        ("gpu tests", [py, "-m", "pytest", "-q", "-m", "gpu", "tests/integration/test_gpu.py"], 300),
        ("bench_train", [py, "benchmarks/bench_train.py", *sweep], 600),
        ("bench_data", [py, "benchmarks/bench_data.py", *data], 300),
        ("demo data", [py, "data_tools/make_demo.py", str(out / "demo_data"), *demo], 120),
        ("demo shards", [py, "data_tools/shard.py", str(out / "demo_data"), str(shards), "--quiet"], 120),
        ("demo run", train, 600),
    ]


def demo_figures(run_dir: Path) -> dict:
    """The demo run's mean data-wait share and samples/s over its logged steps."""
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    waits = [r["perf/data_wait_share"] for r in records[1:]] or [records[0]["perf/data_wait_share"]]
    rates = [r["perf/samples_per_s"] for r in records[1:]] or [records[0]["perf/samples_per_s"]]
    return {"data_wait_share": sum(waits) / len(waits), "samples_per_s": sum(rates) / len(rates),
            "steps": records[-1]["step"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu_check_"))
    parser.add_argument("--cpu-dry-run", action="store_true", help="the same steps on the CPU, tiny")
    args = parser.parse_args(argv)
    import torch
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.cpu_dry_run
    if not cuda and not args.cpu_dry_run:
        parser.error("no CUDA device: pass --cpu-dry-run to run the steps on the CPU")
    peak = matmul_peak_tflops("bf16", 8192 if cuda else 512, "cuda" if cuda else "cpu")
    rows = [{"step": "bf16 matmul peak", "ok": True, "figures": {"tflops": significant(peak)}}]
    env = {"ACCELERATE_USE_CPU": "1"} if args.cpu_dry_run else {}
    for name, command, timeout in plan(args.cpu_dry_run, out, peak if cuda else None):
        rows.append(run_step(name, command, timeout, env))
        if name == "demo run" and rows[-1]["ok"]:
            rows[-1]["figures"] = demo_figures(out / "demo_run")
    figures = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)",
               "torch": torch.__version__, "bf16_matmul_tflops": significant(peak),
               "failed": [row["step"] for row in rows if not row["ok"]]}
    table = [{"step": row["step"], "ok": row["ok"], "seconds": row.get("seconds"),
              "detail": row.get("error") or json.dumps(row.get("figures", {}))[:160]} for row in rows]
    record = report("gpu_check", table, {**figures, "steps": rows}, file=sys.stdout)
    (out / "gpu_check.json").write_text(json.dumps(record) + "\n")
    return 1 if figures["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
