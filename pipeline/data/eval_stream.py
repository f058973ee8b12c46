"""The evaluation stream: the val split, every sample exactly once across all readers.

The reference's test protocol: bicubic resize to crop_size, no crop, no flip, direction
applied. Sample i of the split (in manifest order) belongs to reader i % readers (a
reader is one worker of one rank): disjoint, complete, deterministic, unpadded.
"""
from __future__ import annotations

import logging

import torch

from pipeline.data.augmentation import chw, resize_u8, to_unit_range
from pipeline.data.decode import try_decode
from pipeline.data.format import Entry
from pipeline.data.shards import list_shards, read_entries
from pipeline.data.train_stream import WorkerLoader

log = logging.getLogger(__name__)


class _EvalStream(torch.utils.data.IterableDataset):
    """The val split in manifest order; sample i belongs to reader i % readers (a reader
    is one worker of one rank): disjoint, complete, deterministic, unpadded. Every reader
    reads every shard but decodes only its own samples."""

    def __init__(self, cfg, shards, rank, world_size, in_channels, out_channels, batch_size):
        self.cfg, self.shards, self.rank, self.world_size = cfg, shards, rank, world_size
        self.in_channels, self.out_channels, self.batch_size = in_channels, out_channels, batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        readers, me = self.world_size * workers, self.rank * workers + worker
        samples = []
        entries = (e for e in read_entries(self.shards) if isinstance(e, Entry))
        for index, entry in enumerate(entries):
            if index % readers != me:
                continue
            pair, reason = try_decode(entry.key, entry.parts, self.cfg, self.in_channels,
                                      self.out_channels)
            if reason is not None:
                log.warning("val sample %s skipped: %s", entry.key, reason)
                continue
            samples.append((entry.key, [to_unit_range(resize_u8(chw(p), self.cfg.crop_size))[0]
                                        for p in pair]))
            if len(samples) == self.batch_size:
                yield _stack(samples)
                samples = []
        if samples:
            yield _stack(samples)


def _stack(samples: list) -> dict:
    return {"input": torch.stack([s[1][0] for s in samples]),
            "target": torch.stack([s[1][1] for s in samples]), "key": [s[0] for s in samples]}


def make_eval_loader(cfg, *, rank: int, world_size: int, in_channels: int,
                     out_channels: int, batch_size: int | None = None):
    """The val split for this rank: every sample exactly once across ranks (ranks may
    get different counts; sum metrics across ranks). Reference test protocol: bicubic
    resize to crop_size, no crop, no flip, direction applied. Re-iterable; batches are
    float [-1, 1] {"input", "target", "key"} (no "aug": to_device only moves them)."""
    shards = list_shards(cfg.val, cfg.val_split, key="data.val")
    dataset = _EvalStream(cfg, shards, rank, world_size, in_channels, out_channels,
                          batch_size or cfg.batch_size)
    return WorkerLoader(dataset, cfg.num_workers, seed=0)
