"""One writer per run folder: a lease that rank 0 holds while the run lives.

Two trainers writing one run folder (a job submitted twice, a requeue overlapping the old
job, two people picking the same name) interleave their checkpoints and logs, and one's
start-up clean-up deletes the other's checkpoint in progress. Atomic files cannot prevent
that; a single writer can. `RUN/lease.json` names the holder (host, pid, job, generation)
and a heartbeat that a thread renews every `train.lease_seconds / 4`:
  - it is taken atomically (a hard link that fails where the file exists: one taker wins
    a race) and, where the file system honours
    it, a POSIX lock beside it (released by the kernel when the holder dies, however it
    dies, and never held by its forked children);
  - a successor of the holder (the same Slurm job requeued, SLURM_RESTART_COUNT higher, or
    a worker group torchrun's agent restarted) waits, bounded, for the holder's release,
    death or expiry, then takes over and says so;
  - anyone else is refused in one line naming the holder and its heartbeat's age, unless
    the holder is gone (its lock free on this host) or its heartbeat is older than
    `train.lease_seconds`: then the lease is taken over with a line saying so.
A holder that finds the lease taken over (it stalled past the expiry) stops at its next
step or checkpoint instead of writing. The lease file is not a run marker (run_folder).
Written by hand: fasteners/filelock give a lock, not a heartbeat, a job identity or a
successor.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass

from pipeline import run_layout
from pipeline.distributed import restart_count
from pipeline.errors import RunError, UserError

log = logging.getLogger(__name__)

FILE = run_layout.LEASE


class LeaseLost(RunError):
    """Another process took the run folder over: this one must not write to it."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    job: str  # the Slurm job, the elastic agent, or this process
    generation: tuple[int, int]  # (Slurm requeues, elastic restarts)
    heartbeat: float = 0.0

    @classmethod
    def this(cls) -> Holder:
        if os.environ.get("SLURM_JOB_ID"):
            job = f"slurm job {os.environ['SLURM_JOB_ID']}"
        elif os.environ.get("TORCHELASTIC_RESTART_COUNT") is not None:
            job = f"torchrun agent {socket.gethostname()}:{os.getppid()}"
        else:
            job = f"process {socket.gethostname()}:{os.getpid()}"
        generation = (int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0), restart_count())
        return cls(socket.gethostname(), os.getpid(), job, generation, time.time())

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        return f"{self.job} (pid {self.pid} on {self.host}, heartbeat {age:.0f} s ago)"

    def succeeds(self, other: Holder) -> bool:
        """A later start of the same job: requeued by Slurm, or restarted by torchrun's
        agent (rank 0 may then run on another node, under another agent)."""
        restarted_worker = self.generation[1] > 0 and self.job.startswith("torchrun")
        return self.generation > other.generation and (self.job == other.job or restarted_worker)


def read(path: str) -> Holder | None:
    try:
        with open(path) as f:
            raw = json.load(f)
        return Holder(raw["host"], raw["pid"], raw["job"], tuple(raw["generation"]), raw["heartbeat"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):  # cut by a crash mid-write: nobody holds it
        return Holder("?", -1, "unknown (a damaged lease file)", (0, 0), 0.0)


class Lease:
    """Rank 0's hold on a run folder: acquire() before anything is written, check() before
    each write, release() at the end."""

    def __init__(self, run_dir: str, seconds: float):
        self.run_dir, self.seconds = run_dir, seconds
        self.me = Holder.this()
        self.lost: Holder | None = None
        self._lock_fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        return os.path.join(self.run_dir, FILE)

    def acquire(self) -> None:
        """Hold the folder, or raise UserError naming who does (a successor waits first)."""
        os.makedirs(self.run_dir, exist_ok=True)
        deadline, waiting = time.monotonic() + self.seconds + 10, False
        while not self._try_take():
            holder = read(self.path)
            if holder is None:  # its holder is writing it, or just released it
                time.sleep(0.2)
                continue
            if not self.me.succeeds(holder):
                self._unlock()
                raise UserError(f"train.run_dir {self.run_dir} is in use by {holder.describe()}: wait "
                                "for it to end or use another run_dir (a holder that died leaves it "
                                f"after {self.seconds:.0f} s without a heartbeat)")
            if not waiting:
                waiting = True
                log.info(f"{self.run_dir}: waiting up to {self.seconds + 10:.0f} s for {holder.describe()}, "
                         "the run this one succeeds, to release the run folder")
            if time.monotonic() > deadline:
                log.warning(f"{self.run_dir}: {holder.describe()} did not release the run folder "
                            f"within {self.seconds + 10:.0f} s: taking it over as its successor")
                self._write(self.me)
                break
            time.sleep(1)
        self._thread = threading.Thread(target=self._beat, daemon=True, name="lease-heartbeat")
        self._thread.start()

    def _try_take(self) -> bool:
        """True once this process holds the lease; False while a live holder does."""
        if self._lock_fd is None and not self._lock():
            return False  # a live process on this host holds the lock
        aside = self._write_aside(self.me)
        try:
            os.link(aside, self.path)  # whole, and only if nobody holds it: one taker wins
        except FileExistsError:
            os.remove(aside)
            return self._take_over(read(self.path))
        os.remove(aside)
        return True

    def _take_over(self, holder: Holder | None) -> bool:
        """With the lock ours: a holder on this host is dead; one elsewhere has expired,
        or still beats (False)."""
        if holder is None:
            return False  # released meanwhile: try the exclusive create again
        age = time.time() - holder.heartbeat
        if holder.host != self.me.host and age < self.seconds:
            return False
        why = "is gone" if holder.host == self.me.host else f"sent no heartbeat for {age:.0f} s"
        log.warning(f"{self.run_dir}: its last holder, {holder.describe()}, {why}: taking the run "
                    "folder over")
        self._write(self.me)
        return True

    def _lock(self) -> bool:
        fd = os.open(os.path.join(self.run_dir, run_layout.LEASE_LOCK), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            # a POSIX lock, not flock(): flock's lock is shared with forked children (the
            # loader workers), which outlive a SIGKILLed trainer by seconds
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held
            os.close(fd)
            return False
        except OSError:  # a file system without locks: the heartbeat alone decides
            pass
        self._lock_fd = fd
        return True

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def _write_aside(self, holder: Holder) -> str:
        aside = f"{self.path}.{os.getpid()}.tmp"
        with open(aside, "w") as f:
            json.dump(asdict(holder), f)
        return aside

    def _write(self, holder: Holder) -> None:
        os.replace(self._write_aside(holder), self.path)

    def _mine(self, holder: Holder | None) -> bool:
        return holder is not None and (holder.host, holder.pid, holder.job) == \
            (self.me.host, self.me.pid, self.me.job)

    def _beat(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            holder = read(self.path)
            if not self._mine(holder):
                self.lost = holder
                return
            if self._lock_fd is None:  # a successor that took over from a live holder
                self._lock()
            self._write(Holder(**{**asdict(self.me), "heartbeat": time.time()}))

    def check(self) -> None:
        """Raise LeaseLost if another process took the folder over (this one stalled)."""
        if self.lost is not None:
            raise LeaseLost(f"{self.run_dir} was taken over by {self.lost.describe()} while this "
                            "run stalled: stopping without writing to it")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._mine(read(self.path)):
            os.remove(self.path)
        self._unlock()

    def moved(self, aside: str) -> None:
        """The folder was moved to `aside` (train.overwrite): hold the new, empty one."""
        self._stop.set()
        self._thread.join()
        self._unlock()
        os.remove(os.path.join(aside, FILE))
        self._stop = threading.Event()
        self.acquire()
