"""How every entry point starts, logs and fails: one convention for all the tools.

    main = cli.entry_point("shard.py", _main)      # _main(argv) -> exit code

- A `UserError` prints `PROG: error: MESSAGE` (one line) and exits 2; a `RunError`
  prints the same and exits 1; any other exception is a bug and keeps its traceback
  (exit 1). Nothing else in the code base decides exit codes for errors. `Parser`, the
  tools' argparse, reports a usage mistake the same way (one line, exit 2).
- `setup_logging` (called by each entry point once its options are parsed): INFO lines
  on stdout (through tqdm, so progress bars stay intact), WARNING and above on stderr,
  every line prefixed `[rank R] ` in multi-process runs; the level (the tool's option,
  else P2P_LOG_LEVEL, else INFO) applies to this project's loggers, the libraries log
  their warnings and errors; Python warnings go through logging too, so they are seen.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from tqdm import tqdm

from pipeline import faults
from pipeline.errors import RunError, UserError

LOG_LEVELS = ("debug", "info", "warning", "error")
# this project's loggers (and a script's own, run as __main__): the level applies to these;
# third-party libraries log at WARNING and above (botocore's INFO lines are not ours to print)
OUR_LOGGERS = ("pipeline", "data_tools", "benchmarks", "__main__")
LOG_LEVEL_ENV = "P2P_LOG_LEVEL"


def entry_point(prog: str, main: Callable[[list[str]], int]) -> Callable[..., int]:
    """`main` behind the error convention: call it with argv (default sys.argv[1:])."""
    def run(argv: list[str] | None = None) -> int:
        try:
            if faults.triggered("cli.bug"):  # tests: an internal error keeps its traceback
                raise RuntimeError(f"{prog}: an injected internal error (P2P_FAULT=cli.bug)")
            return main(sys.argv[1:] if argv is None else list(argv))
        except UserError as err:
            return fail(prog, err, 2)
        except RunError as err:
            return fail(prog, err, 1)
    run.__doc__ = main.__doc__
    return run


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported like every other user error: one line
    (`PROG: error: ...; see PROG --help`), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def fail(prog: str, err: BaseException, code: int) -> int:
    print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
    return code


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def rank_prefix() -> str:
    """`[rank R] ` when the launcher started several processes, else ''."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"[rank {os.environ.get('RANK', '?')}] "
    return ""


class _Formatter(logging.Formatter):
    """INFO as plain sentences; warnings and errors with their level and logger name."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {record.name}: {text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return rank_prefix() + text


class _TqdmHandler(logging.Handler):
    """Writes above a running progress bar instead of through it."""

    def __init__(self, stream: str, levels: Callable[[int], bool]):
        super().__init__()
        self.stream, self.levels = stream, levels  # "stdout"/"stderr": looked up per line

    def filter(self, record: logging.LogRecord) -> bool:
        return self.levels(record.levelno)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = getattr(sys, self.stream)
            tqdm.write(self.format(record), file=stream)
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
