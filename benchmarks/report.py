"""The benchmark output format every script in benchmarks/ shares.

A table for people, then exactly one JSON line last for machines:
{"benchmark": NAME, "machine": {...}, "torch": VERSION, "figures": {...}, "rows": [...]}.
"""
from __future__ import annotations

import json
import os
import platform
import sys

import torch


def machine() -> dict:
    """What the figures were measured on."""
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def table(rows: list[dict]) -> str:
    """Rows of equal keys as an aligned text table."""
    if not rows:
        return "(no rows)"
    columns = list(rows[0])
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def report(name: str, rows: list[dict], figures: dict | None = None, file=sys.stdout) -> dict:
    """Print the table, then the JSON line; return the JSON record."""
    record = {"benchmark": name, "machine": machine(), "torch": torch.__version__,
              "figures": figures or {}, "rows": rows}
    print(f"== {name} ==", file=file)
    print(table(rows), file=file)
    for key, value in (figures or {}).items():
        print(f"{key}: {_fmt(value)}", file=file)
    print(json.dumps(record), file=file, flush=True)
    return record
