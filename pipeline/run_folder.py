"""What a run folder may hold before a run starts: nothing of another run.

A run started without `train.resume` into a folder that already holds a run would train
from scratch beside it: `checkpoints/latest` would then name the new run's first
checkpoint next to the old run's, metrics.jsonl would hold both, config.yaml would be
replaced, and a later resume or translate.py would pick the wrong run. So such a start is
refused before anything is written, in one line that names the ways on; with
`train.overwrite=true` the old run is moved aside (never deleted, never onto another
folder). A worker group that torchrun's elastic agent restarted
(TORCHELASTIC_RESTART_COUNT > 0) is a resume.

A folder whose run has no checkpoint (a start that failed or was stopped before its
first one: there is nothing to resume) does not block the same command again: it is
moved aside like an overwritten run, and the new start says where.

The inference tools' output folder (--out of p2p-translate, p2p-evaluate, p2p-export) is
checked here too: a folder, or a path where one can be made, never a file.
"""
from __future__ import annotations

import logging
import os
import time

from pipeline import distributed, run_layout
from pipeline.errors import UserError
from pipeline.lease import Lease

log = logging.getLogger(__name__)

# what a run leaves in its folder: any one of them means the folder holds a run
RUN_MARKERS = (f"{run_layout.CHECKPOINTS}/latest", run_layout.CONFIG, run_layout.METRICS,
               run_layout.TRAIN_LOG)


def restarted_by_agent() -> bool:
    return distributed.restart_count() > 0


def held_run(run_dir: str) -> list[str]:
    """The markers of an earlier run found in `run_dir`."""
    return [name for name in RUN_MARKERS if os.path.exists(os.path.join(run_dir, name))]


def has_checkpoint(run_dir: str) -> bool:
    """Whether the run in `run_dir` ever committed a checkpoint (its marker, or a step_N
    folder whose marker was lost)."""
    folder = run_layout.checkpoints(run_dir)
    return os.path.exists(os.path.join(folder, "latest")) or (
        os.path.isdir(folder) and any(n.startswith("step_") for n in os.listdir(folder)))


def move_aside(run_dir: str, held: Lease | None, why: str) -> None:
    """Rank 0: the folder to RUN_DIR.old-TIME (never deleted; RUN_DIR.old-TIME-2, -3, ...
    when that name is taken); the lease follows the new one."""
    aside = free_name(f"{run_dir.rstrip('/')}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    os.rename(run_dir, aside)
    if held:
        held.moved(aside)
    log.warning(f"{why}: {run_dir} was moved to {aside}, starting fresh")


def free_name(path: str) -> str:
    """`path`, or `path-2`, `path-3`, ... : the first name nothing (not even a broken
    link) holds, so a move aside never replaces another folder."""
    candidate, n = path, 1
    while os.path.lexists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate


def check_out_folder(out: str, option: str = "--out") -> None:
    """An output folder that can be made: a local `out` that is a file, or lies below
    one, is one line (p2p-translate, p2p-evaluate and p2p-export write into folders)."""
    if "://" in out and not out.startswith("file://"):
        return  # s3://: prefixes, no files in the way
    path = wanted = os.path.abspath(out.removeprefix("file://"))
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        where = "is a file" if path == wanted else f"lies below the file {path}"
        raise UserError(f"{option} {out} {where}: give a folder (it is made if missing)")


def prepare(run_dir: str, resume: str, overwrite: bool, rank: int, held: Lease | None = None) -> str:
    """The resume setting to use: refuses (UserError) a fresh start into a folder holding
    a run, moves it aside first with `overwrite` (rank 0, holding the folder's lease, which
    then holds the new one; the others find it gone), and turns an elastic restart into
    resume=auto."""
    if restarted_by_agent() and not resume:
        log.info(f"restart {distributed.restart_count()} by the elastic agent: "
                 "resuming from the latest checkpoint")
        return "auto"
    found = held_run(run_dir)
    if resume or not found:
        return resume
    if not overwrite and has_checkpoint(run_dir):
        raise UserError(f"train.run_dir {run_dir} already holds a run ({', '.join(found)}): "
                        "continue it with --train.resume=auto, start elsewhere with another "
                        "--train.run_dir, or pass --train.overwrite=true to move it aside")
    if rank == 0:
        move_aside(run_dir, held, "train.overwrite" if overwrite else
                   f"{run_dir} holds a start that ended before its first checkpoint ({', '.join(found)})")
    return resume
