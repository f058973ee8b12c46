"""What the packed samples are: each half's stored size and the source layout, counted
per shard (its part file) and summed per split (manifest.json's SplitInfo.sizes and
.layouts).

The trainer's start-up check reads them to refuse, in one line and before any step,
sizes that cannot be batched or are smaller than the crop: counting them there would mean
reading every shard. A part file holds
    "sizes":   {"WxH": [samples, first key]}   width x height of each half, as stored
    "layouts": {"pair": n, "separate": m}       how the pairs were laid out at the SOURCE
and `merge` sums a split's parts in plan order, so a size's example is its first sample
in plan order. A part written by an older shard.py (picked up by a resume) has neither:
its split's sizes are then unknown (None), never a partial count that would pass a check
the unseen shards might fail.
"""
from __future__ import annotations

from pipeline.data.format import SizeCount, size_name

LAYOUTS = ("pair", "separate")


def stored_size(meta: dict) -> tuple[int, int]:
    """(height, width) of each half of a packed sample, from its KEY.json: an A|B image
    kept whole is split at split_x; separate members (copied or re-encoded) are the
    input's size, which the target's equals once packed."""
    return meta["height"], meta.get("split_x", meta["width"])


def source_layout(meta: dict) -> str:
    """"pair" (one A|B image at the source) or "separate" (input and target files): a
    re-encoded A|B pair is stored as separate members but came as a pair."""
    return meta.get("source_layout", meta["layout"])


class ShardTally:
    """Sizes and layouts of one shard's samples, added in the order they are written."""

    def __init__(self):
        self.sizes: dict[str, list] = {}
        self.layouts = dict.fromkeys(LAYOUTS, 0)

    def add(self, key: str, meta: dict) -> None:
        name = size_name(*stored_size(meta))
        if name in self.sizes:
            self.sizes[name][0] += 1
        else:
            self.sizes[name] = [1, key]
        self.layouts[source_layout(meta)] += 1

    def fields(self) -> dict:
        """The part file's "sizes" and "layouts"."""
        return {"sizes": self.sizes, "layouts": self.layouts}


def split_tally(parts: list[dict]) -> tuple[dict[str, SizeCount] | None, dict[str, int] | None]:
    """(sizes, layouts) of a split from its parts in plan order; (None, None) if any part
    lacks them (packed by an older shard.py): unknown, never partial."""
    if any("sizes" not in part or "layouts" not in part for part in parts):
        return None, None
    sizes, layouts = {}, dict.fromkeys(LAYOUTS, 0)
    for part in parts:
        for name, (count, example) in part["sizes"].items():
            if name in sizes:
                sizes[name].samples += count
            else:
                sizes[name] = SizeCount(count, example)
        for layout, count in part["layouts"].items():
            layouts[layout] = layouts.get(layout, 0) + count
    return sizes, layouts
