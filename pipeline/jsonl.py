"""The run folder's append-only JSON-lines logs (metrics.jsonl, train_log.jsonl,
keys/rank{R}.jsonl), written and read so that a cut last line costs that line only.

A kill or a full disk during an append leaves a fragment without its newline. Readers
skip a line that is not a JSON object, with one warning naming the file and the line;
the next append starts on a new line, so it is never glued onto the fragment. Written by
hand: a line's worth of logic each way, and the standard json module does the rest.
"""
from __future__ import annotations

import json
import logging
import os

log = logging.getLogger(__name__)


def append(path: str, records: list[dict]) -> None:
    """`records` as lines at the end of `path`, after a newline if a cut line ends it."""
    with open(path, "a+b") as f:
        cut = f.tell() > 0 and _last_byte(f) != b"\n"
        payload = "".join(json.dumps(record) + "\n" for record in records)
        f.write((("\n" if cut else "") + payload).encode())


def _last_byte(f) -> bytes:
    f.seek(-1, os.SEEK_END)
    return f.read(1)


def read(path: str) -> list[dict]:
    """Every whole record of `path` ([] if it does not exist); a damaged line is skipped
    with a warning."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                log.warning("%s: line %d is not a whole JSON record (cut by a kill or a full "
                            "disk?): skipped", path, number)
    return records
