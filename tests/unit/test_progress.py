"""Progress and the paths its output takes, in-process: pipeline/progress.py's lines off a
terminal (when, what, the ETA) and its bar on one; p2p-train's stderr filter, fed bytes as
a pipe delivers them (what passes at once, what waits for its line's end, what is dropped);
cli's names, rank prefixes and print-once of errors (the latter between real processes).
The real launches: tests/integration/test_logging.py, test_entry_points.py."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest

from pipeline import cli, progress
from pipeline.launch import LineFilter, StderrFilter
from tests.helpers.trainer_runs import ROOT


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def lines(caplog, monkeypatch):
    """The INFO lines Progress writes, off a terminal."""
    monkeypatch.setenv(progress.TERMINAL_ENV, "0")
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "pipeline.progress"]


# --------------------------------------------------------------------------- Progress

def test_off_a_terminal_a_line_every_interval_and_one_at_close(lines):
    clock = Clock()
    bar = progress.Progress(400, initial=100, desc="step", unit="step", interval=30, clock=clock)
    assert bar.bar is None
    for _ in range(29):  # 29 steps in 29 s: no line yet
        clock.now += 1
        bar.update(1, D="0.693", G="12.34")
    assert lines() == []
    clock.now += 1
    bar.update(1, D="0.512", G="11.00")  # 30 s: 30 steps at 1 step/s, 270 left
    assert lines() == ["step 130/400 (1 steps/s, ETA 0:04:30) D=0.512 G=11.00"]
    clock.now += 10
    bar.update(20)  # 50 steps in 40 s; the interval counts from the last line: none yet
    assert len(lines()) == 1
    bar.close()
    assert lines()[-1] == "step 150/400 (1.25 steps/s, ETA 0:03:20) D=0.512 G=11.00"
    bar.update(1)
    bar.close()  # closed: nothing more
    assert len(lines()) == 2


def test_eta_for_images_is_hours_and_unknown_before_any_progress(lines):
    clock = Clock()
    bar = progress.Progress(100_000, desc="eval", unit="image", interval=0, clock=clock)
    bar.update(0)  # no time, nothing done: no rate
    clock.now += 3600
    bar.update(20_000, fid=1.5)  # 20k images in an hour: 80k left, 4 hours
    assert lines() == ["eval 0/100000 (0 images/s, ETA ?)",
                       "eval 20000/100000 (5.56 images/s, ETA 4:00:00) fid=1.5"]
    clock.now += 360
    bar.update(80_000)
    assert lines()[-1] == "eval 100000/100000 (25.3 images/s, ETA 0:00:00) fid=1.5"


def test_disabled_progress_writes_nothing_anywhere(lines, capsys, monkeypatch):
    for terminal in ("0", "1"):
        monkeypatch.setenv(progress.TERMINAL_ENV, terminal)
        bar = progress.Progress(10, interval=0, enabled=False)
        bar.update(5, D="1")
        bar.close()
        assert bar.bar is None
    assert lines() == [] and capsys.readouterr() == ("", "")


def test_at_a_terminal_a_tqdm_bar_and_no_lines(lines, capsys, monkeypatch):
    """P2P_TERMINAL=1 (p2p-train's stderr is a terminal) wins over this stderr, a pipe."""
    monkeypatch.setenv(progress.TERMINAL_ENV, "1")
    bar = progress.Progress(4, desc="step", interval=0)
    for _ in range(4):
        bar.update(1, L1="0.100")
    bar.close()
    err = capsys.readouterr().err
    assert "\r" in err and "step: 100%" in err and "4/4" in err and "L1=0.100" in err
    assert lines() == []


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_ENV, "0.5")
    assert progress.Progress(1, enabled=False).interval == 0.5
    monkeypatch.delenv(progress.INTERVAL_ENV)
    assert progress.Progress(1, enabled=False).interval == 30.0


# --------------------------------------------------------------------------- p2p-train's filter

def test_a_bar_passes_as_it_is_drawn_lines_once_they_end():
    keep = StderrFilter()
    assert keep.feed(b"[rank 0] data: ep") == b""  # a line: judged when whole
    assert keep.feed(b"och 0\n\rstep:   1%|") == b"[rank 0] data: epoch 0\n\rstep:   1%|"
    assert keep.feed(b" 1/100 [00:01") == b" 1/100 [00:01"  # a redraw: as far as drawn
    assert keep.feed(b"]\rstep:   2%| 2/100\r") == b"]\rstep:   2%| 2/100\r"
    assert keep.feed(b"step: 100%| 100/100\n") == b"step: 100%| 100/100\n"  # the bar's last
    assert keep.feed(b"Traceback (most recent call last):\n") == b""  # whose? held
    assert keep.feed(b"\rstep:  3%") == b"\rstep:  3%"  # a bar is never held back
    assert keep.feed(b"\n") == b"\n"
    assert keep.feed(b'  File "x.py", line 1\nValueError: bad\n') == (
        b'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: bad\n')
    assert keep.feed(b"no newline yet") == b""
    assert keep.close() == b"no newline yet"


def test_the_launchers_failure_report_is_dropped_whole_even_interleaved():
    report = [
        b"E1207 00:25:59.324000 617 torch/distributed/elastic/multiprocessing/api.py:1002] failed "
        b"(exitcode: 2) local_rank: 1 (pid: 626) of binary: /venv/bin/python\n",
        b"W1207 00:25:59.320000 617 torch/distributed/elastic/multiprocessing/api.py:1028] Sending "
        b"process 625 closing signal SIGTERM\n",
        b"[rank 1] exiting with code 2\n",
        b"Traceback (most recent call last):\n", b'  File "launch.py", line 1, in <module>\n',
        b"[rank 0] exiting with code 1\n",  # a rank's line in between: passes
        b"[rank 0] exiting with code 2\n",  # ... unless it only repeats a user error's line
        b"    raise ChildFailedError(\n",
        b"torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n",
        b"=" * 60 + b"\n", b"pipeline.train FAILED\n", b"-" * 60 + b"\n", b"Failures:\n",
        b"  exitcode  : 2 (pid: 625)\n", b"=" * 60 + b"\n",
        b"=" * 60 + b"\n", b"pipeline/train.py FAILED\n", b"  rank : 0\n", b"=" * 60 + b"\n",  # no traceback
        b"E1207 00:26:00.000000 617 torch/api.py:1002] failed (exitcode: -9) local_rank: 0\n",
        b"=" * 10 + b" a table of ours\n",
    ]
    keep = LineFilter()
    shown = [out for line in report for out in keep.push(line)] + keep.close()
    assert shown == [b"[rank 0] exiting with code 1\n", report[-2], report[-1]]


def test_accelerates_defaults_notice_is_dropped_and_its_traceback_kept_otherwise():
    keep = StderrFilter()
    text = (b"The following values were not passed to `accelerate launch` and had defaults used:\n"
            b"\t`--num_machines` was set to a value of `1`\n"
            b"To avoid this warning pass in values for each of the problematic parameters\n"
            b"p2p-train: error: data.train: no manifest.json\n"
            b"Traceback (most recent call last):\n  File \"train.py\", line 9\nKeyError: 'x'\n")
    assert keep.feed(text) + keep.close() == text[text.index(b"p2p-train"):]


# --------------------------------------------------------------------------- cli

def test_names_come_from_how_the_tool_was_called(monkeypatch):
    monkeypatch.delenv(cli.PROG_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/p2p-shard", "a", "b"])
    assert cli.prog_name("shard.py") == "p2p-shard"
    assert cli.Parser(prog="shard.py").prog == "p2p-shard"
    assert cli.prog_name("p2p-shard merge") == "p2p-shard merge"  # a subcommand's, built on it
    monkeypatch.setattr(sys, "argv", ["/repo/pipeline/train.py"])  # python pipeline/train.py, -m
    assert cli.prog_name("train.py") == "train.py"
    monkeypatch.setenv(cli.PROG_ENV, "p2p-train")  # a rank p2p-train started
    assert cli.prog_name("train.py") == "p2p-train" and cli.prog_name("p2p-train") == "p2p-train"


def test_every_line_of_a_message_carries_the_rank(monkeypatch):
    record = logging.LogRecord("pipeline.train", logging.INFO, "", 0, "config:\nmodel:\n  g: 8", None, None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli._Formatter().format(record) == "[rank 1] config:\n[rank 1] model:\n[rank 1]   g: 8"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cli._Formatter().format(record) == "config:\nmodel:\n  g: 8"


RANK = """
import os, sys
from pipeline import cli
os.environ.update(WORLD_SIZE="2", RANK=sys.argv[1], LOCAL_RANK=sys.argv[1], LOCAL_WORLD_SIZE="2")
cli.say_error("p2p-train", sys.argv[2])
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("messages,expected", [
    (("no manifest", "no manifest"), [[], ["[rank 0] p2p-train: error: no manifest"]]),
    (("no manifest", "rank 1 has no GPU"), [["[rank 1] p2p-train: error: rank 1 has no GPU"],
                                            ["[rank 0] p2p-train: error: no manifest"]]),
])
def test_an_error_every_rank_hits_is_said_once(messages, expected, tmp_path):
    """Two real processes of one parent (as a launcher's ranks), failing together."""
    env = dict(os.environ, P2P_EXIT_FILE=str(tmp_path / "exit-codes"))  # notes in tmp_path
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(rank), message], cwd=ROOT, env=env,
                              stderr=subprocess.PIPE, text=True)
             for rank, message in reversed(list(enumerate(messages)))]
    said = [rank.communicate(timeout=30)[1].splitlines() for rank in ranks]
    assert said == expected
    assert list(tmp_path.iterdir()) == []  # the last rank out took the notes away


def test_a_rank_that_fails_alone_says_so_after_waiting_for_the_others(monkeypatch, tmp_path):
    monkeypatch.setenv("P2P_EXIT_FILE", str(tmp_path / "exit-codes"))
    for name, value in (("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    start = time.monotonic()
    assert not cli.ranks_fail_alike("p2p-train: error: run_dir in use", seconds=0.3)
    assert time.monotonic() - start >= 0.3
