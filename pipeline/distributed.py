"""What every rank must agree on: flags, the run folder, replica equality, a clean exit.

Thin helpers over torch.distributed for the trainer. Each works unchanged in a
single process (no process group): the local value is then the answer.
"""
from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import sys
import uuid
from collections import Counter
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeline import precision
from pipeline.errors import UserError

# "stop soon": the trainer checkpoints and exits on these; loader workers ignore them
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now: for a launcher's rendezvous (and the tests')."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class StartupError(UserError, RuntimeError):
    """The launch itself is wrong (world size, run folder); the message says how to fix it."""


def launched_with_deepspeed() -> bool:
    """Whether this run's engines are DeepSpeed's: what `accelerate launch` tells its
    processes when its config says `distributed_type: DEEPSPEED` (known before the
    Accelerator exists; the one place the question is asked)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _reduce_flags(flags: list[bool], op: str, device: torch.device) -> list[bool]:
    if not is_distributed():
        return list(flags)
    values = torch.tensor([int(flag) for flag in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def all_ranks(flag: bool, device: torch.device) -> bool:
    """True on every rank iff `flag` is true on every rank."""
    return _reduce_flags([flag], "min", device)[0]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank iff `flag` is true on some rank."""
    return _reduce_flags([flag], "max", device)[0]


def any_rank_each(flags: list[bool], device: torch.device) -> list[bool]:
    """any_rank of each flag, in one collective."""
    return _reduce_flags(flags, "max", device)


def sum_across_ranks(values: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        values = values.clone()
        dist.all_reduce(values)
    return values


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, obj)
    return everyone


def sum_counts(counts: dict[str, int]) -> dict[str, int]:
    """{name: total over ranks} of per-rank counters that may name different things."""
    everyone = [counts]
    if is_distributed():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, counts)
    return dict(sorted(sum((Counter(c) for c in everyone), Counter()).items()))


def from_rank0(compute):
    """compute() on rank 0 only; its result, or its error, on every rank (a refusal on
    rank 0 must not leave the others waiting)."""
    if not is_distributed():
        return compute()
    box = [None, None]
    if dist.get_rank() == 0:
        try:
            box[0] = compute()
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            box[1] = err
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class StopRequest:
    """Remembers SIGTERM, SIGINT and SIGUSR1 ("stop soon") instead of dying of them.

    The trainer reduces `requested` over ranks at each step boundary: all ranks stop
    together, after the same step, so they can checkpoint collectively.
    """

    def __init__(self):
        self.signal_name: str | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._remember)

    def _remember(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


def check_shared_run_dir(run_dir: str, rank: int, device: torch.device) -> None:
    """Every rank must see the run folder rank 0 writes to (a shared filesystem on
    several nodes): rank 0 writes a token, every rank reads it back."""
    token_name = f".shared-check-{os.environ.get('MASTER_PORT', '0')}"
    path = os.path.join(run_dir, token_name)
    token = [uuid.uuid4().hex if rank == 0 else None]
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(path, "w") as f:
            f.write(token[0])
    if is_distributed():
        dist.broadcast_object_list(token, src=0)
    try:
        with open(path) as f:
            seen = f.read() == token[0]
    except OSError:
        seen = False
    everyone_sees_it = all_ranks(seen, device)
    barrier()
    if rank == 0:
        os.remove(path)
    if not everyone_sees_it:
        raise StartupError(f"train.run_dir {run_dir} is not shared: some ranks cannot read "
                           "what rank 0 wrote there; use a filesystem every node mounts")


def parameter_digest(*modules: torch.nn.Module) -> str:
    """A hash of every parameter, bit for bit. Buffers are left out: BatchNorm running
    statistics are per rank by design (each rank normalises with its own batch)."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.named_parameters():
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def replica_digests(*modules: torch.nn.Module) -> list[str]:
    """Every rank's parameter digest (the same list on all ranks)."""
    return gather_objects(parameter_digest(*modules))


# what gloo and NCCL say when a peer is gone, whichever collective noticed (not every
# one raises a DistError: DDP's buffer broadcast reports "Application timeout caused pair
# closure" as a plain RuntimeError)
PEER_LOST = re.compile(r"gloo|nccl|timed? ?out|connection|closed|reset by peer|pair closure", re.I)


def lost_peer(err: BaseException) -> str | None:
    """One line for a collective that failed because another rank died, froze past
    train.collective_timeout or became unreachable; None for any other error."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if not is_distributed() or not (isinstance(err, dist.DistError) or
                                    isinstance(err, RuntimeError) and PEER_LOST.search(text)):
        return None
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    then = (f"the elastic agent restarts the group from the newest checkpoint (restart "
            f"{restart_count() + 1} of {restarts})" if restart_count() < restarts else
            "the job stops here: restart it with --train.resume=auto once every node is up")
    return (f"rank {dist.get_rank()} lost contact with another rank (dead, frozen past "
            f"train.collective_timeout, or unreachable): {text}; {then}")


def init_restarted_group(timeout: timedelta, backend: str | None = None) -> None:
    """In a worker group torchrun's elastic agent restarted, join the process group
    through a store prefix of this start's own (accelerate then finds it made).

    The agent keeps one store across restarts (static rendezvous always, c10d unless
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: pytorch#135712); the group's keys of the last
    start are still in it, so without a prefix a new rank can read a dead rank's address
    and wait on it (seen here: a hang in gloo's connectFullMesh in about one restart in
    three). The restart count names the start: one agent (static, a single node) keeps it
    consistent; c10d agents do not (a re-rendezvous restarts workers without counting),
    hence c10d runs with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, a fresh store each round."""
    if (restart_count() == 0 or dist.is_initialized() or "MASTER_ADDR" not in os.environ
            or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"):
        return
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    dist.init_process_group(backend or default_backend(),
                            store=dist.PrefixStore(f"p2p/start_{restart_count()}", store),
                            rank=rank, world_size=world_size, timeout=timeout)


def default_backend() -> str:
    """The backend accelerate gives a first start on this machine (nccl on CUDA, gloo on
    the CPU), so a restarted group runs every collective where the first start did: a
    mixed "cuda:nccl,cpu:gloo" group would move barriers and object collectives to gloo,
    which on a multi-NIC node may pick an interface the first start never used."""
    return "nccl" if precision.launch_device_type() == "cuda" else "gloo"


# NCCL's watchdog, by default, aborts a process whose collective timed out before Python
# sees an exception: lost_peer() and finish()'s exit-code file would never run. Mode 2
# (CleanUpOnly) aborts the communicators and raises in the caller instead, as gloo does.
NCCL_ERROR_HANDLING = ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")


def raise_nccl_errors() -> None:
    """Before any process group exists; a value the user set is kept."""
    os.environ.setdefault(*NCCL_ERROR_HANDLING)


def restart_count() -> int:
    """How often torchrun's elastic agent restarted this worker group (0: the first start)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def finish(code: int) -> None:
    """End the process cleanly: gloo can abort at interpreter exit (pytorch#190489), so
    tear the group down ourselves and leave with os._exit once output is flushed. Only a
    successful rank waits for its peers: a failing one must not hang on a barrier."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # which rank ended how, for launcher logs
        sys.stderr.write(f"[rank {os.environ.get('RANK', '?')}] exiting with code {code}\n")  # one write
    if os.environ.get("P2P_EXIT_FILE"):  # p2p-train exits with the ranks' own codes
        with open(os.environ["P2P_EXIT_FILE"], "a") as f:
            f.write(f"{os.environ.get('RANK', '0')} {code} {restart_count()}\n")
    if is_distributed():  # accelerator.end_training() may have torn it down already
        if code == 0:
            barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
