"""The shared benchmark format: a table, then one JSON line last."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(120)
def test_bench_step_prints_a_table_then_one_json_line():
    run = subprocess.run([sys.executable, "benchmarks/bench_step.py", "--generator", "unet_128",
                          "--size", "128", "--steps", "1", "--warmup", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    record = json.loads(lines[-1])
    assert record["benchmark"] == "bench_step"
    assert {"cpu", "cores"} <= set(record["machine"]) and record["torch"]
    assert [row["precision"] for row in record["rows"]] == ["fp32", "bf16"]
    assert all(row["samples_per_s"] > 0 for row in record["rows"])
    assert "precision" in lines[1]  # the human table comes first
