"""A checkpoint that verifies itself: the index of its files' digests.

At commit, rank 0 writes `digests.json` into the complete staging folder: every file's
size and SHA-256 (hashlib's OpenSSL SHA-256 uses the CPU's SHA extensions where there
are any). A resume verifies the checkpoint it is about to load against it, so a missing
member, a cut file or a flipped bit is found before anything is loaded, named with the
file and why, instead of a traceback or weights that blow up steps later. With
`train.resume=auto` a damaged newest checkpoint is renamed aside (`step_N.damaged`, never
deleted) with one line, and the newest intact one is used; when `checkpoints/latest` is
missing or names nothing, the `step_*` folders are searched (pipeline/resume.py). A
checkpoint written before this index existed is checked for its JSON files only, and
still resumes.
"""
from __future__ import annotations

import hashlib
import json
import os

from pipeline import storage
from pipeline.run_layout import TRAINER

INDEX = "digests.json"
DAMAGED = ".damaged"  # the suffix of a checkpoint folder set aside by a resume
CHUNK = 8 << 20


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: str) -> list[str]:
    """Every file below `folder` but the index, relative and sorted."""
    found = []
    for root, _, names in os.walk(folder):
        found += [os.path.relpath(os.path.join(root, name), folder) for name in names]
    return sorted(name for name in found if name != INDEX)


def write_index(folder: str) -> None:
    """digests.json for a complete checkpoint folder (before its commit)."""
    files = {name: {"bytes": os.path.getsize(os.path.join(folder, name)),
                    "sha256": file_digest(os.path.join(folder, name))} for name in _files(folder)}
    storage.write_bytes(os.path.join(folder, INDEX), json.dumps({"files": files}, indent=1).encode())


def damage(folder: str) -> str | None:
    """What is wrong with a checkpoint folder ('FILE: why'), or None if it is intact."""
    if not os.path.isdir(folder):
        return "the folder does not exist"
    index_path = os.path.join(folder, INDEX)
    if not os.path.isfile(index_path):  # written before the index existed
        return _legacy_damage(folder)
    try:
        files = json.loads(storage.read_bytes(index_path))["files"]
    except (ValueError, KeyError, TypeError):
        return f"{INDEX}: not a whole index (cut?)"
    for name, expected in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name}: missing"
        if os.path.getsize(path) != expected["bytes"]:
            return f"{name}: {os.path.getsize(path)} bytes, {expected['bytes']} written (cut?)"
        if file_digest(path) != expected["sha256"]:
            return f"{name}: its content changed since it was written (a flipped bit?)"
    return None


def _legacy_damage(folder: str) -> str | None:
    for name in [TRAINER] + sorted(n for n in os.listdir(folder) if n.endswith(".json")):
        try:
            json.loads(storage.read_bytes(os.path.join(folder, name)))
        except FileNotFoundError:
            return f"{name}: missing"
        except ValueError:
            return f"{name}: not whole JSON (cut?)"
    return None
