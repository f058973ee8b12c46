"""Real training-stream ranks: one forked process per rank in a gloo group on loopback,
each reading one epoch of every case; a hung rank fails the test."""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
import traceback
from pathlib import Path

import torch

from pipeline import data
from pipeline.distributed import free_port
from tests.helpers.images import epoch_batches


def _rank_main(rank, world, port, cases, out_dir):
    """One rank: read one epoch of every case, write what it saw to out_dir/rank.json."""
    import torch.distributed as dist
    code = 0
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world)

        def have_batch_all_ranks(flag: bool) -> bool:
            t = torch.tensor([int(flag)])
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            return bool(t.item())

        def gather_all_ranks(obj) -> list:
            everyone = [None] * world
            dist.all_gather_object(everyone, obj)
            return everyone

        seen = {}
        for name, cfg in cases.items():
            loader = data.make_train_loader(cfg, rank=rank, world_size=world, seed=7,
                                            in_channels=3, out_channels=3,
                                            have_batch_all_ranks=have_batch_all_ranks,
                                            gather_all_ranks=gather_all_ranks)
            batches = epoch_batches(loader)
            seen[name] = {"keys": [b["key"] for b in batches], "skipped": loader.epoch_skipped,
                          "planned": loader.steps_per_epoch}
        (Path(out_dir) / f"{rank}.json").write_text(json.dumps(seen))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - any failure of a rank: printed, then exit 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # gloo can SIGABRT at interpreter exit (pytorch issue 190489)


def run_ranks(world: int, cases: dict, out_dir: Path, timeout: float = 100) -> list[dict]:
    """Real processes, one per rank, a gloo group on loopback; fails on a hang.
    Returns what each rank saw: {case: {"keys", "skipped", "planned"}}."""
    context = multiprocessing.get_context("fork")
    port = free_port()
    procs = [context.Process(target=_rank_main, args=(r, world, port, cases, str(out_dir)))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, f"{len(hung)} ranks hung"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [json.loads((out_dir / f"{r}.json").read_text()) for r in range(world)]
