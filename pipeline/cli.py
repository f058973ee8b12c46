"""How every entry point starts, logs and fails: one convention for all the tools.

    main = cli.entry_point("shard.py", _main)      # _main(argv) -> exit code

- A `UserError` prints `PROG: error: MESSAGE` (one line) and exits 2; a `RunError`
  prints the same and exits 1; any other exception is a bug and keeps its traceback
  (exit 1). Nothing else in the code base decides exit codes for errors. `Parser`, the
  tools' argparse, reports a usage mistake the same way (one line, exit 2).
- PROG is the name the user called the tool by (`prog_name`): the console script's
  (`p2p-shard`), else the script's file (`shard.py`, also for `python -m`); the trainer's
  ranks that p2p-train started say `p2p-train` (it sets P2P_PROG for them).
- In a multi-process run an error is said once: the ranks of a machine that fail alike
  (a config mistake, a missing path: every rank finds it) agree on that through small
  notes in a folder they share, and local rank 0 alone prints the line; an error only
  some ranks hit is printed by each of them; either way `[rank R] PROG: error: ...`.
  Printing once needs no launcher: it holds under p2p-train, accelerate launch, torchrun
  and Slurm alike (there one line per node: each node's ranks agree among themselves).
- `setup_logging` (called by each entry point once its options are parsed): INFO lines
  on stdout (through tqdm, so progress bars stay intact), WARNING and above on stderr,
  every line (each line of a multi-line message too) prefixed `[rank R] ` in
  multi-process runs; the level (the tool's option, else P2P_LOG_LEVEL, else INFO)
  applies to this project's loggers, the libraries log their warnings and errors; Python
  warnings go through logging too, so they are seen.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

from tqdm import tqdm

from pipeline import faults
from pipeline.errors import RunError, UserError

LOG_LEVELS = ("debug", "info", "warning", "error")
# this project's loggers (and a script's own, run as __main__): the level applies to these;
# third-party libraries log at WARNING and above (botocore's INFO lines are not ours to print)
OUR_LOGGERS = ("pipeline", "data_tools", "benchmarks", "__main__")
LOG_LEVEL_ENV = "P2P_LOG_LEVEL"
PROG_ENV = "P2P_PROG"  # the name the trainer's ranks report under: p2p-train sets it for them
AGREE_SECONDS = 5.0  # how long a failing rank waits for the other ranks of its machine


def prog_name(declared: str) -> str:
    """The name the user called the tool by. A tool is declared by its script's name
    (`shard.py`: what `python data_tools/shard.py` and `python -m data_tools.shard` run);
    run as its console script it is that script's name (`p2p-shard`), and a trainer rank
    that p2p-train started is P2P_PROG's (`p2p-train`). Other names (`p2p-train` itself,
    a subcommand's `p2p-shard merge`) stay as they are."""
    if not declared.endswith(".py") or " " in declared:
        return declared
    invoked = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if invoked.startswith("p2p-"):
        return invoked
    return os.environ.get(PROG_ENV) or declared


def entry_point(prog: str, main: Callable[[list[str]], int]) -> Callable[..., int]:
    """`main` behind the error convention: call it with argv (default sys.argv[1:])."""
    def run(argv: list[str] | None = None) -> int:
        name = prog_name(prog)
        try:
            if faults.triggered("cli.bug"):  # tests: an internal error keeps its traceback
                raise RuntimeError(f"{name}: an injected internal error (P2P_FAULT=cli.bug)")
            return main(sys.argv[1:] if argv is None else list(argv))
        except UserError as err:
            return fail(name, err, 2)
        except RunError as err:
            return fail(name, err, 1)
    run.__doc__ = main.__doc__
    return run


class Parser(argparse.ArgumentParser):
    """argparse, named as the user called the tool (`prog_name`), with a usage mistake
    reported like every other user error: one line (`PROG: error: ...; see PROG --help`),
    once across ranks, exit 2."""

    def __init__(self, *args, prog: str | None = None, **kwargs):
        super().__init__(*args, prog=prog_name(prog) if prog else None, **kwargs)

    def error(self, message: str):
        say_error(self.prog, f"{message}; see {self.prog} --help")
        self.exit(2)


def fail(prog: str, err: BaseException, code: int) -> int:
    say_error(prog, one_line(err))
    return code


def say_error(prog: str, message: str) -> None:
    """`PROG: error: MESSAGE` on stderr. In a multi-process run `[rank R] ` first, like
    every line there, and once for the ranks of a machine that all fail with it (local
    rank 0 says it), else by each rank that failed."""
    line = f"{prog}: error: {message}"
    if rank_prefix() and ranks_fail_alike(line) and os.environ.get("LOCAL_RANK") != "0":
        return
    print(rank_prefix() + line, file=sys.stderr, flush=True)


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# --------------------------------------------------------------------------- print once

def ranks_fail_alike(note: str, seconds: float = AGREE_SECONDS) -> bool:
    """Whether every rank on this machine fails with `note`: each failing rank leaves its
    note in a folder they share and waits up to `seconds` for the others'. False as soon
    as one failed otherwise; False after `seconds` while some rank has not failed (no
    error there, or a later one); False without a launcher that names local ranks."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    local_rank = os.environ.get("LOCAL_RANK", "")
    folder = _notes_folder()
    if local_world < 2 or not local_rank.isdigit() or folder is None:
        return False
    try:
        os.makedirs(folder, exist_ok=True)
        _write_note(os.path.join(folder, f"error-{local_rank}"), note)
        deadline = time.monotonic() + seconds
        while True:
            notes = _notes(folder, "error-")
            alike = all(n == note for n in notes) and len(notes) >= local_world
            if alike or any(n != note for n in notes) or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        _write_note(os.path.join(folder, f"done-{local_rank}"), "")
        if len(_notes(folder, "done-")) >= local_world:  # the last one out clears the folder
            shutil.rmtree(folder, ignore_errors=True)
        return alike
    except OSError:
        return False


def _notes_folder() -> str | None:
    """A folder that this launch's ranks on this machine alone share: named by their
    parent (the launcher's agent: its pid and start time) and its restart round; in
    p2p-train's scratch folder when there is one."""
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/stat") as f:
            started = f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
    base = os.path.dirname(os.environ.get("P2P_EXIT_FILE", "")) or tempfile.gettempdir()
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return os.path.join(base, f"p2p-errors-{os.getuid()}-{parent}-{started}-{restart}")


def _write_note(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)  # whole, or not there


def _notes(folder: str, prefix: str) -> list[str]:
    texts = []
    for name in os.listdir(folder):
        if name.startswith(prefix) and not name.endswith(".tmp"):
            with open(os.path.join(folder, name)) as f:
                texts.append(f.read())
    return texts


def rank_prefix() -> str:
    """`[rank R] ` when the launcher started several processes, else ''."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"[rank {os.environ.get('RANK', '?')}] "
    return ""


class _Formatter(logging.Formatter):
    """INFO as plain sentences; warnings and errors with their level and logger name;
    in a multi-process run, each line of a message (a config dump, a traceback) with
    its rank."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {record.name}: {text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        prefix = rank_prefix()
        return "\n".join(prefix + line for line in text.split("\n")) if prefix else text


class _TqdmHandler(logging.Handler):
    """Writes above a running progress bar instead of through it. tqdm clears the bar,
    writes the line, draws the bar again; but when the bar goes through a pipe (the
    trainer's stderr into p2p-train) and the line straight to the terminal, the line can
    arrive before the clearing: it then clears the row itself (carriage return, erase line)."""

    def __init__(self, stream: str, levels: Callable[[int], bool]):
        super().__init__()
        self.stream, self.levels = stream, levels  # "stdout"/"stderr": looked up per line

    def filter(self, record: logging.LogRecord) -> bool:
        return self.levels(record.levelno)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = getattr(sys, self.stream)
            text = self.format(record)
            if tqdm._instances and stream.isatty() and not sys.stderr.isatty():
                text = "\r\x1b[K" + text
            with tqdm.external_write_mode(file=stream):  # tqdm.write, in one write: unbuffered,
                stream.write(text + "\n")  # another rank's line cannot land before its newline
                stream.flush()
        except Exception:  # noqa: BLE001 - logging must never kill the program
            self.handleError(record)


def setup_logging(level: str | None = None) -> None:
    """Configure the root logger for this process (idempotent: replaces our handlers)."""
    name = (level or os.environ.get(LOG_LEVEL_ENV) or "info").lower()
    if name not in LOG_LEVELS:
        raise UserError(f"log level {name!r} is not one of {', '.join(LOG_LEVELS)} "
                         f"(from the tool's option or {LOG_LEVEL_ENV})")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _TqdmHandler)]:
        root.removeHandler(handler)
    for stream, levels in (("stdout", lambda n: n < logging.WARNING),
                           ("stderr", lambda n: n >= logging.WARNING)):
        handler = _TqdmHandler(stream, levels)
        handler.setFormatter(_Formatter())
        root.addHandler(handler)
    root.setLevel(logging.WARNING)  # the libraries' warnings and errors, not their chatter
    for ours in OUR_LOGGERS:
        logging.getLogger(ours).setLevel(name.upper())
    logging.captureWarnings(True)
