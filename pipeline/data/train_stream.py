"""The training stream: shards -> V streams -> readers -> equal batches per rank.

One epoch's order depends on (seed, epoch, streams) only, never on how many processes
and workers read it, so a run resumes mid-epoch on another world size (MosaicML
streaming's canonical streams, here with sample-exact ranges):

* epoch_shards shuffles the shards with (seed, epoch); their samples, in that order, are
  cut into `streams` (V) contiguous ranges whose lengths differ by at most one
  (stream_segments). A range may start and end inside a shard: a reader skips the
  members before it undecoded (shards.read_range), at most one shard per stream and epoch.
  In resampled mode a stream is instead an endless seeded draw of whole shards.
* Global sample j of the epoch is stream j % V's (j // V)-th good sample. Stream s is
  read by rank s % world and, there, by loader worker (s // world) % workers, so
  processes x workers must divide V. Step i of a rank takes its j in [i*B, (i+1)*B)
  (B = batch x world), sorted: any window of B consecutive j holds exactly `batch` of each
  rank's, so every rank builds full batches on any world size, from any start.
* A bad sample (corrupt image, missing half, cut shard) is refilled by its stream's next
  good sample: the one refill that does not depend on the world size. So a stream with
  bad data runs dry before the others; from the update where one does, the epoch's Tail
  goes on with the rest of every stream in the same round-robin order, the dry streams
  left out (tail_walk), one update at a time: each rank reads its own streams, and two
  small all-gathers per update tell every rank how far each stream goes and hand it the
  update's samples (still encoded), so that every rank still builds full batches. An
  epoch ends on a whole update (U = batch x world x accumulate): it leaves out fewer
  than one global batch of its good samples, with bad data or without, on any world size.
* Shuffle blocks, not a running buffer: a block is the next `shuffle_buffer` samples of
  a stream (across its segments) read from a known tar position and permuted by an RNG seeded from (seed,
  epoch, stream, segment, position), so a stream's position is (segment, byte offset and
  sample number of the block, samples taken) and resuming re-reads at most one block per
  stream. A worker holds its streams' blocks: V / (processes x workers) of them.
* Augmentation is seeded by (seed, epoch, sample key).
* Each worker yields, per step, its part of this rank's batch (possibly empty) with its
  streams' positions; the rank merges one part of every worker by j. The loader's state
  is the epoch, the global samples consumed and the positions of this rank's streams;
  a rank resuming on another world size takes its streams from every old rank's file.
* Bad data (truncated tar, unreadable shard, corrupt image, missing half, too large,
  unsafe member name) is skipped and counted by reason where it is consumed: counts are
  exact across resumes, and nothing raises. A shard holding another sample count than
  its manifest says is counted too (manifest_mismatch) and logged.
* torchdata's StatefulDataLoader is not needed: the positions ride along with the
  batches, and its fast-forward would decode what it skips.
* Do not pass these loaders through accelerator.prepare(): it re-splits or drops data.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property

import numpy as np
import torch

from pipeline.data.augmentation import augment, augment_params, chw, derive_seed, resize_u8, to_unit_range
from pipeline.data.decode import try_decode
from pipeline.data.format import MANIFEST_MISMATCH, Skip
from pipeline.data.shards import Shard, list_shards, read_range
from pipeline.distributed import STOP_SIGNALS
from pipeline.errors import CheckpointMismatch, DataError

log = logging.getLogger(__name__)

STATE_VERSION = 2
# data.streams=0 on a fresh start: lcm(readers, AUTO_STREAMS), so that halving the world or a
# 3-way split still divides it, when every stream gets MIN_STREAM_SAMPLES; else one stream a
# reader (a small dataset: each bad sample can cost an epoch about V samples at its end)
AUTO_STREAMS, MIN_STREAM_SAMPLES = 12, 1000


# ----------------------------------------------------------------------------- streams

def epoch_shards(shards: list, seed: int, epoch: int) -> list:
    """The shard order of one epoch: the same on every rank."""
    order = np.random.default_rng(derive_seed(seed, epoch, "shards")).permutation(len(shards))
    return [shards[i] for i in order]


@dataclass(frozen=True)
class Segment:
    """Samples [first, end) of the shard at `shard` (its index in the shard list)."""
    shard: int
    first: int
    end: int


def stream_segments(counts: list[int], order: list[int], streams: int) -> list[list[Segment]]:
    """The shards in `order` (indices into `counts`), concatenated and cut into `streams`
    contiguous ranges: stream s holds ceil((N - s) / streams) samples, exactly as many as
    there are global sample numbers j < N with j % streams == s."""
    total = sum(counts[i] for i in order)
    lengths = [total // streams + (s < total % streams) for s in range(streams)]
    shards, out = iter(order), []
    shard, taken = next(shards, None), 0  # the shard being cut, samples of it handed out
    for length in lengths:
        segments = []
        while length:
            take = min(length, counts[shard] - taken)
            segments.append(Segment(shard, taken, taken + take))
            taken, length = taken + take, length - take
            if taken == counts[shard]:
                shard, taken = next(shards, None), 0
        out.append(segments)
    return out


def resampled_segments(shards: list[Shard], seed: int, epoch: int, stream: int) -> Iterator[Segment]:
    """Endless whole-shard draws with replacement, distinct per stream."""
    rng = np.random.default_rng(derive_seed(seed, epoch, stream, "resampled"))
    while True:
        i = int(rng.integers(len(shards)))
        yield Segment(i, 0, shards[i].samples)


def auto_streams(readers: int, samples: int) -> int:
    """data.streams=0 on a fresh start (see AUTO_STREAMS)."""
    streams = math.lcm(readers, AUTO_STREAMS)
    return streams if samples >= streams * MIN_STREAM_SAMPLES else readers


@dataclass
class EpochPlan:
    """Everything a worker needs to produce its parts of one epoch (picklable)."""
    cfg: object  # DataConfig
    shards: list
    seed: int
    epoch: int
    rank: int
    world_size: int
    num_workers: int  # logical workers: max(1, cfg.num_workers)
    streams: int
    in_channels: int
    out_channels: int
    accumulate: int = 1  # batches per optimizer update (train.grad_accum)

    @property
    def window(self) -> int:
        """Global samples per step: batch x world."""
        return self.cfg.batch_size * self.world_size

    @property
    def update(self) -> int:
        """Global samples per optimizer update: an epoch ends on a whole number of them."""
        return self.window * self.accumulate

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def limit(self) -> int:
        """Global samples this epoch hands out at most: the dataset's whole updates (exact),
        or as many updates as the dataset has samples for, at least one (resampled)."""
        if self.cfg.mode == "resampled":
            return max(1, self.samples // self.update) * self.update
        return self.samples // self.update * self.update

    @cached_property
    def _exact_segments(self) -> list[list[Segment]]:
        order = epoch_shards(list(range(len(self.shards))), self.seed, self.epoch)
        return stream_segments([s.samples for s in self.shards], order, self.streams)

    def segments(self, stream: int) -> Iterator[Segment]:
        if self.cfg.mode == "resampled":
            return resampled_segments(self.shards, self.seed, self.epoch, stream)
        return iter(self._exact_segments[stream])

    def streams_of(self, rank: int, worker: int) -> list[int]:
        return [s for s in range(self.streams)
                if s % self.world_size == rank and (s // self.world_size) % self.num_workers == worker]

    def worker_of(self, j: int) -> int:
        return (j % self.streams // self.world_size) % self.num_workers

    def rank_samples(self, consumed: int) -> range:
        """This rank's global sample numbers in the step starting at `consumed`."""
        return range(consumed + (self.rank - consumed) % self.world_size, consumed + self.window,
                     self.world_size)


@dataclass
class StreamPosition:
    """Where one stream is in its epoch (plain JSON in a checkpoint's rank file)."""
    segment: int = 0  # index in the stream's segment list (or draw)
    offset: int = 0  # byte offset of the current shuffle block in that shard
    index: int = 0  # the block's first sample number in the shard
    taken: int = 0  # records of the block consumed
    good: int = 0  # good samples handed out this epoch
    skipped: dict[str, int] = field(default_factory=dict)  # this epoch, by reason
    mismatched: list[int] = field(default_factory=list)  # shards not holding the listed count

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, state: dict) -> StreamPosition:
        return cls(**{**state, "skipped": dict(state["skipped"]), "mismatched": list(state["mismatched"])})

    def copy(self) -> StreamPosition:
        return replace(self, skipped=dict(self.skipped), mismatched=list(self.mismatched))


class StreamReader:
    """One stream's good samples in order, from a position; `position` is always the
    position after what was handed out (and skipped)."""

    def __init__(self, plan: EpochPlan, stream: int, position: StreamPosition):
        self.plan, self.stream, self.position = plan, stream, position.copy()
        self._samples = self._read()

    def next(self) -> tuple[str, tuple] | None:
        """(key, (input HWC, target HWC)) of the next good sample; None once dry."""
        record, pair = next(self._samples, (None, None))
        return None if record is None else (record.key, pair)

    def next_record(self) -> tuple[str, dict, tuple] | None:
        """(key, its parts still encoded, (input HWC, target HWC)) of the next good sample;
        None once dry."""
        record, pair = next(self._samples, (None, None))
        return None if record is None else (record.key, record.parts, pair)

    def _records(self) -> Iterator[tuple[int, int, object]]:
        """(segment number, sample number in its shard, Entry or Skip) from the position on."""
        plan, p = self.plan, self.position
        for number, segment in itertools.islice(enumerate(plan.segments(self.stream)), p.segment, None):
            offset, at = (p.offset, p.index) if number == p.segment else (0, 0)
            for index, record in read_range(segment.shard, plan.shards[segment.shard], segment.first,
                                            segment.end, offset, at):
                yield number, index, record

    def _read(self) -> Iterator[tuple[str, tuple]]:
        plan, p, cfg = self.plan, self.position, self.plan.cfg
        mismatched, last_good = set(p.mismatched), p.segment
        records = _noting_mismatches(self._records(), mismatched)
        while block := list(itertools.islice(records, cfg.shuffle_buffer)):  # may span segments
            p.mismatched = sorted(mismatched)
            number, index, first = block[0]
            if (p.segment, p.offset, p.index) != (number, first.offset, index):
                p.segment, p.offset, p.index, p.taken = number, first.offset, index, 0
            if p.segment - last_good > 2 * len(plan.shards):  # only resampled draws get here
                log.error("stream %d: no usable sample in %d shard draws; ending it", self.stream,
                          p.segment - last_good)
                return
            order = np.random.default_rng(derive_seed(
                plan.seed, plan.epoch, self.stream, number, index, "block")).permutation(len(block))
            while p.taken < len(block):
                record = block[order[p.taken]][2]
                p.taken += 1
                if isinstance(record, Skip):
                    pair, reason = None, record.reason
                else:
                    pair, reason = try_decode(record.key, record.parts, cfg, plan.in_channels,
                                              plan.out_channels)
                if reason is not None:
                    p.skipped[reason] = p.skipped.get(reason, 0) + 1
                    continue
                p.good += 1
                last_good = p.segment
                yield record, pair
        p.mismatched = sorted(mismatched)


def _noting_mismatches(records: Iterator, mismatched: set) -> Iterator:
    """The records without MANIFEST_MISMATCH notes, whose shard indices go to `mismatched`:
    a note must stay out of the shuffle blocks (a resumed block is re-read from inside a
    shard, where the note may not come again); a set, as a resume can note it again."""
    for number, index, record in records:
        if isinstance(record, Skip) and record.reason == MANIFEST_MISMATCH:
            mismatched.add(record.shard)
        else:
            yield number, index, record


def worker_parts(plan: EpochPlan, worker: int, consumed: int, positions: dict[int, StreamPosition],
                 device_augment: bool) -> Iterator[dict]:
    """One worker's part of each of this rank's batches, from global sample `consumed` to
    the epoch's end: {"input", "target", "key", "_j" (+ "aug")} or {"_j": []} when the
    step holds none of its streams' samples, each with "_positions" (its streams' after
    it). A stream running dry ends it with {"_end": True, "_positions"}."""
    readers = {s: StreamReader(plan, s, positions[s]) for s in plan.streams_of(plan.rank, worker)}
    snapshot = lambda: {s: r.position.copy() for s, r in readers.items()}
    while consumed + plan.window <= plan.limit:
        picked = []
        for j in plan.rank_samples(consumed):
            if plan.worker_of(j) != worker:
                continue
            reader = readers[j % plan.streams]
            if reader.position.good != j // plan.streams:
                raise RuntimeError(f"stream {j % plan.streams} is at good sample {reader.position.good}, "
                                   f"global sample {j} needs {j // plan.streams}")
            sample = reader.next()
            if sample is None:
                yield {"_end": True, "_positions": snapshot()}
                return
            picked.append((j, *sample))
        part = collate([s[1:] for s in picked], plan, device_augment) if picked else {}
        yield {**part, "_j": [s[0] for s in picked], "_positions": snapshot()}
        consumed += plan.window


def collate(samples: list, plan: EpochPlan, device_augment: bool) -> dict:
    """[(key, (input HWC, target HWC))] -> a batch. Worker augmentation gives float
    [-1, 1] crops; device augmentation gives uint8 images (their own size when the batch
    agrees on one, else resized to load_size here) plus "aug" params for to_device."""
    cfg = plan.cfg
    keys = [key for key, _ in samples]
    params = torch.tensor([augment_params(plan.seed, plan.epoch, k, cfg) for k in keys])
    halves = []
    for side in (0, 1):
        images = [chw(pair[side]) for _, pair in samples]
        if not device_augment:
            crops = [augment(im, params[i:i + 1], cfg) for i, im in enumerate(images)]
            halves.append(to_unit_range(torch.cat(crops)))
        elif len({im.shape for im in images}) == 1:
            halves.append(torch.cat(images))
        else:
            halves.append(torch.cat([resize_u8(im, cfg.load_size) for im in images]))
    batch = {"input": halves[0], "target": halves[1], "key": keys}
    if device_augment:
        batch["aug"] = params
    return batch


class _EpochStream(torch.utils.data.IterableDataset):
    """One epoch of one rank: DataLoader worker w runs worker_parts for worker w."""

    def __init__(self, plan: EpochPlan, consumed: int, positions: dict, device_augment: bool):
        self.plan, self.consumed, self.positions = plan, consumed, positions
        self.device_augment = device_augment

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        for part in worker_parts(self.plan, worker, self.consumed, self.positions, self.device_augment):
            part["_worker"] = worker
            yield part


def merge_parts(parts: list[dict], cfg) -> dict:
    """The workers' parts of one step -> this rank's batch, in global sample order."""
    parts = [p for p in parts if p["_j"]]
    numbers = [j for p in parts for j in p["_j"]]
    order = sorted(range(len(numbers)), key=numbers.__getitem__)
    batch = {"key": [[k for p in parts for k in p["key"]][i] for i in order]}
    index = torch.tensor(order)
    for name in ("input", "target", "aug"):
        if name not in parts[0]:
            continue
        tensors = [p[name] for p in parts]
        if name != "aug" and len({t.shape[1:] for t in tensors}) > 1:  # device augmentation, mixed sizes
            tensors = [resize_u8(t, cfg.load_size) for t in tensors]
        batch[name] = torch.cat(tensors)[index]
    return batch


# -------------------------------------------------------------------------- workers

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
    signals (held while they fork, so none lands before they can ignore it)."""

    def __init__(self, dataset, num_workers: int, seed: int):
        super().__init__(dataset, batch_size=None, num_workers=num_workers,
                         pin_memory=torch.cuda.is_available(),
                         worker_init_fn=ignore_stop_signals,
                         generator=torch.Generator().manual_seed(seed))

    def __iter__(self):
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)




# ----------------------------------------------------------------------------- tail

@dataclass(frozen=True)
class TailStatus:
    """What one stream holds in the epoch's tail: good samples consumed, read ahead of
    them, and whether there are no more."""
    good: int
    ahead: int
    ended: bool


def tail_walk(status: dict[int, TailStatus], want: int) -> tuple[list[tuple[int, int]], bool]:
    """The next `want` (stream, good sample number) of the global order continued over the
    streams that still have samples: round r holds stream s's r-th good sample for every s
    in order that has one (before a stream runs dry: global sample j = stream j % V's
    (j // V)-th). Returns (order, known): known is False when a stream that has not
    ended ran out of read-ahead before `want` were found (read further and walk again);
    fewer than `want` with known=True: every stream has ended."""
    live = [st.good for st in status.values() if st.ahead or not st.ended]
    order, r = [], min(live, default=0)  # live streams are at most a round apart
    while len(order) < want:
        if all(st.ended and r >= st.good + st.ahead for st in status.values()):
            return order, True
        for s in sorted(status):
            st = status[s]
            if st.good <= r < st.good + st.ahead:
                order.append((s, r))
                if len(order) == want:
                    break
            elif r >= st.good + st.ahead and not st.ended:
                return order, False
        r += 1
    return order, True


def tail_rounds(plan: EpochPlan, worker: int, positions: dict[int, StreamPosition]) -> Iterator[dict]:
    """One worker's streams in the tail, a round at a time: {stream: (key, encoded parts,
    pair, position after it)} of every stream not yet ended, or {stream: position} at its
    end (its skips past the last good sample count)."""
    readers = {s: StreamReader(plan, s, positions[s]) for s in plan.streams_of(plan.rank, worker)}
    while readers:
        chunk = {}
        for s, reader in list(readers.items()):
            sample = reader.next_record()
            chunk[s] = reader.position.copy() if sample is None else (*sample, reader.position.copy())
            if sample is None:
                del readers[s]
        yield chunk


class _TailRounds(torch.utils.data.IterableDataset):
    def __init__(self, plan: EpochPlan, positions: dict):
        self.plan, self.positions = plan, positions

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        return tail_rounds(self.plan, info.id if info else 0, self.positions)


class Tail:
    """The rest of an epoch once a stream ran dry (bad data ended it early): one update
    at a time, in the global order over the streams that still have samples (tail_walk).
    Each rank's loader workers read its streams a little ahead (tail_rounds); the rank
    tells every rank how far (one all-gather) and hands it the update's samples it holds,
    still encoded (a second one): a rank's memory is the read-ahead plus one update,
    whatever is left. `positions` are its streams' after what was consumed: a checkpoint
    in the tail is those, as before it."""

    def __init__(self, plan: EpochPlan, positions: dict[int, StreamPosition],
                 gather_all_ranks: Callable[[object], list], num_workers: int):
        self.plan, self.gather_all_ranks, self.positions = plan, gather_all_ranks, dict(positions)
        self._rounds = iter(WorkerLoader(_TailRounds(plan, self.positions), num_workers,
                                         derive_seed(plan.seed, plan.epoch, "tail")))
        self._ahead = {s: [] for s in positions}  # [(key, parts, pair, position after it)]
        self._end = {}  # stream -> its position at its end
        self.left = 0  # once the tail is over: the good samples it left out (less than an update)

    def next_update(self, want: int) -> list[tuple[str, dict, tuple | None]] | None:
        """The next `want` global samples as (key, encoded parts, the decoded pair where
        this rank read it, else None), every rank's; None (on every rank) when the streams
        hold fewer."""
        alive, horizon = self.plan.streams, 0
        while True:
            horizon += -(-want // max(1, alive)) + 1  # rounds to read ahead
            status = self._status(horizon)
            order, known = tail_walk(status, want)
            if known:
                break
            alive = sum(not st.ended for st in status.values())
        if len(order) < want:
            self.left = len(order)
            for s in self._ahead:
                self._consume(s, 0)  # an ended stream's skips count
            return None
        mine = {(s, r): self._ahead[s][r - self.positions[s].good][:3] for s, r in order if s in self._ahead}
        samples = {k: (*v, None) for part in self._gather({k: v[:2] for k, v in mine.items()})
                   for k, v in part.items()}
        for s in self._ahead:
            self._consume(s, sum(stream == s for stream, _ in order))
        return [mine.get(at, samples[at]) for at in order]

    def _status(self, horizon: int) -> dict[int, TailStatus]:
        """Every stream's TailStatus, this rank's read `horizon` samples ahead (or to their end)."""
        while any(s not in self._end and len(a) < horizon for s, a in self._ahead.items()):
            self._read_round()
        own = {s: TailStatus(self.positions[s].good, len(ahead), s in self._end)
               for s, ahead in self._ahead.items()}
        return {s: st for part in self._gather(own) for s, st in part.items()}

    def _read_round(self) -> None:
        """One more round of this rank's workers' streams into the read-ahead."""
        for s, item in next(self._rounds).items():
            if isinstance(item, StreamPosition):
                self._end[s] = item
            else:
                self._ahead[s].append(item)

    def _consume(self, stream: int, n: int) -> None:
        """Hands out `n` of the stream's read-ahead. Taking all of it, its end is read
        first: whether the skips past its last good sample count must not depend on how
        far this rank's workers happened to read (the layout), or skip counts would."""
        while n and stream not in self._end and len(self._ahead[stream]) <= n:
            self._read_round()
        taken, self._ahead[stream] = self._ahead[stream][:n], self._ahead[stream][n:]
        if taken:
            self.positions[stream] = taken[-1][3]
        if stream in self._end and not self._ahead[stream]:  # its skips past the last good sample
            self.positions[stream] = self._end[stream]

    def _gather(self, obj) -> list:
        everyone = self.gather_all_ranks(obj)
        if len(everyone) != self.plan.world_size:
            raise RuntimeError(f"gather_all_ranks gave {len(everyone)} parts for "
                               f"{self.plan.world_size} ranks")
        return everyone


# -------------------------------------------------------------------------- train loader

class TrainLoader:
    """Endless batches across epochs: `batch = next(loader)`.

    Batches are {"input", "target": Tensor, "key": list[str], "epoch": int} (+ "aug"
    when augment_on == "device": pass them through to_device). `epoch` is the epoch of
    the next batch, `consumed` the global samples of it handed out before the next step
    (every rank's, the same on every rank), `steps_per_epoch` the steps an epoch has on
    this layout without bad data: its whole updates of U = batch x world x `accumulate`
    (train.grad_accum) samples, in steps of batch x world. An epoch ends on an update's
    end, so an update never mixes epochs.

    Equal steps on every rank, always: each rank takes `batch` of every B = batch x world
    consecutive global samples. An update's batches are read together, and
    `have_batch_all_ranks(have_all)` (an all-reduce MIN across ranks supplied by the
    trainer, once an update) tells every rank together when some stream ran dry (bad
    data). From there the epoch goes on through its Tail (the other streams' rest in the
    global order, read by each rank's loader workers), whose `gather_all_ranks(obj)` (an
    all-gather of objects) hands every rank the update's samples wherever they were read. The epoch
    ends with fewer than U good samples unread, with bad data or without. With
    world_size > 1 both are required.

    `state_dict()` is this rank's part (plain JSON): {"version", "epoch", "consumed",
    "tail" (in the epoch's tail),
    "streams", "positions": {stream: {"segment", "offset", "index", "taken", "good",
    "skipped", "mismatched"}} for this rank's streams, "skipped_before" (earlier epochs),
    and "seed", "mode", "shuffle_buffer", "rank", "world_size", "num_workers",
    "batch_size"}. `load_state_dict(states)` takes every rank's (a resume on another
    world size or worker count takes its streams from whichever held them) and continues
    the epoch at the next global sample: the same samples, the same augmentation,
    consumed data skipped undecoded (one shuffle block per stream at most read again).
    `skipped` counts what bad data dropped, by reason (shards and samples), and as
    "manifest_mismatch" the shards found holding another sample count than the manifest
    says (logged as warnings; the epoch is planned from the manifest).
    """

    def __init__(self, cfg, shards: list[Shard], *, rank: int, world_size: int,
                 seed: int, in_channels: int, out_channels: int,
                 have_batch_all_ranks: Callable[[bool], bool] | None,
                 gather_all_ranks: Callable[[object], list] | None = None, accumulate: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if world_size > 1 and have_batch_all_ranks is None:
            raise ValueError("world_size > 1 needs have_batch_all_ranks (an all-reduce MIN) "
                             "so that ranks end an epoch together when one runs out")
        # the manifest's counts plan every epoch: a shard listed as empty is not read at all
        shards = [shard for shard in shards if shard.samples > 0]
        self.cfg, self.shards, self.rank, self.world_size = cfg, shards, rank, world_size
        self.seed, self.in_channels, self.out_channels = seed, in_channels, out_channels
        self.num_workers, self.accumulate = max(1, cfg.num_workers), accumulate
        self.have_batch_all_ranks = have_batch_all_ranks or (lambda have_one: have_one)
        self.gather_all_ranks = gather_all_ranks or (None if world_size > 1 else lambda obj: [obj])
        if not shards:
            raise DataError("no training shards (every shard the manifest lists is empty)")
        self.streams = self._check_streams(cfg.streams or auto_streams(
            world_size * self.num_workers, sum(s.samples for s in shards)))
        self.epoch, self._skipped_before = 0, Counter()
        self._reset_epoch()

    def _check_streams(self, streams: int, saved: bool = False) -> int:
        readers = self.world_size * self.num_workers
        if streams % readers:
            fits = [n for n in range(1, self.num_workers + 1) if streams % (self.world_size * n) == 0]
            where = "the checkpoint's data stream has" if saved else "data.streams ="
            raise DataError(f"{where} {streams} streams, not a multiple of {self.world_size} processes x "
                            f"{self.num_workers} workers = {readers}: "
                            + (f"use --data.num_workers={max(fits)}" if fits and saved else
                               "use a world size and data.num_workers whose product divides it"
                               if saved else f"pass a multiple of {readers}, or 0 (auto)"))
        return streams

    def _plan(self) -> EpochPlan:
        return EpochPlan(self.cfg, self.shards, self.seed, self.epoch, self.rank, self.world_size,
                         self.num_workers, self.streams, self.in_channels, self.out_channels,
                         self.accumulate)

    def _reset_epoch(self) -> None:
        self._iterator, self.consumed = None, 0
        self._tail, self._in_tail, self._pending = None, False, []
        self._positions = {s: StreamPosition() for w in range(self.num_workers)
                           for s in self._plan().streams_of(self.rank, w)}
        plan = self._plan()
        self.window, self.update, self.limit = plan.window, plan.update, plan.limit
        self.steps_per_epoch = plan.limit // plan.window
        if self.steps_per_epoch == 0:
            raise DataError(f"epoch {self.epoch} has no full global batch of {self.cfg.batch_size} per rank "
                            f"x {self.accumulate} accumulated x {self.world_size} rank(s): "
                            f"{plan.samples} samples")
        log.info("data: epoch %d plans %d steps on each of %d rank(s) from %d streams", self.epoch,
                 self.steps_per_epoch, self.world_size, self.streams)

    def _end_epoch(self) -> None:
        self._skipped_before = Counter(self.skipped)
        self.epoch += 1
        self._reset_epoch()

    @property
    def in_tail(self) -> bool:
        """In the epoch's tail: a stream ran dry, the rest of the others follows (Tail)."""
        return self._in_tail

    def _start_iterator(self):
        dataset = _EpochStream(self._plan(), self.consumed, self._positions,
                               self.cfg.augment_on == "device")
        return iter(WorkerLoader(dataset, self.cfg.num_workers, derive_seed(self.seed, self.epoch)))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while (batch := self._next_batch()) is None:
            self._end_epoch()
        self.consumed += self.window
        return {**batch, "epoch": self.epoch}

    def _next_batch(self) -> dict | None:
        """This rank's part of the epoch's next global batch; None when the epoch is over
        (on every rank together)."""
        if self._pending:  # the rest of this update's batches
            return self._pending.pop(0)
        if self._in_tail:
            return self._tail_batch()
        if self.consumed + self.update > self.limit:
            return None
        if self._iterator is None:
            self._iterator = self._start_iterator()
        held, batches = dict(self._positions), []  # an update's batches, or none of them
        while len(batches) < self.accumulate and (batch := self._fetch()) is not None:
            batches.append(batch)
        if self.have_batch_all_ranks(len(batches) == self.accumulate):
            self._pending = batches[1:]
            return batches[0]
        self._iterator = None
        if self.cfg.mode == "resampled":  # a stream found nothing usable in its draws (logged)
            return self._no_batch() if self.consumed == 0 else None
        self._positions, self._in_tail = held, True  # the streams before this update
        log.info("epoch %d: a stream ran dry after %d of %d global samples; the rest of the others "
                 "follows, gathered across ranks", self.epoch, self.consumed, self.limit)
        return self._tail_batch()

    def _fetch(self) -> dict | None:
        """This rank's next batch (None when a stream ran dry), recording positions: one
        part of every worker, which the DataLoader hands out in worker order."""
        parts = []
        for _ in range(self.num_workers):
            part = next(self._iterator, None)
            if part is None:
                return None
            self._positions.update(part.pop("_positions"))
            if part.pop("_end", False):
                return None
            parts.append(part)
        return merge_parts(parts, self.cfg)

    def _tail_batch(self) -> dict | None:
        """The next update's batches from the epoch's Tail; None once it is over."""
        if self.gather_all_ranks is None:
            raise RuntimeError("world_size > 1 needs gather_all_ranks (an all-gather of objects) "
                               "to hand out an epoch's tail")
        if self._tail is None:
            self._tail = Tail(self._plan(), self._positions, self.gather_all_ranks, self.cfg.num_workers)
        samples = self._tail.next_update(self.update)
        self._positions = dict(self._tail.positions)
        if samples is None and self.consumed == 0:
            return self._no_batch()
        if samples is None:
            log.info("epoch %d ends after %d global samples; %d good ones (less than one global batch) "
                     "are left out", self.epoch, self.consumed, self._tail.left)
            return None
        plan, device_augment = self._plan(), self.cfg.augment_on == "device"
        batches = []
        for start in range(self.consumed, self.consumed + self.update, self.window):
            mine = [samples[j - self.consumed] for j in plan.rank_samples(start)]
            batches.append(collate([(key, pair or self._decode(key, parts)) for key, parts, pair in mine],
                                   plan, device_augment))
        self._pending = batches[1:]
        return batches[0]

    def _no_batch(self):
        raise DataError(f"epoch {self.epoch} has no usable global batch: its {self.streams} stream(s) "
                        f"hold fewer good samples than {self.update} (skipped: {dict(self.skipped)}); "
                        "fix the data")

    def _decode(self, key: str, parts: dict) -> tuple:
        pair, reason = try_decode(key, parts, self.cfg, self.in_channels, self.out_channels)
        if reason is not None:
            raise RuntimeError(f"{key} decoded once, then not again: {reason}")
        return pair

    @property
    def skipped(self) -> dict[str, int]:
        total = Counter(self._skipped_before)
        for position in self._positions.values():
            total.update(position.skipped)
            total.update({MANIFEST_MISMATCH: len(position.mismatched)})
        return {reason: n for reason, n in total.items() if n}

    def _layout(self) -> dict:
        """What a saved position is only valid under; "data" names the shards themselves
        (their URLs and sample counts): positions on other data would be byte offsets into
        other tars."""
        shards = json.dumps([[shard.url, shard.samples] for shard in self.shards]).encode()
        return {"seed": self.seed, "mode": self.cfg.mode, "shuffle_buffer": self.cfg.shuffle_buffer,
                "data": hashlib.sha256(shards).hexdigest()[:16]}

    def state_dict(self) -> dict:
        """This rank's part as plain JSON types (see load_state_dict), a copy; between
        updates only (an update's batches are read together)."""
        if self._pending:
            raise RuntimeError(f"state_dict() inside an update: {len(self._pending)} of its batches "
                               "not taken yet")
        return json.loads(json.dumps({
            "version": STATE_VERSION, "epoch": self.epoch, "consumed": self.consumed,
            "tail": self._in_tail,
            "streams": self.streams, "positions": {s: p.to_json() for s, p in self._positions.items()},
            "skipped_before": dict(self._skipped_before), **self._layout(), "rank": self.rank,
            "world_size": self.world_size, "num_workers": self.num_workers,
            "batch_size": self.cfg.batch_size}))

    def load_state_dict(self, states: dict | list[dict]) -> None:
        """Continue from every rank's state (one dict: a one-rank run's). The saved stream
        count is taken (data.streams must be 0 or the same); another seed, mode or
        shuffle buffer restarts the saved epoch from its beginning, with a warning."""
        states = [states] if isinstance(states, dict) else states
        if all(state.get("version") == 1 for state in states):  # before the streams
            self._iterator, self.epoch = None, states[0]["epoch"]
            self._reset_epoch()
            log.warning("data position saved by an earlier version (per-rank shard splits): "
                        "restarting epoch %d from its beginning with %d streams", self.epoch, self.streams)
            return
        for state in states:
            if state.get("version") != STATE_VERSION:
                raise CheckpointMismatch(f"data state version {state.get('version')} != {STATE_VERSION}: "
                                         "a checkpoint of another version of this code")
        saved = states[0]
        if self.cfg.streams and self.cfg.streams != saved["streams"]:
            raise CheckpointMismatch(f"data.streams={self.cfg.streams}, but the checkpoint's data stream "
                                     f"has {saved['streams']}: drop --data.streams (0 takes the saved one)")
        self.streams = self._check_streams(saved["streams"], saved=True)
        self._iterator, self.epoch = None, saved["epoch"]
        self._reset_epoch()
        self._skipped_before = sum((Counter(s["skipped_before"]) for s in states
                                    if s["rank"] % self.world_size == self.rank), Counter())
        # a key a checkpoint lacks is one it was saved before recording ("data": older runs)
        changed = {k: f"{saved[k]} -> {v}" for k, v in self._layout().items() if saved.get(k, v) != v}
        if changed:
            data = " (the training data changed: other shards or sample counts)" if "data" in changed else ""
            log.warning("data position saved with another %s%s: restarting epoch %d from its "
                        "beginning", changed, data, self.epoch)
            return
        held = {int(s): p for state in states for s, p in state["positions"].items()}
        missing = sorted(set(self._positions) - set(held))
        if missing:
            raise CheckpointMismatch(f"the checkpoint's rank files hold no position for stream(s) "
                                     f"{missing[:5]}: a rank file is missing")
        self._positions = {s: StreamPosition.from_json(held[s]) for s in self._positions}
        self.consumed, self._in_tail = saved["consumed"], saved.get("tail", False)


def make_train_loader(cfg, *, rank: int, world_size: int, seed: int,
                      in_channels: int, out_channels: int,
                      have_batch_all_ranks: Callable[[bool], bool] | None = None,
                      gather_all_ranks: Callable[[object], list] | None = None,
                      accumulate: int = 1) -> TrainLoader:
    """The training stream of this rank (see TrainLoader). rank/world_size are explicit,
    never read from the environment; do not pass the loader to accelerator.prepare()."""
    shards = list_shards(cfg.train, cfg.train_split)
    return TrainLoader(cfg, shards, rank=rank, world_size=world_size, seed=seed,
                       in_channels=in_channels, out_channels=out_channels,
                       have_batch_all_ranks=have_batch_all_ranks, gather_all_ranks=gather_all_ranks,
                       accumulate=accumulate)


def to_device(batch: dict, device, *, cfg, channels_last: bool,
              dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target) on `device` (non_blocking), in [-1, 1], as `dtype`. A batch made
    with augment_on == "device" (it has "aug") is resized, cropped and flipped here,
    batched, with the worker-computed (seed, epoch, key) params."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out = []
    for name in ("input", "target"):
        images = batch[name].to(device, non_blocking=True)
        if "aug" in batch:
            images = to_unit_range(augment(images, batch["aug"], cfg), dtype)
        out.append(images.to(dtype=dtype, memory_format=memory_format))
    return out[0], out[1]


