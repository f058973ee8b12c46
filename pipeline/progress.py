"""Progress of a long loop (training steps, evaluated images): a live bar for a person at a
terminal, plain log lines everywhere else.

Why two forms: a tqdm bar redraws one line with carriage returns. At a terminal that is
what a person wants to watch; in a file (a redirected run, a Slurm log) it is hundreds of
redraws glued into one line that nobody can read, and the file says nothing about how far
the run is until that line ends. Off a terminal, `Progress` therefore writes an INFO line

    step 1200/20000 (3.41 steps/s, ETA 1:22:06) D=0.612 G=9.81

every `interval` seconds (default 30, `P2P_PROGRESS_INTERVAL` overrides) and once at
`close()`, and no bar at all.

Which form: the process's stderr (tqdm's stream) decides, unless `P2P_TERMINAL` ("1" or
"0") says otherwise. p2p-train sets it from its own stderr: the trainer's stderr is a pipe
into p2p-train's filter, so the trainer alone could never see the user's terminal.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from datetime import timedelta

from tqdm import tqdm

TERMINAL_ENV = "P2P_TERMINAL"  # "1"/"0": whether the user's output is a terminal (set by p2p-train)
INTERVAL_ENV = "P2P_PROGRESS_INTERVAL"  # seconds between progress lines off a terminal
DEFAULT_INTERVAL = 30.0

log = logging.getLogger(__name__)


def on_terminal() -> bool:
    """Whether a person watches this output: P2P_TERMINAL if set, else stderr's isatty."""
    told = os.environ.get(TERMINAL_ENV, "")
    if told in ("0", "1"):
        return told == "1"
    return sys.stderr.isatty()


def default_interval() -> float:
    try:
        return float(os.environ.get(INTERVAL_ENV) or DEFAULT_INTERVAL)
    except ValueError:
        return DEFAULT_INTERVAL


def duration(seconds: float) -> str:
    """H:MM:SS."""
    return str(timedelta(seconds=max(0, round(seconds))))


def _number(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


class Progress:
    """`update(n, **postfix)` after each unit of work, `close()` at the end. Disabled
    (`enabled=False`: another rank, log.progress false) it does nothing."""

    def __init__(self, total: int | None, initial: int = 0, desc: str = "step", unit: str = "step",
                 enabled: bool = True, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.interval = default_interval() if interval is None else interval
        self.clock, self.postfix, self.closed = clock, {}, not enabled
        self.start_n, self.start = initial, clock()
        self.last_line = self.start  # when the last line was written (lines mode)
        self.bar = None
        if enabled and on_terminal():
            # tqdm adds ": " after the description itself
            self.bar = tqdm(total=total, initial=initial, desc=desc.rstrip(":"), unit=unit, **_width())

    def update(self, n: int = 1, **postfix) -> None:
        if self.closed:
            return
        self.n += n
        if postfix:
            self.postfix = postfix
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)  # shown by this update's redraw
            self.bar.update(n)
        elif self.clock() - self.last_line >= self.interval:
            self.write_line()

    def close(self) -> None:
        """The bar's last redraw, or a last line with the final count."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        else:
            self.write_line()

    def write_line(self) -> None:
        self.last_line = self.clock()
        log.info(self.line())

    def line(self) -> str:
        """`DESC N/TOTAL (R UNITs/s, ETA H:MM:SS) key=value ...`."""
        elapsed = self.clock() - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        timing = f"{_number(rate)} {self.unit}s/s"
        if self.total is not None:
            left = max(self.total - self.n, 0)
            eta = duration(left / rate) if rate > 0 else ("0:00:00" if not left else "?")
            timing += f", ETA {eta}"
        extra = "".join(f" {key}={_number(v) if isinstance(v, float) else v}"
                        for key, v in self.postfix.items())
        return f"{self.desc} {count} ({timing}){extra}"


def _width() -> dict:
    """tqdm's width: its own, resized with the terminal, when stderr is the terminal; else
    (a pipe into p2p-train) the terminal's width now, so that a line never wraps (a
    wrapped bar cannot be redrawn in place)."""
    if sys.stderr.isatty():
        return {"dynamic_ncols": True}
    return {"ncols": shutil.get_terminal_size().columns}
