"""The trainer's input pipeline: tar shards (local or s3://) -> equal batches per rank.

The package follows the data's stages, one module each:
    format        the shard format: member names, the manifest, Entry/Skip records (the
                  one owner; shard.py, inspect_shards.py, translate.py import it)
    shards        which shards to read (manifest, brace pattern) and reading them
    decode        bytes -> uint8 images: one policy (the max-pixels default is format's)
    augmentation  resize, the same crop and flip for both halves, seeded per sample
    stream/       the training stream: world-size-independent streams, resumable
                  anywhere, one optimiser update at a time (its own package: plan,
                  reader, batch, tail, worker, state, loader)
    eval_stream   the val split, every sample once across ranks
The names below are the package's interface; the trainer imports `pipeline.data`. They
load on first use (PEP 562), so a tool that needs only the format (shard.py, whose packing
processes would otherwise each import torch, ~1.7 s) imports no torch.
"""
import importlib

_EXPORTS = {
    "augmentation": ("CROPPING", "PREPROCESS", "Geometry", "augment", "chw", "derive_seed", "resize_u8",
                     "resize_u8_via_float", "to_unit_range"),
    "decode": ("BadSample", "decode_image", "decode_sample", "scale_16bit",
               "try_decode"),
    "eval_stream": ("make_eval_loader",),
    "format": ("IMAGE_EXTS", "MAX_IMAGE_PIXELS", "MANIFEST_MISMATCH", "Entry", "Manifest", "Skip"),
    "shards": ("Shard", "count_samples", "expand_braces", "list_shards", "manifest_of", "packed_load_size",
               "read_entries", "read_range"),
    "stream.batch": ("to_device",),
    "stream.loader": ("TrainLoader", "Update", "make_train_loader"),
    "stream.plan": ("EpochPlan", "Segment", "StreamLayout", "auto_streams", "epoch_shards",
                    "stream_segments"),
    "stream.reader": ("Sample", "StreamPosition", "StreamReader"),
    "stream.state": ("STATE_VERSION", "LoaderState"),
    "stream.tail": ("TailStatus", "tail_walk"),
    "stream.worker": ("WorkerLoader",),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pipeline.data.{_HOME[name]}"), name)
    globals()[name] = value
    return value
