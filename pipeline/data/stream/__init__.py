"""The training stream: shards -> V streams -> readers -> one optimiser update at a time.

One module a layer (the design, and why: docs/data-stream.md):
    plan     the arithmetic: each epoch's shard order, its V streams, the run's layout
    reader   one stream's good samples in order, from a resumable position
    batch    samples -> a worker's collated part -> a rank's batch -> the device
    tail     the rest of an epoch once a stream ran dry, gathered across ranks
    worker   the worker protocol: jobs in, parts and tail rounds out, for the whole run
    state    the loader's checkpointed state, as JSON
    loader   TrainLoader: equal updates on every rank, resumable on any world size
The package's interface is pipeline.data's (its _EXPORTS table).
"""
