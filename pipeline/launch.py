"""p2p-train: the command that starts a training run: accelerate's launcher, made to stop
cleanly on Ctrl-C and to exit with the trainer's own code.

    p2p-train [accelerate launch options] -- [trainer options]
    p2p-train [trainer options]      (no `--`: accelerate's own default configuration)
    e.g. p2p-train --config_file accelerate_config.yaml -- --config configs/demo.yaml

Why not `accelerate launch pipeline/train.py` alone (it still works):
- Ctrl-C: the terminal sends SIGINT to the whole foreground group; accelerate's launcher
  waits in subprocess.Popen.wait, which re-raises KeyboardInterrupt 0.25 s later: exit
  130 and a traceback while the trainer is still writing its checkpoint.
- Errors: the trainer's one-line error is followed by the launcher's 11-line
  CalledProcessError (or torchrun's ChildFailedError) traceback, and the exit code is 1.
What p2p-train does instead:
- it runs the launcher in a session of its own, so a terminal's signals reach p2p-train
  only. The first SIGINT, SIGTERM or SIGHUP is passed once to every trainer rank (found
  among the launcher's descendants), which checkpoints at the next step boundary and
  exits 0; p2p-train waits for that. A second one kills the run at once and says what
  was skipped: the newest complete checkpoint stays, the one being written does not.
- it exits with the trainer's code (each rank writes it to the file P2P_EXIT_FILE names:
  2 for a user error, 1 for a failed run or a bug), and drops what only repeats a failure
  a rank has reported itself: the launcher's traceback about a failed child, torchrun's
  failure table and its per-rank `failed (exitcode: N)` / `closing signal` log lines,
  the ranks' `exiting with code 2` after a user error's one line. The trainer's own
  lines (its one-line error, a bug's traceback) pass unchanged. The filter reads what
  arrives as it arrives: whole lines are judged, a progress bar's redraws (text after a
  carriage return) pass at once, so the bar stays live (`StderrFilter`).
- it tells the trainer's ranks, in their environment, what they cannot see themselves:
    P2P_EXIT_FILE  where each rank writes its exit code (pipeline/distributed.py)
    P2P_PROG       `p2p-train`: the name their errors and usage give (pipeline/cli.py)
    P2P_TERMINAL   1 when p2p-train's stderr is a terminal, else 0: their stderr is a pipe
                   into p2p-train, and this picks a live bar or a progress line every 30 s
                   (pipeline/progress.py)
If p2p-train itself is killed with SIGKILL the run goes on in its own session.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading

from pipeline import cli, progress

TRAINER = "pipeline.train"
STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# the last line of a traceback the launcher prints when a child failed: dropped, the
# child has said why itself
LAUNCHER_FAILURES = ("subprocess.CalledProcessError:",
                     "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:")
USAGE = __doc__.split("\n\n")[1]
# accelerate's launcher, when a value comes from neither its config nor an option
DEFAULTS_NOTICE = b"The following values were not passed to `accelerate launch`"
RANK_LINE = re.compile(rb"\[rank \d+\] ")  # a trainer rank's own line (pipeline/cli.py)
# a repeat of what a rank has said itself: its exit after a user error's one line, and the
# torchrun agent's log lines about a rank that exited with a code (a rank killed by a
# signal, exitcode -N, said nothing: that line stays)
REPEATS = (re.compile(rb"\[rank \d+\] exiting with code 2\s*$"),
           re.compile(rb"[EWI]\d{4} [\d:.]+ +\d+ .*?\] failed \(exitcode: [1-9]\d*\) local_rank"),
           re.compile(rb"[EWI]\d{4} [\d:.]+ +\d+ .*?\] Sending process \d+ closing signal SIG"))


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(accelerate launch options, trainer options)."""
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return [], argv


def launcher_command(launch_args: list[str], trainer_args: list[str]) -> list[str]:
    quiet = [] if {"-q", "--quiet"} & set(launch_args) else ["--quiet"]
    return [sys.executable, "-m", "accelerate.commands.launch", *quiet, *launch_args,
            "-m", TRAINER, *trainer_args]


# --------------------------------------------------------------------------- processes

def _parent(pid: int) -> int | None:
    """The parent pid, from /proc (Linux, where clusters run); None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _children() -> dict[int, list[int]]:
    """ppid -> pids of every process now."""
    children: dict[int, list[int]] = {}
    for pid in (int(name) for name in os.listdir("/proc") if name.isdigit()):
        parent = _parent(pid)
        if parent is not None:
            children.setdefault(parent, []).append(pid)
    return children


def descendants(pid: int) -> list[int]:
    children, found, todo = _children(), [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _is_trainer(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return False
    return TRAINER.encode() in args or any(a.endswith(b"pipeline/train.py") for a in args)


def trainer_ranks(launcher: int) -> list[int]:
    """The trainer processes among the launcher's descendants, without their loader
    workers (forks of a rank, which ignore stop signals anyway)."""
    trainers = {pid for pid in descendants(launcher) if _is_trainer(pid)}
    return [pid for pid in trainers if _parent(pid) not in trainers]


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------- the run

class Run:
    """The launcher in its own session, its stderr filtered, stop signals handled here."""

    def __init__(self, command: list[str], env: dict):
        self.process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE,
                                        start_new_session=True)
        self.interrupts = 0
        self.pump = threading.Thread(target=copy_stderr, args=(self.process.stderr,), daemon=True)
        self.pump.start()

    def on_signal(self, signum: int, frame) -> None:
        self.interrupts += 1
        name = signal.Signals(signum).name
        if self.interrupts == 1:
            ranks = trainer_ranks(self.process.pid)
            print(f"p2p-train: {name}: asking the trainer to checkpoint and stop "
                  f"({len(ranks)} rank(s)); {name} again stops at once", file=sys.stderr, flush=True)
            _signal(ranks, signal.SIGTERM if signum == signal.SIGHUP else signum)
            return
        print(f"p2p-train: {name} again: killing the run now; a checkpoint being written is "
              "lost, the newest complete one stays (--train.resume=auto continues from it)",
              file=sys.stderr, flush=True)
        self.kill()

    def kill(self) -> None:
        _signal(descendants(self.process.pid), signal.SIGKILL)  # torchrun's ranks: own sessions
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        code = self.process.wait()  # our handlers return: wait() resumes (PEP 475)
        self.pump.join(timeout=10)
        return code


def copy_stderr(stream) -> None:
    """The launcher's stderr to ours, through a StderrFilter, as it arrives."""
    fd, keep = stream.fileno(), StderrFilter()
    while data := os.read(fd, 65536):
        _write(keep.feed(data))
    _write(keep.close())


def _write(data: bytes) -> None:
    if data:
        sys.stderr.buffer.write(data)
        sys.stderr.buffer.flush()


class StderrFilter:
    """Bytes in as they arrive (`feed`, `close` at the end), bytes out as soon as they may
    pass. A line (up to a newline) goes through LineFilter, which needs it whole; a
    progress bar's redraw (text after a carriage return, and a line ending in one) passes
    at once, the part drawn so far too."""

    def __init__(self):
        self.lines = LineFilter()
        self.partial = b""  # the start of a line whose end has not arrived
        self.redraw = False  # what arrives now follows a carriage return

    def feed(self, data: bytes) -> bytes:
        out, rest = [], self.partial + data
        while (cut := _line_end(rest)) >= 0:
            piece, rest = rest[:cut + 1], rest[cut + 1:]
            if self.redraw or piece.endswith(b"\r"):
                out.append(piece)
            else:
                out.extend(self.lines.push(piece))
            self.redraw = piece.endswith(b"\r")
        if self.redraw and rest:  # the bar as far as it is drawn
            out.append(rest)
            rest = b""
        self.partial = rest
        return b"".join(out)

    def close(self) -> bytes:
        last = self.lines.push(self.partial) if self.partial else []
        self.partial = b""
        return b"".join([*last, *self.lines.close()])


def _line_end(data: bytes) -> int:
    """Where the first line or redraw of `data` ends (its \\n or \\r), or -1."""
    ends = [i for i in (data.find(b"\n"), data.find(b"\r")) if i >= 0]
    return min(ends) if ends else -1


class LineFilter:
    """Whole lines in (`push`), the lines to show out. Drops a traceback whose exception is
    a LAUNCHER_FAILURES one, torchrun's `====` failure table (after that traceback, or on
    its own), accelerate's notice that it used its defaults (p2p-train with no `--` asks
    for them) and the REPEATS lines. Any other traceback passes whole; a rank's line
    (`[rank R] ...`) that arrives inside a held traceback or a skipped table passes."""

    def __init__(self):
        self.held: list[bytes] = []  # a traceback, until its exception line says whose
        self.rule: bytes | None = None  # a `====` line: a failure table's start, or not
        self.skipping = ""  # "notice" or "table": dropping lines until their end
        self.rules = 0  # `====` lines seen in the table being skipped

    def push(self, line: bytes) -> list[bytes]:
        if self.skipping:
            return _shown(line) if RANK_LINE.match(line) else self._skip(line)
        if self.held:
            return self._traceback(line)
        if self.rule is not None:
            rule, self.rule = self.rule, None
            if line.rstrip().endswith(b" FAILED"):  # `pipeline.train FAILED`
                self.skipping, self.rules = "table", 1
                return []
            return [rule, *self.push(line)]
        if line.startswith(DEFAULTS_NOTICE):
            self.skipping = "notice"
        elif line.startswith(b"Traceback (most recent call last):"):
            self.held = [line]
        elif line.startswith(b"====="):
            self.rule = line
        else:
            return _shown(line)
        return []

    def close(self) -> list[bytes]:
        rest = [*self.held, *([self.rule] if self.rule is not None else [])]
        self.held, self.rule = [], None
        return rest

    def _traceback(self, line: bytes) -> list[bytes]:
        if line[:1] in (b" ", b"\t"):
            self.held.append(line)
            return []
        if RANK_LINE.match(line):  # another process's line, in between
            return _shown(line)
        held, self.held = self.held, []
        if line.decode(errors="replace").startswith(LAUNCHER_FAILURES):
            if line.startswith(b"torch.distributed"):  # its table follows
                self.skipping, self.rules = "table", 0
            return []
        return [*held, line]

    def _skip(self, line: bytes) -> list[bytes]:
        """Accelerate's notice: tab-indented lines, then its last; torchrun's table:
        framed by two lines of '='."""
        if self.skipping == "notice":
            if not line.startswith(b"\t"):
                self.skipping = ""
            return []
        self.rules += line.strip().startswith(b"=====")
        if self.rules >= 2:
            self.skipping = ""
        return []


def _shown(line: bytes) -> list[bytes]:
    return [] if any(pattern.match(line) for pattern in REPEATS) else [line]


def exit_code(codes_file: str, launcher_code: int, interrupts: int) -> int:
    """The trainer's code: the first rank's non-zero code, else 0 if every rank that
    reported did so with 0 and the launcher agrees; the launcher's otherwise. Only the
    last start counts: ranks of a group the elastic agent restarted report again."""
    codes, _ = read_codes(codes_file)
    failed = [code for _, code in codes if code != 0]
    if failed:
        return failed[0]
    if interrupts > 1:
        return 130
    if launcher_code < 0:  # the launcher was killed by signal -launcher_code
        return 128 - launcher_code
    return launcher_code


def read_codes(codes_file: str) -> tuple[list[tuple[int, int]], int]:
    """((rank, code) of the ranks' last start, how many restarts came before it), from
    lines `RANK CODE RESTART` (a line without RESTART: the first start)."""
    try:
        with open(codes_file) as f:
            rows = [[int(v) for v in line.split()] + [0] for line in f if line.strip()]
    except (OSError, ValueError):
        return [], 0
    last = max((row[2] for row in rows), default=0)
    return sorted((row[0], row[1]) for row in rows if row[2] == last), last


def _main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage:{USAGE}\n\ntrainer options (python -m pipeline.train --help):", flush=True)
        return subprocess.run([sys.executable, "-m", TRAINER, "--help"],
                              env={**os.environ, cli.PROG_ENV: "p2p-train"}).returncode
    launch_args, trainer_args = split_argv(argv)
    with tempfile.TemporaryDirectory(prefix="p2p-train-") as scratch:
        codes_file = os.path.join(scratch, "exit-codes")
        # a c10d rendezvous (multi-node restarts) then gives each round a fresh store
        # (see distributed.init_restarted_group); static rendezvous ignores it
        env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **os.environ, "P2P_EXIT_FILE": codes_file,
               cli.PROG_ENV: "p2p-train", progress.TERMINAL_ENV: "1" if sys.stderr.isatty() else "0"}
        run = Run(launcher_command(launch_args, trainer_args), env)
        for sig in STOPS:
            signal.signal(sig, run.on_signal)
        code = exit_code(codes_file, run.wait(), run.interrupts)
        if code and (restarts := read_codes(codes_file)[1]):
            print(f"p2p-train: the run failed again after {restarts} restart(s) by the elastic agent "
                  "(--max_restarts): the newest checkpoint stays; --train.resume=auto continues "
                  "from it", file=sys.stderr, flush=True)
        return code


main = cli.entry_point("p2p-train", _main)


def run_and_exit() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run_and_exit()
