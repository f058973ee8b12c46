"""The evaluation stream: the val split (or a fixed subset of it), every sample exactly
once across all readers.

The reference's test protocol: bicubic resize to crop_size, no crop, no flip, direction
applied; for the other data.preprocess modes, each image at its geometry's eval_size (the
scale without the crop, rounded: augmentation.py), a batch holding one size (a size
change starts a new one). The i-th sample evaluated (in manifest order) belongs to reader i % readers (a
reader is one worker of one rank): disjoint, complete, deterministic, unpadded.

A cap (`max_images`, eval.max_images) picks its samples by their place in the manifest
with a generator seeded by the run's seed alone, so the subset is the same on any
number of processes and in p2p-evaluate given the same cap and seed; a reader opens only
the shards that hold its own picks.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Iterator

import torch

from pipeline.config import DataConfig
from pipeline.data.augmentation import Geometry, chw, derive_seed, resize_u8, to_unit_range
from pipeline.data.decode import try_decode
from pipeline.data.format import Entry
from pipeline.data.shards import Shard, list_shards, read_entries
from pipeline.data.stream.worker import WorkerLoader

log = logging.getLogger(__name__)


class _EvalStream(torch.utils.data.IterableDataset):
    """The val split in manifest order; sample i belongs to reader i % readers (a reader
    is one worker of one rank): disjoint, complete, deterministic, unpadded. Every reader
    reads every shard but decodes only its own samples."""

    def __init__(self, cfg: DataConfig, shards: list[Shard], rank: int, world_size: int, in_channels: int,
                 out_channels: int, batch_size: int,
                 subset: list[int] | None = None, multiple: int = 1):
        self.geometry = Geometry.of(cfg, multiple)
        self.cfg, self.shards, self.rank, self.world_size = cfg, shards, rank, world_size
        self.in_channels, self.out_channels, self.batch_size = in_channels, out_channels, batch_size
        self.subset = subset  # manifest places to evaluate, sorted; None: all

    def _entries(self, readers: int, me: int) -> Iterator[Entry]:
        """This reader's samples: the i-th of those evaluated where i % readers == me."""
        if self.subset is None:
            entries = (e for e in read_entries(self.shards) if isinstance(e, Entry))
            yield from (e for i, e in enumerate(entries) if i % readers == me)
            return
        mine = {place for i, place in enumerate(self.subset) if i % readers == me}
        base = 0
        for shard in self.shards:
            places = range(base, base + shard.samples)
            if any(place in mine for place in places):
                entries = (e for e in read_entries([shard]) if isinstance(e, Entry))
                yield from (e for place, e in zip(places, entries) if place in mine)
            base += shard.samples

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        readers, me = self.world_size * workers, self.rank * workers + worker
        samples = []
        for entry in self._entries(readers, me):
            pair, reason = try_decode(entry.key, entry.parts, self.cfg, self.in_channels,
                                      self.out_channels)
            if reason is not None:
                log.warning("val sample %s skipped: %s", entry.key, reason)
                continue
            size = self.geometry.eval_size(pair[0].shape[:2])
            if samples and size != tuple(samples[-1][1][0].shape[-2:]):
                yield _stack(samples)  # a batch holds one size: another size starts the next
                samples = []
            samples.append((entry.key, [to_unit_range(resize_u8(chw(p), size))[0] for p in pair]))
            if len(samples) == self.batch_size:
                yield _stack(samples)
                samples = []
        if samples:
            yield _stack(samples)


def _stack(samples: list) -> dict:
    return {"input": torch.stack([s[1][0] for s in samples]),
            "target": torch.stack([s[1][1] for s in samples]), "key": [s[0] for s in samples]}


def eval_subset(samples: int, max_images: int, seed: int) -> list[int] | None:
    """The manifest places a cap of `max_images` evaluates (sorted), from the run's seed
    alone; None when the split holds no more than that (or max_images is 0: no cap)."""
    if max_images <= 0 or samples <= max_images:
        return None
    return sorted(random.Random(derive_seed(seed, "val-subset", "eval")).sample(range(samples), max_images))


def rank_share(images: int, rank: int, world_size: int, workers: int) -> int:
    """How many of `images` evaluated samples rank `rank` reads (its workers' together)."""
    readers = world_size * max(workers, 1)
    return sum(1 for i in range(images) if i % readers // max(workers, 1) == rank)


def make_eval_loader(cfg: DataConfig, *, rank: int, world_size: int, in_channels: int,
                     out_channels: int, batch_size: int | None = None,
                     max_images: int = 0, seed: int = 0, persistent: bool = False,
                     multiple: int = 1) -> WorkerLoader:
    """The val split (at most `max_images` of it, chosen by `seed`: eval_subset) for this
    rank: every sample exactly once across ranks (ranks may get different counts; sum
    metrics across ranks). Reference test protocol: bicubic resize to crop_size (the
    geometry's eval_size, `multiple` the generator's), no crop, no flip, direction
    applied. Re-iterable; batches are float [-1, 1] {"input", "target", "key"} (no "aug":
    to_device only moves them); `.images` is how many the split gives
    (by its manifest) and `.rank_images` this rank's share. `persistent`: its workers
    stay for the next iteration (the trainer's evaluations reuse one loader: no fork each)."""
    shards = list_shards(cfg.val, cfg.val_split, key="data.val")
    total = sum(s.samples for s in shards)
    subset = eval_subset(total, max_images, seed)
    dataset = _EvalStream(cfg, shards, rank, world_size, in_channels, out_channels,
                          batch_size or cfg.batch_size, subset, multiple)
    loader = WorkerLoader(dataset, cfg.num_workers, seed=0, persistent=persistent)
    loader.images = total if subset is None else len(subset)
    loader.rank_images = rank_share(loader.images, rank, world_size, cfg.num_workers)
    return loader
