"""The training loader: one rank's stream as optimiser updates, equal on every rank,
resumable mid-epoch on any world size (docs/data-stream.md says how and why).

It owns the rank's side of the protocol: it starts its workers (worker.py) once and
restarts them only when the plan changes under them, merges their parts into batches,
decides with the other ranks when an epoch goes into its tail (tail.py), and counts
what bad data skipped. Do not pass it through accelerator.prepare(): that re-splits or
drops data.
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

from pipeline.config import DataConfig
from pipeline.data.decode import try_decode
from pipeline.data.format import MANIFEST_MISMATCH
from pipeline.data.shards import Shard, list_shards
from pipeline.data.stream.batch import collate, merge
from pipeline.data.stream.plan import StreamLayout, auto_streams
from pipeline.data.stream.reader import Sample, StreamPosition
from pipeline.data.stream.state import LoaderState, Validity, before_streams
from pipeline.data.stream.tail import Tail
from pipeline.data.stream.worker import Job, Part, Workers
from pipeline.errors import CheckpointMismatch, DataError

log = logging.getLogger(__name__)


@dataclass
class Update:
    """One optimiser update of this rank: train.grad_accum micro-batches (batch.py's
    batches), all of epoch `epoch`."""
    epoch: int
    batches: list[dict]


def check_streams(layout: StreamLayout, saved: bool = False) -> None:
    """Every process x worker reads the same number of streams (a DataError otherwise)."""
    streams, world, workers = layout.streams, layout.world_size, layout.workers
    if streams % (world * workers) == 0:
        return
    fits = [n for n in range(1, workers + 1) if streams % (world * n) == 0]
    where = "the checkpoint's data stream has" if saved else "data.streams ="
    raise DataError(f"{where} {streams} streams, not a multiple of {world} processes x "
                    f"{workers} workers = {world * workers}: "
                    + (f"use --data.num_workers={max(fits)}" if fits and saved else
                       "use a world size and data.num_workers whose product divides it"
                       if saved else f"pass a multiple of {world * workers}, or 0 (auto)"))


class TrainLoader:
    """Endless optimiser updates across epochs: `update = next(loader)`.

    An Update holds `accumulate` (train.grad_accum) batches of this rank. `epoch` is the
    epoch of the next update, `consumed` the global samples of it handed out before the
    next update (the same on every rank), `steps_per_epoch` the updates an epoch has
    without bad data: its whole updates of batch x world x accumulate samples.
    `have_batch_all_ranks(have_all)` (an all-reduce MIN, once an update) and
    `gather_all_ranks(obj)` (an all-gather of objects, in an epoch's tail) are the
    trainer's collectives, required with world_size > 1. `state_dict()` is this rank's
    part (LoaderState's JSON); `load_state_dict(states)` takes every rank's. `skipped`
    counts what bad data dropped, by reason, all epochs.
    """

    def __init__(self, cfg: DataConfig, shards: list[Shard], *, rank: int, world_size: int,
                 seed: int, in_channels: int, out_channels: int,
                 have_batch_all_ranks: Callable[[bool], bool] | None,
                 gather_all_ranks: Callable[[object], list] | None = None, accumulate: int = 1,
                 multiple: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if world_size > 1 and have_batch_all_ranks is None:
            raise ValueError("world_size > 1 needs have_batch_all_ranks (an all-reduce MIN) "
                             "so that ranks end an epoch together when one runs out")
        # the manifest's counts plan every epoch: a shard listed as empty is not read at all
        shards = tuple(shard for shard in shards if shard.samples > 0)
        if not shards:
            raise DataError("no training shards (every shard the manifest lists is empty)")
        workers = max(1, cfg.num_workers)
        streams = cfg.streams or auto_streams(world_size * workers, sum(s.samples for s in shards))
        self.layout = StreamLayout(cfg, shards, seed, rank, world_size, workers, streams, in_channels,
                                   out_channels, accumulate, multiple)
        check_streams(self.layout)
        self.have_batch_all_ranks = have_batch_all_ranks or (lambda have_one: have_one)
        self.gather_all_ranks = gather_all_ranks or (None if world_size > 1 else lambda obj: [obj])
        self._validity = Validity.of(self.layout)
        self._workers: Workers | None = None  # started at the first update, after any resume
        self._running = False  # whether the workers are on this loader's (epoch, consumed, positions)
        self.epoch, self._skipped_before = 0, Counter()
        self._begin_epoch()

    @property
    def streams(self) -> int:
        return self.layout.streams

    @property
    def steps_per_epoch(self) -> int:
        return self.layout.updates_per_epoch

    @property
    def in_tail(self) -> bool:
        """In the epoch's tail: a stream ran dry, the rest of the others follows (tail.py)."""
        return self._in_tail

    def _begin_epoch(self) -> None:
        self.consumed, self._tail, self._in_tail = 0, None, False
        self._positions = {s: StreamPosition() for w in range(self.layout.workers)
                           for s in self.layout.streams_of(w)}
        layout = self.layout
        if layout.limit == 0:
            raise DataError(f"epoch {self.epoch} has no full global batch of {layout.cfg.batch_size} "
                            f"per rank x {layout.accumulate} accumulated x {layout.world_size} rank(s): "
                            f"{layout.samples} samples")
        log.info("data: epoch %d plans %d steps on each of %d rank(s) from %d streams", self.epoch,
                 layout.updates_per_epoch, layout.world_size, layout.streams)

    def _end_epoch(self) -> None:
        self._skipped_before = Counter(self.skipped)
        self.epoch += 1
        self._begin_epoch()  # the workers go on into it by themselves, unless stopped (_running)

    def __iter__(self):
        return self

    def __next__(self) -> Update:
        while (batches := self._next_update()) is None:
            self._end_epoch()
        self.consumed += self.layout.update
        return Update(self.epoch, batches)

    def _next_update(self) -> list[dict] | None:
        """This rank's part of the epoch's next update; None when the epoch is over (on
        every rank together)."""
        layout = self.layout
        if self._in_tail:
            return self._tail_update()
        if self.consumed + layout.update > layout.limit:
            return None
        self._run_workers()
        held, batches = dict(self._positions), []  # an update's batches, or none of them
        while len(batches) < layout.accumulate and (batch := self._fetch(len(batches))) is not None:
            batches.append(batch)
        if self.have_batch_all_ranks(len(batches) == layout.accumulate):
            return batches
        self._running = False  # a stream ran dry here or on another rank: the plan changes
        if layout.cfg.mode == "resampled":  # a stream found nothing usable in its draws (logged)
            return self._no_batch() if self.consumed == 0 else None
        self._positions, self._in_tail = held, True  # the streams before this update
        log.info("epoch %d: a stream ran dry after %d of %d global samples; the rest of the others "
                 "follows, gathered across ranks", self.epoch, self.consumed, layout.limit)
        return self._tail_update()

    def _run_workers(self) -> None:
        """The workers on this loader's position (started, or restarted after a change)."""
        if self._running:
            return
        if self._workers is None:
            self._workers = Workers(self.layout, self.layout.cfg.augment_on == "device")
        self._workers.start(Job(self.epoch, self.consumed, dict(self._positions), tail=self._in_tail))
        self._running = True

    def _fetch(self, k: int) -> dict | None:
        """This rank's k-th batch of the update (None when a stream ran dry), recording
        positions: one Part of every worker, which come in worker order."""
        consumed, batches, numbers = self.consumed + k * self.layout.window, [], []
        for worker in range(self.layout.workers):
            part = self._workers.next()
            if not (isinstance(part, Part) and (part.worker, part.epoch, part.consumed) ==
                    (worker, self.epoch, consumed)):
                raise RuntimeError(f"loader worker {worker}: expected its part of epoch {self.epoch} at "
                                   f"global sample {consumed}, got {_describe(part)}")
            self._positions.update(part.positions)
            if part.ended:
                return None
            if part.numbers:
                batches.append(part.batch)
                numbers.append(part.numbers)
        return merge(batches, numbers, self.layout.cfg)

    def _tail_update(self) -> list[dict] | None:
        """The next update's batches from the epoch's Tail; None once it is over."""
        layout = self.layout
        if self.gather_all_ranks is None:
            raise RuntimeError("world_size > 1 needs gather_all_ranks (an all-gather of objects) "
                               "to hand out an epoch's tail")
        if self._tail is None:
            self._run_workers()  # on the tail, from the positions before the dry update
            self._tail = Tail(layout.epoch(self.epoch), self._positions, self.gather_all_ranks,
                              self._workers.next)
        samples = self._tail.next_update(layout.update)
        self._positions = dict(self._tail.positions)
        if samples is None:
            self._running = False  # the workers' jobs are done: the next epoch starts them again
            if self.consumed == 0:
                return self._no_batch()
            log.info("epoch %d ends after %d global samples; %d good ones (less than one global batch) "
                     "are left out", self.epoch, self.consumed, self._tail.left)
            return None
        device_augment, batches = layout.cfg.augment_on == "device", []
        for start in range(self.consumed, self.consumed + layout.update, layout.window):
            mine = [self._decoded(samples[j - self.consumed]) for j in layout.rank_samples(start)]
            batches.append(collate(mine, layout, self.epoch, device_augment))
        return batches

    def _no_batch(self):
        raise DataError(f"epoch {self.epoch} has no usable global batch: its {self.layout.streams} stream(s) "
                        f"hold fewer good samples than {self.layout.update} (skipped: {dict(self.skipped)}); "
                        "fix the data")

    def _decoded(self, sample: Sample) -> Sample:
        """A sample another rank read, decoded here (it decoded there: it must again)."""
        if sample.pair is not None:
            return sample
        pair, reason = try_decode(sample.key, sample.parts, self.layout.cfg, self.layout.in_channels,
                                  self.layout.out_channels)
        if reason is not None:
            raise RuntimeError(f"{sample.key} decoded once, then not again: {reason}")
        return replace(sample, pair=pair)

    @property
    def skipped(self) -> dict[str, int]:
        total = Counter(self._skipped_before)
        for position in self._positions.values():
            total.update(position.skipped)
            total.update({MANIFEST_MISMATCH: len(position.mismatched)})
        return {reason: n for reason, n in total.items() if n}

    def state_dict(self) -> dict:
        """This rank's part as plain JSON types (LoaderState's), a copy."""
        layout = self.layout
        return LoaderState(self.epoch, self.consumed, self._in_tail, layout.streams,
                           {s: p.copy() for s, p in self._positions.items()}, dict(self._skipped_before),
                           self._validity, layout.rank, layout.world_size, layout.workers,
                           layout.cfg.batch_size).to_json()

    def load_state_dict(self, states: dict | list[dict]) -> None:
        """Continue from every rank's state (one dict: a one-rank run's), at the next
        global sample: the same samples, the same augmentation, consumed data skipped
        undecoded. The saved stream count is taken (data.streams must be 0 or the same);
        another seed, mode, shuffle buffer or data restarts the saved epoch from its
        beginning, with a warning."""
        states = [states] if isinstance(states, dict) else states
        if before_streams(states):
            self._restart_epoch(states[0]["epoch"])
            log.warning("data position saved by an earlier version (per-rank shard splits): "
                        "restarting epoch %d from its beginning with %d streams", self.epoch, self.streams)
            return
        saved = [LoaderState.from_json(state) for state in states]
        first, cfg = saved[0], self.layout.cfg
        if cfg.streams and cfg.streams != first.streams:
            raise CheckpointMismatch(f"data.streams={cfg.streams}, but the checkpoint's data stream "
                                     f"has {first.streams}: drop --data.streams (0 takes the saved one)")
        self._use_streams(first.streams)
        self._restart_epoch(first.epoch)
        self._skipped_before = sum((Counter(s.skipped_before) for s in saved
                                    if s.rank % self.layout.world_size == self.layout.rank), Counter())
        changed = first.validity.changes(self._validity)
        if changed:
            data = " (the training data changed: other shards or sample counts)" if "data" in changed else ""
            log.warning("data position saved with another %s%s: restarting epoch %d from its "
                        "beginning", changed, data, self.epoch)
            return
        held = {s: p for state in saved for s, p in state.positions.items()}
        missing = sorted(set(self._positions) - set(held))
        if missing:
            raise CheckpointMismatch(f"the checkpoint's rank files hold no position for stream(s) "
                                     f"{missing[:5]}: a rank file is missing")
        self._positions = {s: held[s] for s in self._positions}
        self.consumed, self._in_tail = first.consumed, first.tail

    def _use_streams(self, streams: int) -> None:
        """The saved stream count; workers started on another are stopped."""
        if streams == self.layout.streams:
            return
        layout = replace(self.layout, streams=streams)
        check_streams(layout, saved=True)
        self.layout = layout
        self.close()

    def close(self) -> None:
        """Stops the workers now (they stop with the loader anyway); the next update starts
        them again."""
        if self._workers is not None:
            self._workers.close()
        self._workers, self._running = None, False

    def _restart_epoch(self, epoch: int) -> None:
        self.epoch, self._running = epoch, False
        self._begin_epoch()


def _describe(message) -> str:
    if isinstance(message, Part):
        return f"worker {message.worker}'s part of epoch {message.epoch} at global sample {message.consumed}"
    return "the end of its messages" if message is None else type(message).__name__


def make_train_loader(cfg: DataConfig, *, rank: int, world_size: int, seed: int,
                      in_channels: int, out_channels: int,
                      have_batch_all_ranks: Callable[[bool], bool] | None = None,
                      gather_all_ranks: Callable[[object], list] | None = None,
                      accumulate: int = 1, multiple: int = 1) -> TrainLoader:
    """The training stream of this rank (see TrainLoader). rank/world_size are explicit,
    never read from the environment; do not pass the loader to accelerator.prepare().
    `multiple`: the generator's size multiple (model.size_multiple), what sizes the
    uncropped data.preprocess modes give are rounded to."""
    shards = list_shards(cfg.train, cfg.train_split)
    return TrainLoader(cfg, shards, rank=rank, world_size=world_size, seed=seed,
                       in_channels=in_channels, out_channels=out_channels,
                       have_batch_all_ranks=have_batch_all_ranks, gather_all_ranks=gather_all_ranks,
                       accumulate=accumulate, multiple=multiple)
