"""Reads shards back and checks them against manifest.json (local folder or s3://).

    python data_tools/inspect_shards.py DEST [--decode N]

Streams every shard listed in the manifest: sample counts and bytes must match it, as
must the splits' totals; no .tar may be left unlisted, no name point outside DEST; every
sample must be complete (KEY.json + KEY.pair.EXT or KEY.input.EXT and KEY.target.EXT);
the first N samples of each split are decoded by the trainer's policy (A|B pairs split
at "split_x") and their sizes reported, with the stored sizes and source layouts the
manifest records (what the trainer's start-up check reads). Exits 2 on any unreadable or inconsistent shard
(each problem listed), and on a manifest the trainer refuses (a shard listed twice, an
unknown format_version, a count that is no whole number: format.Manifest.read).
"""
import argparse
import json
import sys
import tarfile

from pipeline import cli, storage
from pipeline.data.decode import decode_image
from pipeline.data.format import (
    MANIFEST,
    MAX_IMAGE_PIXELS,
    Manifest,
    Samples,
    SplitInfo,
    size_name,
)
from pipeline.errors import DataError


def read_shard(url: str, decode: int, max_pixels: int = MAX_IMAGE_PIXELS) -> dict:
    """Stream one shard: {"samples", "bytes", "sizes": {(w, h): n} of the input images
    of the first `decode` samples, "problems": [...]}."""
    stats = {"samples": 0, "sizes": {}, "problems": [], "decode": decode, "max_pixels": max_pixels}
    with storage.open_read(url) as f:
        with tarfile.open(fileobj=f, mode="r|") as tar:
            samples = Samples(tar)
            for key, members, _ in samples:
                _finish_sample(url, key, members, stats)
            if samples.last is not None:
                _finish_sample(url, *samples.last[:2], stats)
        f.read()  # the tar's zero padding, so that tell() is the file size
        stats["bytes"] = f.tell()
    return stats


def _finish_sample(url: str, key: str, members: dict, stats: dict) -> None:
    stats["samples"] += 1
    kinds = {suffix.split(".")[0] for suffix in members}
    if "json" not in kinds or not ("pair" in kinds or {"input", "target"} <= kinds):
        stats["problems"].append(f"{url}: sample {key} is incomplete: {sorted(members)}")
    elif stats["decode"] > 0:
        stats["decode"] -= 1
        try:
            size = _decode_input(members, stats["max_pixels"])
            stats["sizes"][size] = stats["sizes"].get(size, 0) + 1
        except Exception as err:  # noqa: BLE001 - anything undecodable is the finding, not a crash
            stats["problems"].append(f"{url}: sample {key}: cannot decode: "
                                     f"{type(err).__name__}: {err}")


def _decode_input(members: dict, max_pixels: int) -> tuple[int, int]:
    """Decode every image of a sample by the trainer's policy (pipeline/data/decode.py:
    the bytes decide the format; A|B pairs split at split_x); return the input's size."""
    meta = json.loads(members["json"])
    images = {s.split(".")[0]: decode_image(d, s.rsplit(".", 1)[-1], 3, max_pixels)
              for s, d in members.items() if s != "json"}
    if "pair" in images:
        pair, split_x = images["pair"], meta["split_x"]
        images = {"input": pair[:, :split_x], "target": pair[:, split_x:]}
    sizes = {kind: (im.shape[1], im.shape[0]) for kind, im in images.items()}  # width, height
    if sizes["input"] != sizes["target"]:
        raise ValueError(f"input {sizes['input']} != target {sizes['target']}")
    return sizes["input"]


def inspect(dest: str, decode: int) -> list[str]:
    """Print a report per split; return the problems found."""
    manifest_url = storage.join(dest, MANIFEST)
    if not storage.exists(manifest_url):
        raise DataError(f"no {MANIFEST} in {dest}: not a finished shard folder (shard.py "
                        "writes it last, once every shard is packed)")
    manifest = Manifest.read(manifest_url)
    problems = _unlisted(dest, manifest)
    for split, info in manifest.splits.items():
        found, nbytes, sizes, left = 0, 0, {}, decode
        entries_total = sum(shard.samples for shard in info.shards)
        if entries_total != info.samples:
            problems.append(f"{manifest_url}: split {split} says {info.samples} samples, "
                            f"its shards' entries add up to {entries_total}")
        for shard in info.shards:
            url = storage.inside(dest, shard.name)
            try:
                result = read_shard(url, left, manifest.options.get("max_pixels") or MAX_IMAGE_PIXELS)
            except (tarfile.TarError, OSError, EOFError) as err:
                problems.append(f"{url}: unreadable shard: {type(err).__name__}: {err}")
                continue
            left = result["decode"]
            problems += result["problems"]
            if (result["samples"], result["bytes"]) != (shard.samples, shard.bytes):
                problems.append(f"{url}: {result['samples']} samples, {result['bytes']} bytes; "
                                f"manifest says {shard.samples}, {shard.bytes}")
            found, nbytes = found + result["samples"], nbytes + result["bytes"]
            for size, n in result["sizes"].items():
                sizes[size] = sizes.get(size, 0) + n
        seen = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sorted(sizes.items()))  # width x height
        print(f"{split}: {len(info.shards)} shards, {found}/{info.samples} samples, "
              f"{nbytes / 2**20:.1f} MB, {info.rejected} rejected; "
              f"decoded input sizes (width x height): {seen or 'none'}")
        print(f"{split}: {describe_sizes(info)}")
        problems += _tally_problems(manifest_url, split, info)
    return problems


LAYOUT_NAMES = {"pair": "A|B images", "separate": "input and target files"}


def describe_sizes(info: SplitInfo, most: int = 3) -> str:
    """The sizes and layouts the manifest records for a split (what the trainer's
    start-up check reads), the most common `most` sizes with an example key each."""
    if info.sizes is None or info.layouts is None:
        return "sizes not recorded (packed by an older shard.py)"
    sizes = info.size_list()
    shown = ", ".join(f"{size_name(h, w)}: {count.samples} (e.g. {count.example})"
                      for (h, w), count in sizes[:most])
    more = f", ... {len(sizes) - most} more" if len(sizes) > most else ""
    layouts = ", ".join(f"{LAYOUT_NAMES.get(name, name)} {n}"
                        for name, n in sorted(info.layouts.items()) if n)
    return (f"{len(sizes)} distinct stored size{'s' if len(sizes) != 1 else ''} (width x "
            f"height of each half): {shown or 'none'}{more}; source layouts: {layouts or 'none'}")


def _tally_problems(manifest_url: str, split: str, info: SplitInfo) -> list[str]:
    """The recorded sizes and layouts must each count every sample of the split."""
    totals = {}
    if info.sizes is not None:
        totals["sizes"] = sum(count.samples for count in info.sizes.values())
    if info.layouts is not None:
        totals["layouts"] = sum(info.layouts.values())
    return [f"{manifest_url}: split {split} says {info.samples} samples, its {what} add up "
            f"to {total}" for what, total in totals.items() if total != info.samples]


def _unlisted(dest: str, manifest: Manifest) -> list[str]:
    """A problem per .tar in dest that the manifest does not list (a stale manifest, or
    shards from another run): the trainer would never read them."""
    listed = manifest.shard_names()
    return [f"{url}: a shard that manifest.json does not list"
            for url in storage.list_sizes(dest, ".tar", recursive=False)
            if url.rsplit("/", 1)[-1] not in listed]


def _main(argv: list[str]) -> int:
    parser = cli.Parser(
        prog="inspect_shards.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Check shards against manifest.json and decode a few samples.")
    parser.add_argument("dest", help="shard folder or s3://bucket/prefix")
    parser.add_argument("--decode", type=int, default=16, help="samples decoded per split")
    args = parser.parse_args(argv)
    cli.setup_logging()
    problems = inspect(args.dest, args.decode)
    for problem in problems:
        print(f"inspect_shards.py: problem: {problem}", file=sys.stderr)
    if problems:
        raise DataError(f"{len(problems)} problems in {args.dest} (listed above)")
    print("inspect_shards.py: all shards OK", file=sys.stderr)
    return 0


main = cli.entry_point("inspect_shards.py", _main)


if __name__ == "__main__":
    sys.exit(main())
