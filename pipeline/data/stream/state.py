"""The training loader's state in a checkpoint: one rank's part, as plain JSON.

The JSON shape is the checkpoint format (each rank file's "data"), read back by any
later run: keys are only ever added, with a default for the checkpoints saved before
them ("tail", "data"); a change of meaning bumps STATE_VERSION.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from pipeline.data.stream.plan import StreamLayout
from pipeline.data.stream.reader import StreamPosition
from pipeline.errors import CheckpointMismatch

STATE_VERSION = 2  # 1: per-rank shard splits, before the streams (an epoch restarts)


@dataclass(frozen=True)
class Validity:
    """What saved positions are only valid under: with another seed, mode, shuffle buffer
    or other data (`data`: a digest of the shards' URLs and sample counts) they would be
    byte offsets into other tars or other shuffle blocks. None: saved before recording it."""
    seed: int | None
    mode: str | None
    shuffle_buffer: int | None
    data: str | None

    @classmethod
    def of(cls, layout: StreamLayout) -> Validity:
        shards = json.dumps([[shard.url, shard.samples] for shard in layout.shards]).encode()
        return cls(layout.seed, layout.cfg.mode, layout.cfg.shuffle_buffer,
                   hashlib.sha256(shards).hexdigest()[:16])

    def changes(self, now: Validity) -> dict[str, str]:
        """{name: "saved -> now"} of what differs (a value the checkpoint lacks never does)."""
        current = asdict(now)
        return {name: f"{saved} -> {current[name]}" for name, saved in asdict(self).items()
                if saved is not None and saved != current[name]}


@dataclass
class LoaderState:
    """One rank's stream position between updates: the epoch, the global samples of it
    consumed (every rank's), whether in its tail, this rank's streams' positions, the
    skips of earlier epochs, and the layout it was saved on."""
    epoch: int
    consumed: int
    tail: bool
    streams: int
    positions: dict[int, StreamPosition]
    skipped_before: dict[str, int]
    validity: Validity
    rank: int
    world_size: int
    num_workers: int  # logical workers
    batch_size: int
    version: int = field(default=STATE_VERSION)

    def to_json(self) -> dict:
        v = self.validity
        return {"version": self.version, "epoch": self.epoch, "consumed": self.consumed,
                "tail": self.tail, "streams": self.streams,
                "positions": {str(s): p.to_json() for s, p in self.positions.items()},
                "skipped_before": dict(self.skipped_before), "seed": v.seed, "mode": v.mode,
                "shuffle_buffer": v.shuffle_buffer, "data": v.data, "rank": self.rank,
                "world_size": self.world_size, "num_workers": self.num_workers,
                "batch_size": self.batch_size}

    @classmethod
    def from_json(cls, state: dict) -> LoaderState:
        if state.get("version") != STATE_VERSION:
            raise CheckpointMismatch(f"data state version {state.get('version')} != {STATE_VERSION}: "
                                     "a checkpoint of another version of this code")
        return cls(epoch=state["epoch"], consumed=state["consumed"], tail=state.get("tail", False),
                   streams=state["streams"],
                   positions={int(s): StreamPosition.from_json(p) for s, p in state["positions"].items()},
                   skipped_before=dict(state["skipped_before"]),
                   validity=Validity(*(state.get(k) for k in ("seed", "mode", "shuffle_buffer", "data"))),
                   rank=state["rank"], world_size=state["world_size"], num_workers=state["num_workers"],
                   batch_size=state["batch_size"])


def before_streams(states: list[dict]) -> bool:
    """Whether every rank's state was saved before the streams (version 1): only its
    epoch carries over."""
    return all(state.get("version") == 1 for state in states)
