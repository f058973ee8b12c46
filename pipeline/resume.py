"""Which checkpoint a resume loads: verified before anything is loaded.

`train.resume=auto` takes the newest intact checkpoint of the run: the one the `latest`
marker names, else (the marker missing, naming nothing, or naming a damaged folder) the
newest intact `step_*` folder, said in one line. A damaged one (digests.damage: a missing
or cut file, a flipped bit) is set aside as `step_N.damaged`, never deleted, with one line
naming the file and why. A path given explicitly must be intact. The marker is read by
checkpoint.latest, the one place the latest checkpoint is found. Rank 0 decides (every
rank would read every checkpoint file otherwise); distributed.from_rank0 shares it.
"""
from __future__ import annotations

import logging
import os

from pipeline import checkpoint, digests
from pipeline.errors import CheckpointMismatch

log = logging.getLogger(__name__)


def choose(run_dir: str, resume: str) -> str | None:
    """The checkpoint a resume loads, verified (digests.damage); run on rank 0 only. 'auto':
    the newest intact one of the `latest` marker's and the `step_*` folders, each damaged
    newer one set aside as `step_N.damaged` with one line; a given path must be intact."""
    if not resume:
        return None
    if resume != "auto":
        why = digests.damage(resume)
        if why:
            raise CheckpointMismatch(f"train.resume: {resume} is not an intact checkpoint ({why}); "
                                     "give another step_N folder or 'auto'")
        return resume
    root = checkpoint.checkpoints_dir(run_dir)
    named = checkpoint.latest(run_dir)  # the marker's first, then the step_* folders, newest first
    newer = (checkpoint.folder(root, name) for name in reversed(checkpoint.committed(root)))
    paths = ([named] if named else []) + [path for path in newer if path != named]
    for path in paths:
        why = digests.damage(path)
        if why is None:
            if path != named:
                marker = (f"names {os.path.basename(named).removesuffix(checkpoint.OLD)}, which is "
                          "not intact" if named else "is missing")
                log.warning(f"{os.path.join(root, checkpoint.LATEST)} {marker}: resuming from {path}, "
                            "the newest intact checkpoint")
            return path
        _set_aside(path, why)
    if paths:
        raise CheckpointMismatch(f"train.resume=auto: no intact checkpoint in {root} (the damaged "
                                 f"ones are set aside as *{digests.DAMAGED}); resume a copy you trust "
                                 "with --train.resume=PATH")
    return None


def _set_aside(path: str, why: str) -> None:
    if not os.path.isdir(path):
        log.warning(f"{path}: {why}")
        return
    aside = path + digests.DAMAGED
    while os.path.exists(aside):
        aside += "_"
    os.replace(path, aside)
    log.warning(f"{path}: {why}: set aside as {aside}, trying the next newest checkpoint")
