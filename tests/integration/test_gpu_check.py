"""benchmarks/gpu_check.sh works before a GPU is lent: its CPU dry run runs every step, one
JSON line each; a step past its limit is killed with every process below it (those in a
session of their own too) and says so; --only runs the named steps alone."""
import json
import subprocess
import sys
import time

import psutil
import pytest

from tests.helpers.trainer_runs import ROOT

STEPS = ["env", "gpu_tests", "train_compile", "deepspeed", "hd_512", "hd_1024x512", "bench_train",
         "bench_data"]
CHECK = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")]


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]


def check(tmp_path, *args, timeout=60) -> subprocess.CompletedProcess:
    """gpu_check.py with its own steps replaced by --step-command ones (no wheels installed)."""
    return subprocess.run([*CHECK, "--out", str(tmp_path / "out"), "--scratch", str(tmp_path / "scratch"),
                           "--wheels", "", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# a step that leaves a grandchild in a session of its own (as p2p-train's launcher is), a
# child in its group, writes their pids, then hangs
HANGS = ("setsid sleep 300 & echo $! > {pids}; sleep 300 & echo $! >> {pids}; "
         "echo started; sleep 300")


def test_a_step_past_its_limit_is_killed_with_all_below_it_and_the_row_says_so(tmp_path):
    pids = tmp_path / "pids"
    start = time.monotonic()
    result = check(tmp_path, "--step-command", f"hangs=2={HANGS.format(pids=pids)}",
                   "--step-command", "after=5=echo '{\"figure\": 1}'", "--only", "hangs,after")
    assert result.returncode == 1, result.stdout + result.stderr
    assert time.monotonic() - start < 30  # 2 s, then SIGTERM: sleep dies at once
    hung, after = rows(tmp_path / "out")
    assert hung["step"] == "hangs" and hung["ok"] is False and "timed out after 2 s" in hung["error"]
    assert hung["last_line"] == "started"
    assert after == {"step": "after", "ok": True, "seconds": after["seconds"], "figure": 1}
    for pid in map(int, pids.read_text().split()):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid
    assert "==> hangs ok=False" in (tmp_path / "out" / "gpu_check.log").read_text()


def test_only_runs_the_named_steps_and_the_deadline_stops_the_rest(tmp_path):
    result = check(tmp_path, "--step-command", "a=5=echo '{\"a\": 1}'", "--step-command",
                   "b=30=sleep 30", "--step-command", "c=5=exit 3", "--only", "b,c", "--deadline", "17")
    assert result.returncode == 1, result.stdout + result.stderr
    b, c = rows(tmp_path / "out")
    assert b["step"] == "b" and "timed out after 12 s" in b["error"]  # the deadline less the grace
    assert c == {"step": "c", "ok": False, "seconds": 0, "error": c["error"]}
    assert c["error"].startswith("not started:")
    failed = check(tmp_path, "--step-command", "c=5=echo oops; exit 3", "--only", "c")
    assert rows(tmp_path / "out")[-1]["error"] == "exit 3: oops", failed.stdout
    unknown = check(tmp_path, "--only", "nope")
    assert unknown.returncode == 2 and "unknown step(s) nope" in unknown.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_cpu_dry_run_runs_every_step_and_writes_one_line_each(tmp_path):
    """Every step's code path at tiny sizes (the gpu tests skip; compile through aot_eager);
    ~3-4 min on 2 cores."""
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-dry-run", "--out",
                             str(tmp_path / "out"), "--scratch", str(tmp_path / "scratch")],
                            cwd=ROOT, capture_output=True, text=True, timeout=580)
    by_step = {row["step"]: row for row in rows(tmp_path / "out")}
    assert result.returncode == 0, json.dumps(by_step, indent=1)[-6000:] + result.stderr[-3000:]
    assert [name for name in by_step if name != "wheels"] == STEPS
    assert all(row["ok"] for row in by_step.values())
    assert by_step["env"]["bf16_matmul_tflops"] > 0 and by_step["env"]["packages"]["deepspeed"]
    assert by_step["gpu_tests"]["tests"] == {"skipped": 4}  # no CUDA here
    demo = by_step["train_compile"]
    assert demo["run"]["evaluated_steps"][:2] == [0, 1] and demo["resumed"]["first_step"] == 3
    assert demo["translate"]["images"] == 4
    assert by_step["deepspeed"]["environment"]["engines"] == "deepspeed"
    assert by_step["hd_512"]["loss_G_feat"] > 0 and by_step["hd_512"]["peak_mem_mib"] > 0
    wide = by_step["hd_1024x512"]  # scale_width's 2:1 geometry, load 128 in the dry run
    assert (wide["size"], wide["generator"]) == ("128x64", "global") and wide["s_per_step"] > 0
    assert [(r["variant"], r["batch"]) for r in by_step["bench_train"]["rows"]] == [
        ("fp32", 1), ("default", 1)]
    assert not list((tmp_path / "out").glob("*/"))  # nothing bulky comes back
