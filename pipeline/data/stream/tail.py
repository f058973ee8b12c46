"""The epoch's tail: the rest of an epoch once a stream ran dry (bad data ended it early).

From the update where some stream on some rank runs dry, the epoch goes on with the
rest of every stream in the same round-robin order, the dry streams left out
(tail_walk), one update at a time. Each rank's workers read its streams a round at a
time (tail_rounds, in the worker); the rank (Tail) tells every rank how far each stream
goes and hands it the update's samples, still encoded: two all-gathers an update, so
every rank still builds full batches. Why: docs/data-stream.md.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from pipeline.data.stream.plan import EpochPlan
from pipeline.data.stream.reader import Sample, StreamPosition, StreamReader


@dataclass(frozen=True)
class TailStatus:
    """What one stream holds in the epoch's tail: good samples consumed, read ahead of
    them, and whether there are no more."""
    good: int
    ahead: int
    ended: bool


@dataclass(frozen=True)
class TailRead:
    """A good sample a worker read in the tail, and its stream's position after it."""
    sample: Sample
    position: StreamPosition


@dataclass
class TailRound:
    """One round of one worker's streams in the tail: the next good sample of each stream
    that had one, and the position at its end of each that ran dry in this round (the
    skips past its last good sample count)."""
    samples: dict[int, TailRead] = field(default_factory=dict)
    ended: dict[int, StreamPosition] = field(default_factory=dict)


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


def tail_rounds(plan: EpochPlan, worker: int, positions: dict[int, StreamPosition]) -> Iterator[TailRound]:
    """One worker's streams in the tail, a round at a time, until every one has ended."""
    readers = {s: StreamReader(plan, s, positions[s]) for s in plan.layout.streams_of(worker)}
    while readers:
        found = TailRound()
        for s, reader in list(readers.items()):
            sample = reader.next()
            if sample is None:
                found.ended[s] = reader.position.copy()
                del readers[s]
            else:
                found.samples[s] = TailRead(sample, reader.position.copy())
        yield found


class Tail:
    """The rank's side of the tail: one update at a time, in the global order over the
    streams that still have samples (tail_walk). `read_round` gives the next TailRound of
    this rank's workers (in turn); a rank's memory is the read-ahead plus one update,
    whatever is left. `positions` are its streams' after what was consumed: a checkpoint
    in the tail is those, as before it."""

    def __init__(self, plan: EpochPlan, positions: dict[int, StreamPosition],
                 gather_all_ranks: Callable[[object], list], read_round: Callable[[], object]):
        self.plan, self.gather_all_ranks, self.read_round = plan, gather_all_ranks, read_round
        self.positions = dict(positions)
        self._ahead: dict[int, list[TailRead]] = {s: [] for s in positions}
        self._end: dict[int, StreamPosition] = {}  # stream -> its position at its end
        self.left = 0  # once the tail is over: the good samples it left out (less than an update)

    def next_update(self, want: int) -> list[Sample] | None:
        """The next `want` global samples, every rank's (their pair decoded where this rank
        read them, else None); None (on every rank) when the streams hold fewer."""
        alive, horizon = self.plan.layout.streams, 0
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
        mine = {(s, r): self._ahead[s][r - self.positions[s].good].sample
                for s, r in order if s in self._ahead}
        sent = self._gather({at: replace(sample, pair=None) for at, sample in mine.items()})
        everyone = {at: sample for part in sent for at, sample in part.items()}
        for s in self._ahead:
            self._consume(s, sum(stream == s for stream, _ in order))
        return [mine.get(at, everyone[at]) for at in order]

    def _status(self, horizon: int) -> dict[int, TailStatus]:
        """Every stream's TailStatus, this rank's read `horizon` samples ahead (or to their end)."""
        while any(s not in self._end and len(a) < horizon for s, a in self._ahead.items()):
            self._read_round()
        own = {s: TailStatus(self.positions[s].good, len(ahead), s in self._end)
               for s, ahead in self._ahead.items()}
        return {s: st for part in self._gather(own) for s, st in part.items()}

    def _read_round(self) -> None:
        """One more round of one of this rank's workers' streams into the read-ahead."""
        found = self.read_round()
        if not isinstance(found, TailRound):
            raise RuntimeError(f"loader workers: expected a tail round, got {type(found).__name__}")
        for s, read in found.samples.items():
            self._ahead[s].append(read)
        self._end.update(found.ended)

    def _consume(self, stream: int, n: int) -> None:
        """Hands out `n` of the stream's read-ahead. Taking all of it, its end is read
        first: whether the skips past its last good sample count must not depend on how
        far this rank's workers happened to read (the layout), or skip counts would."""
        while n and stream not in self._end and len(self._ahead[stream]) <= n:
            self._read_round()
        taken, self._ahead[stream] = self._ahead[stream][:n], self._ahead[stream][n:]
        if taken:
            self.positions[stream] = taken[-1].position
        if stream in self._end and not self._ahead[stream]:  # its skips past the last good sample
            self.positions[stream] = self._end[stream]

    def _gather(self, obj) -> list:
        everyone = self.gather_all_ranks(obj)
        if len(everyone) != self.plan.layout.world_size:
            raise RuntimeError(f"gather_all_ranks gave {len(everyone)} parts for "
                               f"{self.plan.layout.world_size} ranks")
        return everyone
