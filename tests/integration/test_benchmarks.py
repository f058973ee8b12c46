"""The shared benchmark format, on the train-step benchmark: a table, then one JSON line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_train_compares_variants_in_a_table_then_one_json_line():
    run = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--generator", "unet_128",
                          "--size", "128", "--batch", "1", "--steps", "1", "--warmup", "1",
                          "--variants", "fp32", "bf16+cl+fused", "--gemm-size", "256"],
                         cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    record = json.loads(lines[-1])
    assert record["benchmark"] == "bench_train" and "variant" in lines[1]  # the table first
    assert {"cpu", "cores"} <= set(record["machine"]) and record["torch"]
    fp32, fast = record["rows"]
    assert (fp32["variant"], fast["variant"]) == ("fp32", "bf16+cl+fused")
    assert all(row["samples_per_s"] > 0 and row["peak_mem_mib"] > 0 for row in record["rows"])
    # the same seeded pairs and weights: a working bf16 step lands on fp32's loss
    assert fp32["l1_first"] == pytest.approx(fast["l1_first"], rel=0.02)
    assert abs(fast["l1_vs_fp32"]) < 0.02 and fast["speedup"] > 0
    # unet_128 + PatchGAN at 128x128: about a quarter of the 86.9 GFLOP at 256x256
    assert 15 < record["figures"]["gflop_per_sample"] < 30
    # against this machine's own limits, in its precision (bench_peak)
    assert all(row["conv_bound_s"] > 0 and row["fraction_of_peak"] == pytest.approx(
        row["conv_bound_s"] / row["s_per_step"]) and row["gemm_fraction"] > 0 for row in record["rows"])
    # the parameter-bound work is measured for both (bf16's also holds autocast's casts, but
    # which takes longer is a timing, no test: under load fp32's Adam alone took longer)
    assert fast["param_bound_s"] > 0 and fp32["param_bound_s"] > 0
    assert all(0 < row["attainable_fraction"] < 1 for row in record["rows"])


def test_bench_peak_times_every_convolution_of_the_step_and_the_matmul_peak():
    run = subprocess.run([sys.executable, "benchmarks/bench_peak.py", "--generator", "unet_128",
                          "--size", "128", "--batch", "1", "--precisions", "fp32", "--gemm-size", "256",
                          "--repeats", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout.strip().splitlines()[-1])
    (row,) = record["rows"]
    # unet_128: 14 G layers, PatchGAN: 5. Forward: G once, D on fake and real (D update) and
    # on fake again (G update): 14 + 3 x 5. Backward: D twice, D for G's loss, then G: 2 x 5 + 5 + 14
    assert row["conv_calls"] == 29 + 29 == row["best_nchw"] + row["best_nhwc"]
    assert row["conv_bound_s"] == pytest.approx(row["forward_s"] + row["backward_s"])
    assert row["forward_s"] > 0 and row["backward_s"] > 0
    # fp32: Adam alone (no autocast casts); it caps the attainable fraction below 1
    assert row["param_bound_s"] == row["adam_s"] > 0 and row["cast_s"] == 0
    assert row["attainable_fraction"] == pytest.approx(
        row["conv_bound_s"] / (row["conv_bound_s"] + row["param_bound_s"])) and row["attainable_fraction"] < 1
    assert record["figures"]["fp32_matmul_tflops"] > 0


def test_bench_train_refuses_an_unknown_variant_option():
    run = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--variants", "bf16+turbo"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "bad variant 'bf16+turbo'" in run.stderr


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bench_scaling_launches_one_two_processes_and_two_nodes():
    run = subprocess.run([sys.executable, "benchmarks/bench_scaling.py", "--generator", "unet_128",
                          "--size", "128", "--steps", "1", "--warmup", "1", "--timeout", "200"],
                         cwd=ROOT, capture_output=True, text=True, timeout=230)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])["rows"]
    assert [(row["world"], row["nodes"]) for row in rows] == [(1, 1), (2, 1), (2, 2)]
    assert rows[0]["efficiency"] == 1 and rows[0]["allreduce_s"] == 0
    assert all(row["allreduce_s"] > 0 and 0 < row["efficiency"] for row in rows[1:])


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_metrics_times_each_metric_in_a_table_then_one_json_line(substitute_weights):
    run = subprocess.run([sys.executable, "benchmarks/bench_metrics.py", "--images", "2", "--size", "32",
                          "--weights-dir", substitute_weights], cwd=ROOT, capture_output=True, text=True,
                         timeout=170)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    record = json.loads(lines[-1])
    assert record["benchmark"] == "bench_metrics" and "s_per_100" in lines[1]
    assert [row["metric"] for row in record["rows"]] == ["l1+psnr+ssim", "fid+kid", "lpips"]
    assert all(row["s_per_100"] > 0 for row in record["rows"])


def test_estimate_memory_adds_up_parameters_optimiser_and_activations():
    run = subprocess.run([sys.executable, "benchmarks/estimate_memory.py", "--config", "configs/hd_512.yaml",
                          "--generator", "global", "--size", "256"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout.strip().splitlines()[-1])
    rows = {row["part"]: row["GiB"] for row in record["rows"]}
    # 182,443,267 parameters x 16 bytes (fp32 weights, gradients, Adam's two moments)
    assert rows["G weights + grads + Adam (fp32)"] == pytest.approx(182_443_267 * 16 / 2 ** 30)
    assert rows["G's EMA (fp32)"] == pytest.approx(182_443_267 * 4 / 2 ** 30)
    assert record["figures"]["total_GiB"] == pytest.approx(sum(rows.values()))
    assert 0 < rows["G activations (one forward)"] < rows["G weights + grads + Adam (fp32)"]
