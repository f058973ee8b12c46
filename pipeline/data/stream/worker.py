"""The worker protocol: one rank's loader workers, alive for the whole run.

The rank sends each worker a Job (start at this epoch, global sample and stream
positions; or: read the epoch's tail from these positions); the worker then plans and
reads on its own: a Part for every micro-step, epoch after epoch, until a stream of its
runs dry (a last Part with `ended`), or a TailRound at a time until its streams end.
The rank restarts its workers only when the plan changes under them: at the start or a
resume, when some rank's stream ran dry (the tail), after a tail or a resampled epoch cut
short. Workers are one persistent DataLoader (its prefetching, shared-memory tensors,
dead-worker detection), so an epoch boundary costs no fork and the next epoch is read
ahead like any other step (docs/data-stream.md).
"""
from __future__ import annotations

import atexit
import signal
import weakref
from collections.abc import Generator, Iterator
from dataclasses import dataclass, replace

import torch

from pipeline.data.augmentation import derive_seed
from pipeline.data.stream.batch import collate
from pipeline.data.stream.plan import EpochPlan, StreamLayout
from pipeline.data.stream.reader import Sample, StreamPosition, StreamReader
from pipeline.data.stream.tail import TailRound, tail_rounds
from pipeline.distributed import STOP_SIGNALS


@dataclass(frozen=True)
class Job:
    """What a worker reads from a (re)start on: epoch `epoch` from global sample
    `consumed`, its streams from `positions` (the epochs after it from their starts);
    with `tail`, the epoch's tail from `positions` instead, which ends the job."""
    epoch: int
    consumed: int
    positions: dict[int, StreamPosition]
    tail: bool = False


@dataclass
class Part:
    """One worker's part of one micro-step (from global sample `consumed` of `epoch`) of
    this rank's batch: the global sample numbers it holds, collated (None: the step holds
    none of its streams' samples), and its streams' positions after it. `ended`: one of
    its streams ran dry before the step was full (no batch; the last message of its job)."""
    worker: int
    epoch: int
    consumed: int
    numbers: list[int]
    batch: dict | None
    positions: dict[int, StreamPosition]
    ended: bool = False

    def pin_memory(self) -> Part:
        """The DataLoader's pin-memory thread calls this (page-locked: faster to a GPU)."""
        if self.batch is None:
            return self
        return replace(self, batch={name: value.pin_memory() if isinstance(value, torch.Tensor) else value
                                    for name, value in self.batch.items()})


def fresh_positions(layout: StreamLayout, worker: int) -> dict[int, StreamPosition]:
    return {s: StreamPosition() for s in layout.streams_of(worker)}


def worker_messages(layout: StreamLayout, worker: int, job: Job,
                    device_augment: bool) -> Iterator[Part | TailRound]:
    """Everything one worker sends for one job (see Job)."""
    if job.tail:
        yield from tail_rounds(layout.epoch(job.epoch), worker, job.positions)
        return
    epoch, consumed, positions = job.epoch, job.consumed, job.positions
    while not (yield from epoch_parts(layout.epoch(epoch), worker, consumed, positions, device_augment)):
        epoch, consumed, positions = epoch + 1, 0, fresh_positions(layout, worker)


def epoch_parts(plan: EpochPlan, worker: int, consumed: int, positions: dict[int, StreamPosition],
                device_augment: bool) -> Generator[Part, None, bool]:
    """One worker's Parts of one epoch from global sample `consumed` to its end; returns
    whether a stream ran dry first (its last Part `ended`)."""
    layout = plan.layout
    readers = {s: StreamReader(plan, s, positions[s]) for s in layout.streams_of(worker)}
    snapshot = lambda: {s: r.position.copy() for s, r in readers.items()}
    # the epoch ends on the last whole update from `consumed`, as the loader's does (a
    # resume with another update size starts between two of the new updates)
    end = consumed + (layout.limit - consumed) // layout.update * layout.update
    while consumed + layout.window <= end:
        picked: list[tuple[int, Sample]] = []
        for j in layout.rank_samples(consumed):
            if layout.worker_of(j) != worker:
                continue
            reader = readers[j % layout.streams]
            if reader.position.good != j // layout.streams:
                raise RuntimeError(f"stream {j % layout.streams} is at good sample {reader.position.good}, "
                                   f"global sample {j} needs {j // layout.streams}")
            sample = reader.next()
            if sample is None:
                yield Part(worker, plan.epoch, consumed, [], None, snapshot(), ended=True)
                return True
            picked.append((j, sample))
        batch = collate([s for _, s in picked], layout, plan.epoch, device_augment) if picked else None
        yield Part(worker, plan.epoch, consumed, [j for j, _ in picked], batch, snapshot())
        consumed += layout.window
    return False


class _RunStream(torch.utils.data.IterableDataset):
    """In worker w: worker_messages for the next Job on its queue, at each (re)start. A
    queue per worker, made before the fork: a DataLoader's restart carries nothing to its
    workers, and its dataset is their copy from the fork."""

    def __init__(self, layout: StreamLayout, jobs: list, device_augment: bool):
        self.layout, self.jobs, self.device_augment = layout, jobs, device_augment

    def __iter__(self):
        worker = torch.utils.data.get_worker_info().id
        yield from worker_messages(self.layout, worker, self.jobs[worker].get(), self.device_augment)


class Workers:
    """This rank's loader workers for the whole run (data.num_workers processes; none:
    the same messages made in this process). `start` (re)starts every worker on a Job,
    dropping what they had read ahead; `next` is the next message, in worker order (one
    Part of each worker a micro-step), None once every worker's job is done."""

    def __init__(self, layout: StreamLayout, device_augment: bool):
        self.layout, self.device_augment = layout, device_augment
        count = layout.cfg.num_workers
        self._jobs = [torch.multiprocessing.Queue() for _ in range(count)]
        self._loader = (WorkerLoader(_RunStream(layout, self._jobs, device_augment), count,
                                     derive_seed(layout.seed, "train-workers"), persistent=True)
                        if count else None)
        self._messages: Iterator[Part | TailRound] = iter(())

    def start(self, job: Job) -> None:
        if self._loader is None:
            self._messages = worker_messages(self.layout, 0, job, self.device_augment)
            if torch.cuda.is_available():
                self._messages = (m.pin_memory() if isinstance(m, Part) else m for m in self._messages)
            return
        for worker, queue in enumerate(self._jobs):
            mine = {s: job.positions[s] for s in self.layout.streams_of(worker)}
            queue.put(replace(job, positions=mine))
        self._messages = iter(self._loader)

    def next(self) -> Part | TailRound | None:
        return next(self._messages, None)

    def close(self) -> None:
        self._messages = iter(())
        if self._loader is not None:
            self._loader.shut_down()


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave stopping to the trainer. Launchers signal a worker's whole
    process group (torchrun's agent, a terminal's Ctrl-C): a loader worker dying of it
    would crash the trainer before it can checkpoint."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class WorkerLoader(torch.utils.data.DataLoader):
    """A DataLoader over a batching IterableDataset that leaves the trainer alone: its
    base seed comes from a private generator (drawing from the global torch RNG would
    shift the trainer's dropout masks after every resume), and its workers ignore stop
    signals (held while they fork, so none lands before they can ignore it).
    `persistent`: the workers outlive an iteration; iterating again restarts them. At
    interpreter exit multiprocessing stops daemonic children with SIGTERM, which these
    ignore, then waits for them: persistent workers are shut down before (_shut_down_all)."""

    def __init__(self, dataset, num_workers: int, seed: int, persistent: bool = False):
        super().__init__(dataset, batch_size=None, num_workers=num_workers,
                         pin_memory=torch.cuda.is_available(),
                         worker_init_fn=ignore_stop_signals,
                         generator=torch.Generator().manual_seed(seed),
                         persistent_workers=persistent and num_workers > 0)
        if self.persistent_workers:
            _PERSISTENT.add(self)

    def shut_down(self) -> None:
        """Persistent workers: stopped now (the next iteration forks new ones)."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None:
            iterator._shutdown_workers()

    def __iter__(self):
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


_PERSISTENT: weakref.WeakSet[WorkerLoader] = weakref.WeakSet()


@atexit.register  # after multiprocessing's exit handler is registered: so it runs before it
def _shut_down_all() -> None:
    for loader in list(_PERSISTENT):
        loader.shut_down()
