"""The stream's arithmetic: each epoch's shard order, its V streams and which reader
reads what. Pure functions of (seed, epoch, streams) and the run's layout, so that every
rank and worker computes the same plan without asking anyone (docs/data-stream.md)."""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.augmentation import Geometry, derive_seed
from pipeline.data.shards import Shard

# data.streams=0 on a fresh start: lcm(readers, AUTO_STREAMS), so that halving the world or a
# 3-way split still divides it, when every stream gets MIN_STREAM_SAMPLES; else one stream a
# reader (a small dataset: each bad sample can cost an epoch about V samples at its end)
AUTO_STREAMS, MIN_STREAM_SAMPLES = 12, 1000


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


def resampled_segments(shards: tuple[Shard, ...], seed: int, epoch: int, stream: int) -> Iterator[Segment]:
    """Endless whole-shard draws with replacement, distinct per stream."""
    rng = np.random.default_rng(derive_seed(seed, epoch, stream, "resampled"))
    while True:
        i = int(rng.integers(len(shards)))
        yield Segment(i, 0, shards[i].samples)


def auto_streams(readers: int, samples: int) -> int:
    """data.streams=0 on a fresh start (see AUTO_STREAMS)."""
    streams = math.lcm(readers, AUTO_STREAMS)
    return streams if samples >= streams * MIN_STREAM_SAMPLES else readers


@dataclass(frozen=True)
class StreamLayout:
    """What one rank's stream is for the whole run (picklable: each loader worker gets
    one copy when it starts). Stream s is read by rank s % world_size and, there, by
    worker (s // world_size) % workers."""
    cfg: DataConfig
    shards: tuple[Shard, ...]  # the manifest's, empty ones left out
    seed: int
    rank: int
    world_size: int
    workers: int  # logical workers: max(1, data.num_workers)
    streams: int  # V
    in_channels: int
    out_channels: int
    accumulate: int = 1  # batches per optimiser update (train.grad_accum)
    multiple: int = 1  # the generator's size multiple (uncropped sizes are rounded to it)

    @cached_property
    def geometry(self) -> Geometry:
        return Geometry.of(self.cfg, self.multiple)

    @property
    def window(self) -> int:
        """Global samples per micro-step: batch x world."""
        return self.cfg.batch_size * self.world_size

    @property
    def update(self) -> int:
        """Global samples per optimiser update: an epoch ends on a whole number of them."""
        return self.window * self.accumulate

    @cached_property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @cached_property
    def limit(self) -> int:
        """Global samples an epoch hands out at most: the dataset's whole updates (exact),
        or as many updates as the dataset has samples for, at least one (resampled)."""
        if self.cfg.mode == "resampled":
            return max(1, self.samples // self.update) * self.update
        return self.samples // self.update * self.update

    @property
    def updates_per_epoch(self) -> int:
        return self.limit // self.update

    def streams_of(self, worker: int) -> list[int]:
        """This rank's streams that `worker` reads."""
        return [s for s in range(self.rank, self.streams, self.world_size)
                if (s // self.world_size) % self.workers == worker]

    def worker_of(self, j: int) -> int:
        """The worker (of the rank that reads it) reading global sample j."""
        return (j % self.streams // self.world_size) % self.workers

    def rank_samples(self, consumed: int) -> range:
        """This rank's global sample numbers in the micro-step starting at `consumed`:
        `batch` of every window of batch x world consecutive ones, from any start."""
        return range(consumed + (self.rank - consumed) % self.world_size, consumed + self.window,
                     self.world_size)

    def epoch(self, epoch: int) -> EpochPlan:
        return EpochPlan(self, epoch)


@dataclass
class EpochPlan:
    """One epoch of a layout: where each stream's samples are."""
    layout: StreamLayout
    epoch: int

    @cached_property
    def _exact_segments(self) -> list[list[Segment]]:
        shards = self.layout.shards
        order = epoch_shards(list(range(len(shards))), self.layout.seed, self.epoch)
        return stream_segments([s.samples for s in shards], order, self.layout.streams)

    def segments(self, stream: int) -> Iterator[Segment]:
        if self.layout.cfg.mode == "resampled":
            return resampled_segments(self.layout.shards, self.layout.seed, self.epoch, stream)
        return iter(self._exact_segments[stream])
