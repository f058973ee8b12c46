"""benchmarks/gpu_check.sh works before a GPU is lent: its CPU dry run runs every step."""
import json
import subprocess

import pytest

from tests.helpers.trainer_runs import ROOT


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_gpu_check_runs_every_step_on_the_cpu_and_ends_with_one_json_line(tmp_path):
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-dry-run", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=580)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record == json.loads((tmp_path / "gpu_check.json").read_text())
    steps = {row["step"]: row for row in record["figures"]["steps"]}
    assert list(steps) == ["bf16 matmul peak", "gpu tests", "bench_train", "bench_data",
                           "demo data", "demo shards", "demo run"]
    assert record["figures"]["failed"] == [] and record["figures"]["bf16_matmul_tflops"] > 0
    assert "skipped" in steps["gpu tests"]["last_line"]  # no CUDA here
    assert steps["demo run"]["figures"]["steps"] == 5
    assert 0 <= steps["demo run"]["figures"]["data_wait_share"] <= 1
