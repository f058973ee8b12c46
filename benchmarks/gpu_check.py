"""The GPU check's runner: each step of benchmarks/gpu_check_steps.py in a process group of
its own, under its own time limit and one overall deadline, one JSON line per step.

    python benchmarks/gpu_check.py [--out DIR] [--wheels DIR] [--deadline S] [--only A,B] [--cpu-dry-run]

Every step ends in a row {"step", "ok", "seconds", ...figures or "error"}, appended and
flushed to OUT/gpu_check.jsonl as soon as it ends (OUT: --out, else $OUT), with the tail of
its output in OUT/gpu_check.log: a run killed half-way still returns the steps it finished.
A step past its limit (or the deadline) gets SIGTERM, then SIGKILL after a grace of a few
seconds, sent to its process group and to every process descended from it, those in a
session of their own (p2p-train's launcher and trainer) included; this process is their
subreaper, so none escapes by being orphaned. Bulky files (data, runs, checkpoints) stay in
a scratch folder (--scratch, default /tmp/p2p-gpu-check), never in OUT. Before the steps,
the wheels of --wheels are installed into SCRATCH/site (benchmarks/gpu_check_wheels.py;
the dry run's into ~/.cache/pix2pix-at-scale/gpu-check-site).
Exit 1 if any step failed.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".gpu_wheels"
DRY_SITE = Path.home() / ".cache" / "pix2pix-at-scale" / "gpu-check-site"
GRACE_S = 5  # between SIGTERM and SIGKILL: p2p-train checkpoints and exits on SIGTERM
MIN_STEP_S = 10  # a step with less time left than this before the deadline is not started
# name -> limit in seconds on the GPU (the deadline cuts them further); order is run order
STEPS = {"env": 40, "gpu_tests": 90, "train_compile": 120, "deepspeed": 75, "hd_512": 60,
         "hd_1024x512": 45, "bench_train": 60, "bench_data": 40}
# the same on 2 CPU cores at tiny sizes (room for --dry-inductor's C++ builds, and for the
# first build of DeepSpeed's CPU comm op on this machine: minutes on 2 busy cores)
DRY_STEPS = {"env": 60, "gpu_tests": 60, "train_compile": 300, "deepspeed": 300, "hd_512": 120,
             "hd_1024x512": 60, "bench_train": 120, "bench_data": 60}
DEADLINE_S = {"gpu": 320, "dry": 900}
LOG_TAIL_LINES = 40


def descendants(root: int) -> set[int]:
    """Every live process below `root`, from /proc's parent links (sessions do not matter)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def signal_all(pids: set[int], group: int, sig: int) -> None:
    """`sig` to the step's process group and to each of `pids` (and their own groups)."""
    for target in [group, *pids]:
        for send in (os.killpg, os.kill):
            try:
                send(target, sig)
            except (ProcessLookupError, PermissionError):
                pass


def kill_tree(proc: subprocess.Popen, grace: float = GRACE_S) -> int:
    """SIGTERM to the step and all below it, SIGKILL after `grace` s; reaps them all.
    Returns how many processes were below the step."""
    pids = descendants(proc.pid) | descendants(os.getpid()) - {proc.pid}
    signal_all(pids, proc.pid, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end and (proc.poll() is None or descendants(os.getpid())):
        time.sleep(0.2)
        reap_orphans()
    pids |= descendants(proc.pid) | descendants(os.getpid())
    signal_all(pids, proc.pid, signal.SIGKILL)
    proc.wait()
    for _ in range(50):  # SIGKILLed orphans are ours to reap (subreaper)
        reap_orphans()
        if not descendants(os.getpid()):
            break
        time.sleep(0.1)
    return len(pids)


def reap_orphans() -> None:
    """Collect exited orphans handed to this process as their subreaper."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def become_subreaper() -> None:
    """Orphans below this process are re-parented to it, not to init: none escapes a kill."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass  # not Linux: the process-group kill alone


def run_step(name: str, command: list[str], limit: float, log: Path, env: dict | None = None) -> dict:
    """`command` in a session of its own, killed with all below it past `limit` seconds; its
    last stdout line, if a JSON object, gives the row's figures (and "error", if it failed)."""
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            proc.wait(timeout=max(limit, 0.1))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        reap_orphans()
        left = kill_tree(proc) if timed_out or descendants(os.getpid()) else 0
    row = {"step": name, "ok": not timed_out and proc.returncode == 0,
           "seconds": round(time.monotonic() - start, 1)}
    lines = log.read_text(errors="replace").splitlines()
    row.update({k: v for k, v in last_json(lines).items() if k not in row})
    if timed_out:
        row["error"] = f"timed out after {limit:.0f} s: killed with {left} process(es) below it"
    elif proc.returncode != 0 and "error" not in row:
        row["error"] = f"exit {proc.returncode}: {last_line(lines)}"
    elif left:
        row["left_behind"] = left  # killed: a step must not leave processes running
    if not row["ok"] and lines:
        row.setdefault("last_line", last_line(lines))
    return row


def last_json(lines: list[str]) -> dict:
    for line in reversed(lines):
        if line.startswith("{") and line.rstrip().endswith("}"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            return value if isinstance(value, dict) else {}
    return {}


def last_line(lines: list[str]) -> str:
    return next((line.strip()[-300:] for line in reversed(lines) if line.strip()), "?")


def append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def record(out: Path, row: dict, log: Path) -> None:
    """The row to OUT/gpu_check.jsonl and the tail of the step's output to OUT/gpu_check.log."""
    append(out / "gpu_check.jsonl", json.dumps(row) + "\n")
    tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:] if log.exists() else []
    append(out / "gpu_check.log", f"==> {row['step']} ok={row['ok']} {row['seconds']} s\n"
           + "".join(line[-400:] + "\n" for line in tail))
    print(json.dumps(row), flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "", help="where the rows go "
                        "(default: $OUT)")
    parser.add_argument("--scratch", default="/tmp/p2p-gpu-check", help="data, runs, installed wheels")
    parser.add_argument("--wheels", default=str(WHEELS) if list(WHEELS.glob("*.whl")) else "",
                        help="a folder of wheels to install first (default: .gpu_wheels where it "
                             "holds any; benchmarks/gpu_check.sh --prepare writes it)")
    parser.add_argument("--deadline", type=float, default=0, help="seconds for the whole check, "
                        "the wheels' install included (default: 320; 900 with --cpu-dry-run)")
    parser.add_argument("--only", default="", help="comma list of steps to run: " + ",".join(STEPS))
    parser.add_argument("--cpu-dry-run", action="store_true", help="every step on the CPU, tiny")
    parser.add_argument("--dry-inductor", action="store_true", help="the dry run compiles with "
                        "inductor (minutes of C++ builds on 2 cores), not aot_eager")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one step in this process
    parser.add_argument("--step-command", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)  # --step-command NAME=LIMIT=COMMAND: a step of one shell command (tests)
    unknown = set(filter(None, args.only.split(","))) - set(STEPS) - {
        c.split("=", 1)[0] for c in args.step_command}
    if unknown:
        parser.error(f"--only: unknown step(s) {', '.join(sorted(unknown))}; steps: {', '.join(STEPS)}")
    if not args.out and not args.step:
        parser.error("no --out and no $OUT: say where the rows go")
    return args


def step_env(scratch: Path, dry: bool, site: Path | None, inductor: bool = False) -> dict:
    """What every step runs with: the repo and the installed wheels on the path, no hub weights."""
    paths = [str(p) for p in (site, ROOT) if p] + ([os.environ["PYTHONPATH"]]
                                                   if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1",
               P2P_WEIGHTS_DIR="/nonexistent/p2p-weights", P2P_CHECK_SCRATCH=str(scratch))
    env.pop("ACCELERATE_USE_CPU", None)  # it would silently drop DeepSpeed
    if dry:
        env.update(GLOO_SOCKET_IFNAME="lo", P2P_CHECK_DRY="1")
        if not inductor:  # dynamo and AOTAutograd as on the GPU, without inductor's C++ build
            env["TORCH_COMPILE_OVERRIDE_BACKENDS"] = ">=0:aot_eager"
        # DeepSpeed's comm op, built once: in the tests' folder (tests/helpers/trainer_runs.py),
        # or for the carried DeepSpeed (in DRY_SITE) in one of its own (its sources' path
        # differs: the two would rebuild it over each other's)
        own = "-gpu-check" if site else ""
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "pix2pix-at-scale"
                                                  / f"torch_extensions-{torch_version()}{own}"))
    return env


def torch_version() -> str:
    from importlib.metadata import version
    return version("torch")


def plan(args: argparse.Namespace) -> list[tuple[str, list[str], float]]:
    """(name, command, limit) of each step to run, in order."""
    limits = DRY_STEPS if args.cpu_dry_run else STEPS
    only = [name for name in args.only.split(",") if name]
    extra = {name: (float(limit), ["bash", "-c", command]) for name, limit, command in
             (c.split("=", 2) for c in args.step_command)}
    me = [sys.executable, str(Path(__file__).resolve()), "--scratch", args.scratch,
          *(["--cpu-dry-run"] if args.cpu_dry_run else [])]
    steps = {name: (limit, [*me, "--step", name]) for name, limit in limits.items()}
    steps.update(extra)
    names = only or list(steps)
    return [(name, steps[name][1], steps[name][0]) for name in names]


def install_row(args: argparse.Namespace, scratch: Path) -> tuple[dict | None, Path | None]:
    """The wheels of --wheels installed into SCRATCH/site (a row), or nothing to install."""
    if not args.wheels:
        return None, None
    from gpu_check_wheels import install
    start = time.monotonic()
    # the dry run's in one place for good: DeepSpeed's comm op, built from the sources there,
    # is rebuilt (minutes) when their path changes
    site = DRY_SITE if args.cpu_dry_run else scratch / "site"
    result = install(Path(args.wheels), site)
    row = {"step": "wheels", "ok": not result["failed"], "seconds": round(time.monotonic() - start, 1),
           **result}
    return row, site


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.step:
        from gpu_check_steps import run_one
        os.environ.update(P2P_CHECK_SCRATCH=args.scratch, P2P_CHECK_DRY="1" if args.cpu_dry_run else "")
        return run_one(args.step)
    start = time.monotonic()
    become_subreaper()
    deadline = args.deadline or DEADLINE_S["dry" if args.cpu_dry_run else "gpu"]
    out, scratch = Path(args.out), Path(args.scratch)
    out.mkdir(parents=True, exist_ok=True)
    (scratch / "logs").mkdir(parents=True, exist_ok=True)
    rows = []
    row, site = install_row(args, scratch)
    if row:
        record(out, row, scratch / "logs" / "wheels.log")
        rows.append(row)
    env = step_env(scratch, args.cpu_dry_run, site, args.dry_inductor)
    no_gpu = ""
    for name, command, limit in plan(args):
        left = deadline - (time.monotonic() - start) - GRACE_S
        log = scratch / "logs" / f"{name}.log"
        log.unlink(missing_ok=True)  # an earlier run's
        if left < MIN_STEP_S or no_gpu:
            row = {"step": name, "ok": False, "seconds": 0, "error": "not started: " + (
                no_gpu or f"{left:.0f} s left before the {deadline:.0f} s deadline")}
        else:
            row = run_step(name, command, min(limit, left), log, env)
        record(out, row, log)
        rows.append(row)
        if name == "env" and "no CUDA device" in row.get("error", ""):
            no_gpu = "no CUDA device (pass --cpu-dry-run for the CPU)"
    failed = [row["step"] for row in rows if not row["ok"]]
    print(f"gpu_check: {len(rows) - len(failed)} of {len(rows)} ok"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"; rows in {out / 'gpu_check.jsonl'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.exit(main())
