"""Named fault points for tests: a process dies, or a batch turns NaN, exactly there.

    P2P_FAULT=NAME          the first time the code reaches NAME
    P2P_FAULT=NAME:N        the N-th time
    P2P_FAULT=NAME:N@RANK   ... only in the process whose RANK (launcher's env) is RANK
    P2P_FAULT=NAME~S        sleep_point NAME: sleep S seconds each time it is reached

Unset (always, outside tests) every point is a no-op: one dictionary lookup.
"""
from __future__ import annotations

import os
import signal
import time

_reached: dict[str, int] = {}


def triggered(name: str) -> bool:
    """True once: when P2P_FAULT names this point and it is reached for the N-th time."""
    spec = os.environ.get("P2P_FAULT")
    if not spec:
        return False
    target, _, rank = spec.partition("@")
    target, _, nth = target.partition(":")
    if target != name or (rank and rank != os.environ.get("RANK", "0")):
        return False
    _reached[name] = _reached.get(name, 0) + 1
    return _reached[name] == int(nth or 1)


def kill_point(name: str) -> None:
    """Die here with SIGKILL, as a power cut or the OOM killer would: nothing unwinds."""
    if triggered(name):
        os.kill(os.getpid(), signal.SIGKILL)


def sleep_point(name: str) -> None:
    """Sleep here every time, as a slow disk or a big model would (tests: a long evaluation)."""
    spec = os.environ.get("P2P_FAULT", "")
    target, _, seconds = spec.partition("~")
    if seconds and target == name:
        time.sleep(float(seconds))
