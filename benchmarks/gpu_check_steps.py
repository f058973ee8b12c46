"""The steps of the GPU check (benchmarks/gpu_check.py runs each in a process of its own):
GPU sizes, or tiny CPU sizes with --cpu-dry-run. Each returns its figures, or raises
StepError with a one-line reason; run_one prints them as the step's last line, one JSON
object. Bulky files go to the scratch folder only.

  env            torch, CUDA, the device, which optional packages import, the bf16 matmul peak
  gpu_tests      pytest -m gpu tests/integration/test_gpu.py
  train_compile  p2p-train of configs/demo.yaml in bf16, channels_last, compiled, an evaluation
                 and a checkpoint mid-run, resumed (train.resume=auto), its export translated
  deepspeed      p2p-train under launch/accelerate/deepspeed_zero2.yaml, one process, bf16, resumed
  hd_512         configs/hd_512.yaml through p2p-train for a few steps; its peak GPU memory
                 from bench_train (the trainer logs none)
  hd_1024x512    configs/hd_global_1024x512.yaml's step at its own geometry: a 2048 x 1024
                 image scale_width'ed to 1024 x 512, the global generator, a few steps
  bench_train    fp32 and the default variant at two batch sizes, MFU against env's peak
  bench_data     the input pipeline with the augmentation on the device
"""
from __future__ import annotations

import glob
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# imported (what the steps need), or only looked up (heavy to import, or optional)
IMPORTED = ("simplejpeg", "webdataset", "braceexpand", "deepspeed", "hjson", "pydantic", "accelerate",
            "torchvision", "torchmetrics", "safetensors", "psutil")
LOOKED_UP = ("transformers", "tensorboard", "s3fs", "torch_fidelity", "onnxruntime", "triton")
# tiny sizes for the CPU: the smallest U-Net (crop 128 is its size multiple), 8 filters
TINY = ["--model.generator=unet_128", "--model.g_filters=8", "--model.d_filters=8",
        "--data.load_size=136", "--data.crop_size=128", "--data.batch_size=1",
        "--data.num_workers=1", "--train.allow_emulated_bf16=true"]


class StepError(Exception):
    """A step failed; the message is the row's one-line error, `partial` what it measured."""

    def __init__(self, message: str, partial: dict | None = None):
        super().__init__(message)
        self.partial = partial


def sh(command: list[str], log_name: str, env: dict | None = None) -> str:
    """Run a command of a step (in the step's process group); the tail of its output into the
    step's log, all of it returned; StepError with its last line if it fails."""
    start = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    output = result.stdout + result.stderr
    print(f"--- {log_name} ({time.monotonic() - start:.1f} s, exit {result.returncode}): "
          f"{' '.join(command)[:300]}\n{tail(output, 25)}", flush=True)
    if result.returncode != 0:
        lines = [line for line in output.splitlines() if line.strip()]
        raise StepError(f"{log_name}: exit {result.returncode}: {(lines or ['?'])[-1].strip()[-300:]}")
    return result.stderr + "\n" + result.stdout  # stdout last: a benchmark's JSON line ends it


def tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def report_json(stdout: str) -> dict:
    """The one JSON line a benchmark prints last (benchmarks/report.py)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise StepError("no JSON line in the benchmark's output")


def dry() -> bool:
    return os.environ.get("P2P_CHECK_DRY") == "1"


def scratch() -> Path:
    return Path(os.environ.get("P2P_CHECK_SCRATCH", "/tmp/p2p-gpu-check"))


def demo_shards() -> Path:
    """Demo pairs packed into shards in the scratch folder, made once for all steps."""
    root = scratch() / "demo"
    if not (root / "shards" / "manifest.json").exists():
        shutil.rmtree(root, ignore_errors=True)  # a step killed half-way
        counts = ["--train", "16", "--val", "4", "--size", "64"] if dry() else ["--train", "96", "--val", "8"]
        sh([PY, "data_tools/make_demo.py", str(root / "raw"), *counts], "make_demo")
        sh([PY, "data_tools/shard.py", str(root / "raw"), str(root / "shards"), "--quiet"], "shard")
    return root / "shards"


def step_env() -> dict:
    """The device, the installed packages and the bf16 matmul peak (the MFU denominator)."""
    import torch
    from bench_peak import matmul_peak_tflops
    cuda = torch.cuda.is_available() and not dry()
    if not cuda and not dry():
        raise StepError("no CUDA device (torch.cuda.is_available() is False)")
    figures = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
               "device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)",
               "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
               "packages": packages()}
    peak = matmul_peak_tflops("bf16", 8192 if cuda else 512, "cuda" if cuda else "cpu")
    figures["bf16_matmul_tflops"] = float(f"{peak:.4g}")
    (scratch() / "peak.json").write_text(json.dumps({"bf16_tflops": peak, "cuda": cuda}))
    missing = [name for name in ("webdataset", "deepspeed") if not figures["packages"][name]]
    if missing:
        raise StepError(f"missing: {', '.join(missing)} (carry the wheels: gpu_check.sh --prepare)",
                        figures)
    return figures


def packages() -> dict:
    """name -> its version where it imports (or, for LOOKED_UP, is installed), else false."""
    from importlib.metadata import PackageNotFoundError, version
    found = {}
    for name in LOOKED_UP:
        try:
            found[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            found[name] = False
    for name in IMPORTED:
        try:
            module = importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 (any import failure is a finding here)
            found[name] = False
            print(f"{name}: {type(error).__name__}: {str(error)[:200]}", flush=True)
            continue
        try:
            found[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            found[name] = getattr(module, "__version__", True)
    return found


def step_gpu_tests() -> dict:
    """The `gpu` tests; on the CPU they all skip (the row then says so)."""
    stdout = sh([PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "--durations=0",
                 "-o", "addopts=", "tests/integration/test_gpu.py"], "pytest")
    summary = [line for line in stdout.splitlines() if " in " in line and ("passed" in line
                                                                            or "skipped" in line)]
    counts = {}
    for part in (summary or [""])[-1].strip("= ").split(" in ")[0].split(", "):
        if " " in part:
            number, what = part.split(" ", 1)
            counts[what] = int(number) if number.isdigit() else number
    return {"tests": counts}


def p2p_train(launch: list[str], run_dir: Path, shards: Path, *extra: str, log_name: str) -> str:
    """p2p-train (pipeline/launch.py: accelerate's launcher in a session of its own)."""
    return sh([PY, "-m", "pipeline.launch", *launch, "--", f"--data.train={shards}", f"--data.val={shards}",
        f"--train.run_dir={run_dir}", "--log.progress=false", "--log.tracker=none", *extra], log_name)


def step_log(run_dir: Path, name: str = "train_log.jsonl") -> list[dict]:
    path = run_dir / name
    if not path.exists():
        raise StepError(f"no {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_figures(run_dir: Path, first: int) -> dict:
    """From train_log.jsonl: steps logged from `first` on, their samples/s and data-wait share
    (means after the first logged record, which holds warm-up and compilation)."""
    records = [r for r in step_log(run_dir) if r["step"] >= first]
    if not records:
        raise StepError(f"{run_dir}: no step logged from step {first} on")
    timed = records[1:] or records
    mean = lambda key: float(f"{sum(r[key] for r in timed) / len(timed):.4g}")
    return {"first_step": records[0]["step"], "last_step": records[-1]["step"],
            "samples_per_s": mean("perf/samples_per_s"), "data_wait_share": mean("perf/data_wait_share"),
            "loss_G_l1": float(f"{records[-1].get('train/loss_G_l1', float('nan')):.4g}")}


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


def step_train_compile() -> dict:
    """configs/demo.yaml in bf16, channels_last and compiled: evaluated and checkpointed
    mid-run, resumed to a later step, its export translated."""
    shards, run_dir = demo_shards(), scratch() / "runs" / "demo"
    steps, mid, more = (2, 1, 3) if dry() else (40, 20, 60)
    launch = ["--config_file", "accelerate_config.yaml"]  # one process, bf16
    common = ["--config", "configs/demo.yaml", "--train.compile=true", "--train.channels_last=true",
              f"--train.eval_every={mid}", f"--train.ckpt_every={mid}", f"--log.sample_every={mid}",
              "--log.every=1" if dry() else "--log.every=5", *(TINY if dry() else [])]
    start = time.monotonic()
    p2p_train(launch, run_dir, shards, *common, f"--train.max_steps={steps}", "--train.overwrite=true",
              log_name="train")
    first = {"seconds": round(time.monotonic() - start, 1), **run_figures(run_dir, 0),
             "evaluated_steps": [r["step"] for r in step_log(run_dir, "metrics.jsonl")],
             "checkpoints": checkpoints(run_dir)}
    if mid not in first["evaluated_steps"] or len(first["checkpoints"]) < 2:
        raise StepError(f"no evaluation or checkpoint at step {mid}", first)
    start = time.monotonic()
    p2p_train(launch, run_dir, shards, *common, f"--train.max_steps={more}", "--train.resume=auto",
              log_name="resume")
    resumed = {"seconds": round(time.monotonic() - start, 1), **run_figures(run_dir, steps + 1)}
    if resumed["first_step"] != steps + 1 or resumed["last_step"] != more:
        raise StepError(f"the resume did not go on from step {steps}", resumed)
    return {"run": first, "resumed": resumed, "translate": translate(run_dir)}


def translate(run_dir: Path) -> dict:
    """p2p-translate of a few val images with the run's latest checkpoint (its export)."""
    images = sorted(glob.glob(str(scratch() / "demo" / "raw" / "val" / "*")))[:4]
    out = scratch() / "translated"
    shutil.rmtree(out, ignore_errors=True)
    start = time.monotonic()
    stdout = sh([PY, "pipeline/translate.py", "--checkpoint", str(run_dir), "--out", str(out), "--quiet",
                 *images], "translate")
    written = len(list(out.glob("*.png")))
    if written != len(images):
        raise StepError(f"translate wrote {written} of {len(images)} images")
    return {"images": written, "seconds": round(time.monotonic() - start, 1),
            "said": tail(stdout, 1)[-160:]}


def step_deepspeed() -> dict:
    """One process under DeepSpeed ZeRO-2 in bf16, checkpointed, then resumed (on the CPU over
    gloo, with DeepSpeed's comm op built into TORCH_EXTENSIONS_DIR; never ACCELERATE_USE_CPU)."""
    from pipeline.distributed import free_port
    shards, run_dir = demo_shards(), scratch() / "runs" / "deepspeed"
    steps, more = (2, 3) if dry() else (6, 9)
    launch = ["--config_file", "launch/accelerate/deepspeed_zero2.yaml", "--num_processes", "1",
              "--num_machines", "1", "--machine_rank", "0", "--main_process_ip", "127.0.0.1",
              "--mixed_precision", "bf16"]
    common = ["--config", "configs/demo.yaml", "--train.compile=false", f"--train.ckpt_every={steps}",
              "--train.eval_every=0", "--log.sample_every=0", "--log.every=1", *(TINY if dry() else [])]
    if dry():
        own = Path(os.environ.get("TORCH_EXTENSIONS_DIR", "")).name.endswith("-gpu-check")
        for lock in Path(os.environ["TORCH_EXTENSIONS_DIR"]).glob("*/lock") if own else []:
            lock.unlink()  # the folder is the dry run's alone: a lock there is a dead run's
        sh([PY, "-m", "tests.helpers.build_deepspeed_ops"], "deepspeed ops")
    start = time.monotonic()
    stdout = p2p_train([*launch, "--main_process_port", str(free_port())], run_dir, shards, *common,
                       f"--train.max_steps={steps}", "--train.overwrite=true", log_name="deepspeed")
    first = {"seconds": round(time.monotonic() - start, 1), **run_figures(run_dir, 0),
             "checkpoints": checkpoints(run_dir)}
    start = time.monotonic()
    p2p_train([*launch, "--main_process_port", str(free_port())], run_dir, shards, *common,
              f"--train.max_steps={more}", "--train.resume=auto", log_name="deepspeed resume")
    resumed = {"seconds": round(time.monotonic() - start, 1), **run_figures(run_dir, steps + 1)}
    if resumed["first_step"] != steps + 1 or resumed["last_step"] != more:
        raise StepError(f"the resume did not go on from step {steps}", resumed)
    engines = environment(stdout)
    if engines.get("engines") != "deepspeed":
        raise StepError("not run under DeepSpeed", {"environment": engines})
    return {"run": first, "resumed": resumed, "environment": engines}


def environment(stdout: str) -> dict:
    """The trainer's `environment:` line (engines, precision, world size, channels_last)."""
    for line in stdout.splitlines():
        if line.startswith("environment: {"):
            return json.loads(line.split(": ", 1)[1])
    return {}


def step_hd_512() -> dict:
    """configs/hd_512.yaml (ResNet G, 3 PatchGANs, feature matching, EMA) through p2p-train for
    a few steps; peak GPU memory of its step from bench_train (torch.cuda.max_memory_allocated)."""
    shards, run_dir = demo_shards(), scratch() / "runs" / "hd_512"
    steps = 2 if dry() else 10
    tiny = ["--model.g_filters=8", "--model.num_d=2", "--data.load_size=128", "--data.crop_size=128",
            "--data.num_workers=1", "--train.allow_emulated_bf16=true"] if dry() else []
    start = time.monotonic()
    stdout = p2p_train(["--config_file", "accelerate_config.yaml"], run_dir, shards, "--config",
                       "configs/hd_512.yaml", f"--train.max_steps={steps}", f"--train.ckpt_every={steps}",
                       f"--train.eval_every={steps}", "--log.sample_every=0", "--log.every=1",
                       "--train.overwrite=true", *tiny, log_name="hd_512")
    figures = {"train_seconds": round(time.monotonic() - start, 1), **run_figures(run_dir, 0),
               "loss_G_feat": step_log(run_dir)[-1].get("train/loss_G_feat"),
               "environment": environment(stdout)}
    size, generator = ("128", "resnet_6blocks") if dry() else ("512", "resnet_9blocks")
    recipe = tiny_recipe("configs/hd_512.yaml") if dry() else "configs/hd_512.yaml"
    bench = report_json(sh([PY, "benchmarks/bench_train.py", "--recipe", recipe,
                            "--generator", generator, "--size", size, "--batch", "1", "--variants",
                            "default", "--steps", "2", "--warmup", "1", "--no-peak"], "bench_train hd"))
    row = bench["rows"][0]
    if "error" in row:
        raise StepError(f"bench_train at 512: {row['error']}", figures)
    figures["peak_mem_mib"] = row.get("peak_mem_mib")
    figures["bench_samples_per_s"] = row.get("samples_per_s")
    return figures


def step_hd_1024x512() -> dict:
    """The global generator and 3 PatchGANs at a non-square size, as scale_width makes it of
    a 2048 x 1024 (Cityscapes) image: the config's Geometry gives the size, for training and
    for evaluation alike; bench_train's measure runs the trainer's step there, in this
    process (the default variant): seconds a step, peak memory. Dry: 8 filters, load 128."""
    from bench_train import measure

    from pipeline.config import from_cli
    from pipeline.data.augmentation import Geometry
    config = "configs/hd_global_1024x512.yaml"
    recipe = tiny_recipe(config) if dry() else config
    cfg, _ = from_cli(["--config", recipe, *(["--data.load_size=128"] if dry() else [])])
    geometry, image = Geometry.of(cfg.data, cfg.model.size_multiple), (1024, 2048)
    size = geometry.train_size(image)
    figures = {"preprocess": geometry.preprocess, "image": "2048x1024", "size": f"{size[1]}x{size[0]}"}
    if size != (cfg.data.load_size // 2, cfg.data.load_size) or geometry.eval_size(image) != size:
        raise StepError(f"scale_width brought 2048x1024 to {figures['size']} (eval "
                        f"{geometry.eval_size(image)}), not {cfg.data.load_size} wide at 2:1", figures)
    steps, warmup = (1, 0) if dry() else (5, 2)  # dry: one step shows the code path
    row = measure("default", 1, cfg.model.generator, size, steps, warmup, recipe)
    return {**figures, "generator": cfg.model.generator,
            **{k: short(row[k]) for k in (*BENCH_KEYS, "layout", "warmup_s", "l1_last") if k in row}}


def tiny_recipe(recipe: str) -> str:
    """`recipe` (a config file; empty: the defaults) with 8-filter networks, for bench_train on
    the CPU (it has no filter options: its --recipe is the way)."""
    import yaml
    cfg = yaml.safe_load((ROOT / recipe).read_text()) if recipe else {}
    cfg.setdefault("model", {}).update(g_filters=8, d_filters=8, num_d=2)
    path = scratch() / f"tiny_{Path(recipe).stem or 'default'}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


BENCH_KEYS = ("variant", "batch", "samples_per_s", "s_per_step", "peak_mem_mib", "speedup", "tflops",
              "mfu", "l1_vs_fp32", "error")


def step_bench_train() -> dict:
    """fp32 against the default variant at two batch sizes (one in the dry run: the same code
    path); MFU against env's matmul peak. Every variant's row is kept, a failed one with its
    error."""
    peak_file = scratch() / "peak.json"
    peak = json.loads(peak_file.read_text()) if peak_file.exists() else {}
    sizes = ["--generator", "unet_128", "--size", "128", "--batch", "1", "--steps", "1",
             "--warmup", "1", "--recipe", tiny_recipe("")] if dry() else \
        ["--batch", "1", "16", "--steps", "5", "--warmup", "2"]
    command = [PY, "benchmarks/bench_train.py", *sizes, "--variants", "fp32", "default", "--no-peak"]
    if peak.get("cuda"):
        command += ["--peak-tflops", str(peak["bf16_tflops"])]
    bench = report_json(sh(command, "bench_train"))
    rows = [{k: short(row[k]) for k in BENCH_KEYS if k in row} for row in bench["rows"]]
    failed = [row for row in rows if "error" in row]
    figures = {"rows": rows, "peak_tflops": peak.get("bf16_tflops") if peak.get("cuda") else None,
               "best_mfu": short(bench["figures"].get("best_mfu"))}
    if failed:
        raise StepError(f"{len(failed)} variant(s) failed", figures)
    return figures


def short(value):
    return float(f"{value:.4g}") if isinstance(value, float) else value


def step_bench_data() -> dict:
    """The input pipeline with resize, crop and flip on the device."""
    sizes = ["--pairs", "16", "--size", "64", "--batch", "4", "--device", "cpu"] if dry() else \
        ["--pairs", "256", "--size", "256", "--batch", "32", "--device", "cuda"]
    bench = report_json(sh([PY, "benchmarks/bench_data.py", *sizes, "--no-s3", "--step-steps", "0"],
                           "bench_data"))
    return {k: short(v) for k, v in bench["figures"].items()}


STEPS = {"env": step_env, "gpu_tests": step_gpu_tests, "train_compile": step_train_compile,
         "deepspeed": step_deepspeed, "hd_512": step_hd_512, "hd_1024x512": step_hd_1024x512,
         "bench_train": step_bench_train, "bench_data": step_bench_data}


def run_one(name: str) -> int:
    """One step in this process: its figures (with "error" if it failed) as the last line, one
    JSON object."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        figures, code = STEPS[name](), 0
    except StepError as error:
        figures, code = {**(error.partial or {}), "error": str(error)}, 1
    print(json.dumps(figures), flush=True)
    return code
