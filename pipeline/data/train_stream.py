"""The training stream: shards -> this rank's share -> workers -> equal batches per rank.

Stages (each a plain function testable alone): epoch_shards (shuffle with (seed, epoch),
the same order on every rank) -> split_by_node (shards[rank::world]) -> split_by_worker
-> shards.read_entries -> shuffle blocks -> decode.try_decode -> augment -> full batches,
built inside the worker.

Design decisions (the why):

* Shuffle blocks instead of a running shuffle buffer: a block is `shuffle_buffer`
  entries read from a known tar position and permuted by an RNG seeded from that
  position, so a worker's position is (shard, byte offset of the block, entries taken)
  and resuming seeks there, re-reads at most one block and skips the taken entries
  without decoding them. Mixing across shards comes from the shard shuffle.
* All randomness is derived from seeds: shard order from (seed, epoch); block order from
  (seed, epoch, rank, worker, position); augmentation from (seed, epoch, sample key).
* Batches are made inside the worker (DataLoader batch_size=None). The DataLoader hands
  out workers' batches round-robin (skipping finished workers), which is deterministic;
  each batch carries its worker's WorkerPosition, so the loader's state is the last
  position of every worker plus who is next. On resume the worker ids are rotated so the
  round-robin starts at the right worker.
* Bad data (truncated tar, unreadable shard, corrupt image, missing half, too large,
  unsafe member name) is skipped and counted by reason where it is consumed: counts are
  exact across resumes, and nothing raises. A shard holding another sample count than
  its manifest says is counted too (manifest_mismatch) and logged.
* Equal steps: see TrainLoader.
* torchdata's StatefulDataLoader is not needed: the per-worker positions ride along with
  the batches, and its fast-forward would decode what it skips.
* Do not pass these loaders through accelerator.prepare(): it re-splits or drops data.
"""
from __future__ import annotations

import itertools
import json
import logging
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from pipeline.data.augmentation import augment, augment_params, chw, derive_seed, resize_u8, to_unit_range
from pipeline.data.decode import try_decode
from pipeline.data.format import MANIFEST_MISMATCH, Skip
from pipeline.data.shards import Shard, list_shards, read_entries
from pipeline.distributed import STOP_SIGNALS
from pipeline.errors import CheckpointMismatch, DataError

log = logging.getLogger(__name__)

STATE_VERSION = 1


# --------------------------------------------------------------------- shards per worker

def epoch_shards(shards: list, seed: int, epoch: int) -> list:
    """The shard order of one epoch: the same on every rank."""
    order = np.random.default_rng(derive_seed(seed, epoch, "shards")).permutation(len(shards))
    return [shards[i] for i in order]


def split_by_node(shards: list, rank: int, world_size: int) -> list:
    return shards[rank::world_size]


def split_by_worker(shards: list, worker: int, num_workers: int) -> list:
    return shards[worker::num_workers]


def resampled_shards(shards: list, seed: int, epoch: int, rank: int, worker: int) -> Iterator:
    """Endless shard draws with replacement, distinct per rank and worker."""
    rng = np.random.default_rng(derive_seed(seed, epoch, rank, worker, "resampled"))
    while True:
        yield shards[rng.integers(len(shards))]



# ------------------------------------------------------------------------ worker stream

@dataclass
class EpochPlan:
    """Everything a worker needs to produce its batches of one epoch (picklable)."""
    cfg: object  # DataConfig
    shards: list
    seed: int
    epoch: int
    rank: int
    world_size: int
    num_workers: int  # logical workers: max(1, cfg.num_workers)
    in_channels: int
    out_channels: int

    def worker_shards(self, worker: int):
        if self.cfg.mode == "resampled":
            return resampled_shards(self.shards, self.seed, self.epoch, self.rank, worker)
        mine = split_by_node(epoch_shards(self.shards, self.seed, self.epoch),
                             self.rank, self.world_size)
        return split_by_worker(mine, worker, self.num_workers)

    def steps(self) -> int:
        """Full batches per rank this epoch, the same on every rank: the minimum over
        ranks of the full batches their workers can make (exact), or the dataset over
        the global batch, at least 1 (resampled)."""
        batch = self.cfg.batch_size
        if self.cfg.mode == "resampled":
            return max(1, sum(s.samples for s in self.shards) // (batch * self.world_size))
        order = epoch_shards(self.shards, self.seed, self.epoch)
        return min(sum(sum(s.samples for s in split_by_worker(
            split_by_node(order, rank, self.world_size), w, self.num_workers)) // batch
            for w in range(self.num_workers)) for rank in range(self.world_size))


@dataclass
class WorkerPosition:
    """Where one worker is in its epoch (plain JSON in a checkpoint's rank file)."""
    shard: int = 0  # index in the worker's shard list (or shard draw)
    offset: int = 0  # byte offset of the current shuffle block in that shard
    taken: int = 0  # entries of the block consumed
    skipped: dict[str, int] = field(default_factory=dict)  # this epoch, by reason
    mismatched: list[int] = field(default_factory=list)  # shards not holding the listed count

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, state: dict) -> WorkerPosition:
        return cls(state["shard"], state["offset"], state["taken"], dict(state["skipped"]),
                   list(state.get("mismatched", ())))


def worker_batches(plan: EpochPlan, worker: int, position: WorkerPosition,
                   device_augment: bool) -> Iterator[dict]:
    """One worker's batches for one epoch, from `position`. Each batch carries
    "_position", this worker's WorkerPosition after it; the stream ends with a batch-less
    {"_position"} so that skips after the last batch are counted too."""
    cfg = plan.cfg
    mismatched = set(position.mismatched)
    entries = _noting_mismatches(read_entries(plan.worker_shards(worker), position.shard,
                                              position.offset, check_counts=True), mismatched)
    skipped, samples = Counter(position.skipped), []
    shard, offset, taken = position.shard, position.offset, position.taken
    last_good_shard = shard
    here = lambda: WorkerPosition(shard, offset, taken, dict(skipped), sorted(mismatched))
    while block := list(itertools.islice(entries, cfg.shuffle_buffer)):
        if (shard, offset) != (block[0].shard, block[0].offset):
            shard, offset, taken = block[0].shard, block[0].offset, 0
        if shard - last_good_shard > 2 * len(plan.shards):  # only resampled draws get here
            log.error("worker %d: no usable sample in %d shard draws; ending its stream",
                      worker, shard - last_good_shard)
            break
        order = np.random.default_rng(derive_seed(
            plan.seed, plan.epoch, plan.rank, worker, shard, offset, "block")).permutation(len(block))
        while taken < len(block):
            record = block[order[taken]]
            taken += 1
            if isinstance(record, Skip):
                pair, reason = None, record.reason
            else:
                pair, reason = try_decode(record.key, record.parts, cfg, plan.in_channels,
                                          plan.out_channels)
            if reason is not None:
                skipped[reason] += 1
                continue
            samples.append((record.key, pair))
            last_good_shard = shard
            if len(samples) == cfg.batch_size:
                yield {**collate(samples, plan, device_augment), "_position": here()}
                samples = []
    yield {"_position": here()}


def _noting_mismatches(entries: Iterator, mismatched: set) -> Iterator:
    """The entries without MANIFEST_MISMATCH notes, whose shard indices go to `mismatched`.
    A note exists only when its shard is read from the first byte, so it must stay out of
    the shuffle blocks (a resumed block is re-read from inside a shard); a set, as a resume
    can read a shard from its start again."""
    for entry in entries:
        if isinstance(entry, Skip) and entry.reason == MANIFEST_MISMATCH:
            mismatched.add(entry.shard)
        else:
            yield entry



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
    """One epoch of one rank: each DataLoader worker runs worker_batches for its logical
    worker id, (physical id + rotation) % workers, so a resumed loader's round-robin
    starts at the worker that was next."""

    def __init__(self, plan: EpochPlan, positions: list, rotation: int, device_augment: bool):
        self.plan, self.positions, self.rotation = plan, positions, rotation
        self.device_augment = device_augment

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = ((info.id if info else 0) + self.rotation) % self.plan.num_workers
        for batch in worker_batches(self.plan, worker, self.positions[worker],
                                    self.device_augment):
            batch["_worker"] = worker
            yield batch



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




# -------------------------------------------------------------------------- train loader

class TrainLoader:
    """Endless batches across epochs: `batch = next(loader)`.

    Batches are {"input", "target": Tensor, "key": list[str]} (+ "aug" when
    augment_on == "device": pass them through to_device). `epoch` is the epoch of the
    next batch; `steps_per_epoch` is this epoch's planned step count, the same on every
    rank (exact mode: it can differ between epochs by a few steps when shard sizes
    differ, as the shard-to-rank split changes).

    Equal steps on every rank, always: every rank stops an epoch after steps_per_epoch
    batches (computed identically on every rank from the manifest counts), and before
    each batch `have_batch_all_ranks(have_one)` (an all-reduce MIN across ranks supplied
    by the trainer, called once per step) ends the epoch on every rank together as soon
    as one rank runs out early (bad data). With world_size > 1 it is required.

    `state_dict()` is this rank's position (plain JSON): {"version", "epoch",
    "step_in_epoch", "next_worker", "workers": [{"shard", "offset", "taken", "skipped",
    "mismatched"} per worker: index in the worker's shard list (or draw), byte offset of
    the current shuffle block, entries of the block consumed, skip counts this epoch,
    indices of shards whose sample count is not the manifest's],
    "skipped_before" (earlier epochs), and the layout: "seed", "world_size", "rank",
    "num_workers", "mode", "batch_size", "shuffle_buffer"}. Every rank has its own; the
    trainer saves all of them. `load_state_dict` continues the stream exactly where it
    was: the same batches, the same augmentation, consumed data skipped without decoding
    (one shuffle block at most is read again). A state saved with another layout (world
    size, workers, mode, seed, ...) restarts its epoch with the new split, logged as a
    warning. `skipped` counts what bad data dropped, by reason (shards and samples), and
    as "manifest_mismatch" the shards found holding another sample count than the
    manifest says (logged as warnings; steps stay equal, planned from the manifest: a rank
    that runs out ends the epoch on all, and samples beyond the plan may go unseen).
    """

    def __init__(self, cfg, shards: list[Shard], *, rank: int, world_size: int,
                 seed: int, in_channels: int, out_channels: int,
                 have_batch_all_ranks: Callable[[bool], bool] | None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if world_size > 1 and have_batch_all_ranks is None:
            raise ValueError("world_size > 1 needs have_batch_all_ranks (an all-reduce MIN) "
                             "so that ranks end an epoch together when one runs out")
        # the manifest's counts plan every epoch: a shard listed as empty would only leave
        # some rank's share of some epoch without a full batch, so it is not read at all
        shards = [shard for shard in shards if shard.samples > 0]
        self.cfg, self.shards, self.rank, self.world_size = cfg, shards, rank, world_size
        self.seed, self.in_channels, self.out_channels = seed, in_channels, out_channels
        self.num_workers = max(1, cfg.num_workers)
        self.have_batch_all_ranks = have_batch_all_ranks or (lambda have_one: have_one)
        if not shards:
            raise DataError("no training shards (every shard the manifest lists is empty)")
        if cfg.mode == "exact" and len(shards) < world_size * self.num_workers:
            raise DataError(f"{len(shards)} shards < {world_size} ranks x "
                             f"{self.num_workers} workers: some workers would get no data in "
                             "exact mode; write more shards, use fewer workers, or "
                             "data.mode=resampled")
        self.epoch, self._skipped_before = 0, Counter()
        self._reset_epoch()

    def _plan(self) -> EpochPlan:
        return EpochPlan(self.cfg, self.shards, self.seed, self.epoch, self.rank,
                         self.world_size, self.num_workers, self.in_channels, self.out_channels)

    def _reset_epoch(self) -> None:
        self._iterator, self.step_in_epoch, self._next_worker = None, 0, 0
        self._positions = [WorkerPosition() for _ in range(self.num_workers)]
        self.steps_per_epoch = self._plan().steps()
        if self.steps_per_epoch == 0:
            raise DataError(f"epoch {self.epoch} has no full batch of {self.cfg.batch_size} "
                            f"on some rank of {self.world_size}: too few samples")
        log.info("data: epoch %d plans %d steps on each of %d rank(s)", self.epoch,
                 self.steps_per_epoch, self.world_size)

    def _end_epoch(self) -> None:
        self._skipped_before = Counter(self.skipped)
        self.epoch += 1
        self._reset_epoch()

    def _start_iterator(self):
        dataset = _EpochStream(self._plan(), self._positions, self._next_worker,
                               self.cfg.augment_on == "device")
        return iter(WorkerLoader(dataset, self.cfg.num_workers, derive_seed(self.seed, self.epoch)))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            if self.step_in_epoch >= self.steps_per_epoch:
                self._end_epoch()
            if self._iterator is None:
                self._iterator = self._start_iterator()
            batch = self._fetch()
            if self.have_batch_all_ranks(batch is not None):
                break
            if self.step_in_epoch == 0:
                raise DataError(f"epoch {self.epoch}: some rank has no usable batch "
                                   f"(skipped so far: {dict(self.skipped)})")
            log.info("epoch %d ended after %d of %d steps: a rank ran out of good samples",
                     self.epoch, self.step_in_epoch, self.steps_per_epoch)
            self._end_epoch()
        self.step_in_epoch += 1
        return batch

    def _fetch(self) -> dict | None:
        """The next batch of this epoch (None at its end), recording worker positions."""
        for item in self._iterator:
            worker = item.pop("_worker")
            self._positions[worker] = item.pop("_position")
            self._next_worker = (worker + 1) % self.num_workers
            if item:  # else a worker's end-of-stream position, not a batch
                return item
        return None

    @property
    def skipped(self) -> dict[str, int]:
        total = Counter(self._skipped_before)
        for position in self._positions:
            total.update(position.skipped)
            total.update({MANIFEST_MISMATCH: len(position.mismatched)})
        return {reason: n for reason, n in total.items() if n}

    def _layout(self) -> dict:
        return {"seed": self.seed, "world_size": self.world_size, "rank": self.rank,
                "num_workers": self.num_workers, "mode": self.cfg.mode,
                "batch_size": self.cfg.batch_size, "shuffle_buffer": self.cfg.shuffle_buffer}

    def state_dict(self) -> dict:
        """This rank's position as plain JSON types (see load_state_dict), a copy."""
        return json.loads(json.dumps({
                "version": STATE_VERSION, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "next_worker": self._next_worker, "workers": [p.to_json() for p in self._positions],
                "skipped_before": dict(self._skipped_before), **self._layout()}))

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`. Same layout (seed, world size, rank, workers, mode,
        batch size, shuffle buffer): exactly where it was. Another layout: the saved
        epoch starts again from its beginning with this loader's split (samples of that
        epoch already seen are seen again), and a warning says so."""
        if state.get("version") != STATE_VERSION:
            raise CheckpointMismatch(f"data state version {state.get('version')} != {STATE_VERSION}: "
                                     "a checkpoint of another version of this code")
        self._iterator = None
        self.epoch = state["epoch"]
        self._reset_epoch()
        self._skipped_before = Counter(state["skipped_before"])
        layout = {k: state[k] for k in self._layout()}
        if layout != self._layout():
            changed = {k: f"{v} -> {self._layout()[k]}" for k, v in layout.items()
                       if v != self._layout()[k]}
            log.warning("data position saved with another layout (%s): restarting epoch %d "
                        "from its beginning with the new split", changed, self.epoch)
            return
        self.step_in_epoch, self._next_worker = state["step_in_epoch"], state["next_worker"]
        self._positions = [WorkerPosition.from_json(w) for w in state["workers"]]


def make_train_loader(cfg, *, rank: int, world_size: int, seed: int,
                      in_channels: int, out_channels: int,
                      have_batch_all_ranks: Callable[[bool], bool] | None = None) -> TrainLoader:
    """The training stream of this rank (see TrainLoader). rank/world_size are explicit,
    never read from the environment; do not pass the loader to accelerator.prepare()."""
    shards = list_shards(cfg.train, cfg.train_split)
    return TrainLoader(cfg, shards, rank=rank, world_size=world_size, seed=seed,
                       in_channels=in_channels, out_channels=out_channels,
                       have_batch_all_ranks=have_batch_all_ranks)


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


