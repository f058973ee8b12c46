"""The trainer's input pipeline: tar shards (local or s3://) -> equal batches per rank.

The package follows the data's stages, one module each:
    format        the shard format: member names, the manifest, Entry/Skip records (the
                  one owner; shard.py, inspect_shards.py, translate.py import it)
    shards        which shards to read (manifest, brace pattern) and reading them
    decode        bytes -> uint8 images: one policy, one max-pixels default
    augment       resize, the same crop and flip for both halves, seeded per sample
    train_stream  the resumable, rank- and worker-split training stream
    eval_stream   the val split, every sample once across ranks
The names below are the package's interface; the trainer imports `pipeline.data`.
"""
from pipeline.data.augment import (
    augment,
    augment_params,
    chw,
    derive_seed,
    resize_u8,
    resize_u8_via_float,
    to_unit_range,
)
from pipeline.data.decode import (
    MAX_IMAGE_PIXELS,
    BadSample,
    decode_image,
    decode_sample,
    scale_16bit,
    try_decode,
)
from pipeline.data.eval_stream import make_eval_loader
from pipeline.data.format import IMAGE_EXTS, MANIFEST_MISMATCH, Entry, Manifest, Skip
from pipeline.data.shards import (
    Shard,
    count_samples,
    expand_braces,
    list_shards,
    packed_load_size,
    read_entries,
)
from pipeline.data.train_stream import (
    STATE_VERSION,
    EpochPlan,
    TrainLoader,
    WorkerLoader,
    WorkerPosition,
    epoch_shards,
    make_train_loader,
    split_by_node,
    split_by_worker,
    to_device,
    worker_batches,
)

__all__ = [
    "augment", "augment_params", "chw", "derive_seed", "resize_u8", "resize_u8_via_float", "to_unit_range",
    "MAX_IMAGE_PIXELS", "BadSample", "decode_image", "decode_sample", "scale_16bit", "try_decode",
    "make_eval_loader", "IMAGE_EXTS", "MANIFEST_MISMATCH", "Entry", "Manifest", "Skip",
    "Shard", "count_samples", "expand_braces", "list_shards", "packed_load_size",
    "read_entries",
    "STATE_VERSION", "EpochPlan", "TrainLoader", "WorkerLoader", "WorkerPosition", "epoch_shards",
    "make_train_loader", "split_by_node", "split_by_worker", "to_device", "worker_batches",
]
