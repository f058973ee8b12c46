"""One stream's good samples in order, from a position that a checkpoint can hold.

A stream is read a shuffle block at a time: the next `shuffle_buffer` records from a
known tar position, permuted by an RNG seeded from (seed, epoch, stream, segment, sample
number), so that a position is (segment, the block's byte offset and first sample
number, records taken) and a resume re-reads at most one block (docs/data-stream.md).
Bad records are skipped and counted here, where they are consumed, so counts are exact
across resumes.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from pipeline.data.augmentation import derive_seed
from pipeline.data.decode import try_decode
from pipeline.data.format import MANIFEST_MISMATCH, Entry, Skip
from pipeline.data.shards import read_range
from pipeline.data.stream.plan import EpochPlan

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Sample:
    """A good sample: its key, its members still encoded, its decoded (input, target)
    HWC uint8 pair (None where it was sent from another rank, still encoded)."""
    key: str
    parts: dict[str, bytes]
    pair: tuple | None = None


class StreamReader:
    """One stream's good samples in order, from a position; `position` is always the
    position after what was handed out (and skipped)."""

    def __init__(self, plan: EpochPlan, stream: int, position: StreamPosition):
        self.plan, self.stream, self.position = plan, stream, position.copy()
        self._samples = self._read()

    def next(self) -> Sample | None:
        """The next good sample; None once the stream is dry."""
        return next(self._samples, None)

    def _records(self) -> Iterator[tuple[int, int, Entry | Skip]]:
        """(segment number, sample number in its shard, Entry or Skip) from the position on."""
        plan, p, shards = self.plan, self.position, self.plan.layout.shards
        for number, segment in itertools.islice(enumerate(plan.segments(self.stream)), p.segment, None):
            offset, at = (p.offset, p.index) if number == p.segment else (0, 0)
            for index, record in read_range(segment.shard, shards[segment.shard], segment.first,
                                            segment.end, offset, at):
                yield number, index, record

    def _read(self) -> Iterator[Sample]:
        layout, p = self.plan.layout, self.position
        mismatched, last_good = set(p.mismatched), p.segment
        records = _noting_mismatches(self._records(), mismatched)
        while block := list(itertools.islice(records, layout.cfg.shuffle_buffer)):  # may span segments
            p.mismatched = sorted(mismatched)
            number, index, first = block[0]
            if (p.segment, p.offset, p.index) != (number, first.offset, index):
                p.segment, p.offset, p.index, p.taken = number, first.offset, index, 0
            if p.segment - last_good > 2 * len(layout.shards):  # only resampled draws get here
                log.error("stream %d: no usable sample in %d shard draws; ending it", self.stream,
                          p.segment - last_good)
                return
            order = np.random.default_rng(derive_seed(
                layout.seed, self.plan.epoch, self.stream, number, index, "block")).permutation(len(block))
            while p.taken < len(block):
                record = block[order[p.taken]][2]
                p.taken += 1
                if isinstance(record, Skip):
                    pair, reason = None, record.reason
                else:
                    pair, reason = try_decode(record.key, record.parts, layout.cfg, layout.in_channels,
                                              layout.out_channels)
                if reason is not None:
                    p.skipped[reason] = p.skipped.get(reason, 0) + 1
                    continue
                p.good += 1
                last_good = p.segment
                yield Sample(record.key, record.parts, pair)
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
