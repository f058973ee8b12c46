"""An observer of DDP's gradient all-reduces, for launched trainers: put this folder on
PYTHONPATH and set P2P_ALLREDUCE_DIR, and every DistributedDataParallel built in the
process gets a comm hook that counts, then does exactly what DDP's default does (the
bucket's mean over the ranks, by an all-reduce). The real DDP runs; nothing is mocked.

Per rank, P2P_ALLREDUCE_DIR/rank_<RANK>.json holds one entry per DDP wrapper in the
order they were built (the trainer prepares G, then D): {"buckets": all-reduces of
gradient buckets, "rounds": backward passes that all-reduced (each round's last bucket)}.
Rewritten at each round's end: the trainer leaves through os._exit (no atexit)."""
import json
import os

if os.environ.get("P2P_ALLREDUCE_DIR"):
    import torch
    import torch.distributed as dist

    _counts: list[dict] = []

    def _write() -> None:
        path = os.path.join(os.environ["P2P_ALLREDUCE_DIR"], f"rank_{os.environ.get('RANK', '0')}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(_counts, f)
        os.replace(path + ".tmp", path)

    def _counting_allreduce(state: dict, bucket):
        state["buckets"] += 1
        if bucket.is_last():
            state["rounds"] += 1
            _write()
        tensor = bucket.buffer().div_(dist.get_world_size())  # as ddp_comm_hooks' allreduce_hook
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])

    _ddp_init = torch.nn.parallel.DistributedDataParallel.__init__

    def _init_and_count(self, *args, **kwargs):
        _ddp_init(self, *args, **kwargs)
        state = {"buckets": 0, "rounds": 0}
        _counts.append(state)
        self.register_comm_hook(state, _counting_allreduce)

    torch.nn.parallel.DistributedDataParallel.__init__ = _init_and_count
