"""data_tools/shard.py end to end: round trips (local, S3), determinism, slices + merge,
resume after a real kill, every bad-input case, clear one-line failures."""
import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_tools import inspect_shards, shard
from pipeline import storage

REPO = Path(__file__).resolve().parents[1]
SHARD_PY = [sys.executable, str(REPO / "data_tools" / "shard.py")]


# ---------------------------------------------------------------------------- datasets

def image_bytes(width, height, fmt="JPEG", seed=0) -> bytes:
    rng = random.Random(seed)
    im = Image.frombytes("RGB", (width, height), bytes(rng.getrandbits(8) for _ in range(width * height * 3)))
    buffer = io.BytesIO()
    im.save(buffer, fmt)
    return buffer.getvalue()


def make_aligned(root: Path, counts: dict, size=(32, 16)) -> dict:
    """A|B images in root/SPLIT/ (or flat for split None); returns {relpath: bytes}."""
    files = {}
    for split, n in counts.items():
        for i in range(n):
            rel = f"{split}/{i}.jpg" if split else f"{i}.jpg"
            files[rel] = image_bytes(*size, seed=f"{split}/{i}")
    write_files(root, files)
    return files


def make_folders(root: Path, n: int, fmt="PNG") -> dict:
    files = {}
    for i in range(n):
        files[f"A/p{i}.png"] = image_bytes(16, 16, fmt, seed=i)
        files[f"B/p{i}.png"] = image_bytes(16, 16, fmt, seed=1000 + i)
    write_files(root, files)
    return files


def write_files(root: Path, files: dict) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def run_shard(*args) -> int:
    return shard.main([str(a) for a in args] + ["--quiet"])


def manifest(dest) -> dict:
    return json.loads(storage.read_bytes(storage.join(str(dest), "manifest.json")))


def tree(root: Path) -> dict:
    """{relative path: bytes} of every visible file below root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def samples_by_tarfile(dest: str) -> dict:
    """{(split, key): {suffix: bytes}} read back with plain tarfile via storage."""
    found = {}
    for split, info in manifest(dest)["splits"].items():
        for entry in info["shards"]:
            with storage.open_read(storage.join(dest, entry["name"])) as f, \
                    tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    key, _, suffix = member.name.partition(".")
                    assert member.mtime == shard.TAR_MTIME and member.uid == 0
                    found.setdefault((split, key), {})[suffix] = tar.extractfile(member).read()
    return found


def samples_by_webdataset(dest: str) -> dict:
    """The same, read by webdataset: its WebDataset locally, its tar iterators over
    storage streams on S3 (webdataset 1.0.2 has no s3:// opener)."""
    urls = [storage.join(dest, s["name"]) for info in manifest(dest)["splits"].values()
            for s in info["shards"]]
    if storage.is_s3(dest):
        samples = list(group_by_keys(tar_file_expander(
            {"url": url, "stream": storage.open_read(url)} for url in urls)))
    else:
        samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    found = {(s["__url__"].rsplit("/", 1)[1].rsplit("-", 1)[0], s["__key__"]):
             {k: v for k, v in s.items() if not k.startswith("__")} for s in samples}
    assert len(found) == len(samples)  # no key twice
    return found


def assert_pairs_intact(found: dict, files: dict) -> None:
    """Every source A|B image present exactly once, bytes untouched, JSON consistent."""
    assert len(found) == len(files)
    sources = {}
    for (split, key), members in found.items():
        meta = json.loads(members["json"])
        assert meta["layout"] == "pair" and meta["split_x"] == meta["width"] // 2
        assert members["pair.jpg"] == files[meta["source"]]
        sources[meta["source"]] = split
    assert set(sources) == set(files)
    assert all(rel.startswith(split + "/") for rel, split in sources.items() if "/" in rel)


# -------------------------------------------------------------------------- round trips

def test_aligned_roundtrip_local_tarfile_and_webdataset(tmp_path):
    files = make_aligned(tmp_path / "src", {"train": 20, "val": 5})
    dest = tmp_path / "out"
    assert run_shard(tmp_path / "src", dest, "--workers", "2") == 0
    found = samples_by_tarfile(str(dest))
    assert_pairs_intact(found, files)
    m = manifest(dest)
    assert m["format_version"] == 1 and m["rejected"] == {}
    assert len(m["splits"]["train"]["shards"]) == 8  # --min-shards for ranks x workers
    assert [m["splits"][s]["samples"] for s in ("train", "val")] == [20, 5]
    for info in m["splits"].values():
        assert info["bytes"] == sum(s["bytes"] for s in info["shards"])
        for s in info["shards"]:
            assert (dest / s["name"]).stat().st_size == s["bytes"]
    assert samples_by_webdataset(str(dest)) == found
    assert inspect_shards.main([str(dest)]) == 0
    with open(dest / "train-000003.tar", "r+b") as f:  # a damaged shard is reported
        f.truncate(3000)
    assert inspect_shards.main([str(dest)]) == 1


def test_folders_and_list_layouts_keep_bytes(tmp_path):
    files = make_folders(tmp_path / "src", 6)
    assert run_shard(tmp_path / "src", tmp_path / "out", "--split", "val") == 0
    found = samples_by_tarfile(str(tmp_path / "out"))
    assert {split for split, _ in found} == {"val"} and len(found) == 6
    for members in found.values():
        name = json.loads(members["json"])["source"]
        assert members["input.png"] == files[f"A/{name}"]
        assert members["target.png"] == files[f"B/{name}"]

    with open(tmp_path / "src" / "pairs.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["input", "target"])
        rows.writerows([[f"A/p{i}.png", str(tmp_path / "src" / f"B/p{i}.png")] for i in range(6)])
    assert run_shard(tmp_path / "src" / "pairs.csv", tmp_path / "out_csv") == 0
    found = samples_by_tarfile(str(tmp_path / "out_csv"))
    assert len(found) == 6
    for members in found.values():
        name = json.loads(members["json"])["source"]  # as listed: A/pI.png
        assert members["input.png"] == files[name]
        assert members["target.png"] == files[name.replace("A/", "B/")]


def test_jsonl_list_with_splits_and_dotted_names(tmp_path):
    files = {"x/a.b.v2.png": image_bytes(8, 8, "PNG", 1), "y/a.b.v2.png": image_bytes(8, 8, "PNG", 2),
             "x/a_b_v2.png": image_bytes(8, 8, "PNG", 3), "y/a_b_v2.png": image_bytes(8, 8, "PNG", 4),
             "x/c.png": image_bytes(8, 8, "PNG", 5), "y/c.png": image_bytes(8, 8, "PNG", 6)}
    write_files(tmp_path, files)
    rows = [{"input": "x/a.b.v2.png", "target": "y/a.b.v2.png", "split": "train"},
            {"input": "x/a_b_v2.png", "target": "y/a_b_v2.png", "split": "train"},
            {"input": "x/c.png", "target": "y/c.png", "split": "val"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_shard(tmp_path / "pairs.jsonl", tmp_path / "out") == 0
    found = samples_by_tarfile(str(tmp_path / "out"))
    keys = sorted(found)
    assert [k[0] for k in keys] == ["train", "train", "val"]
    assert all("." not in key for _, key in keys) and len({k for _, k in keys}) == 3
    for members in found.values():
        listed = json.loads(members["json"])["source"]
        assert members["input.png"] == files[listed]
        assert members["target.png"] == files[listed.replace("x/", "y/")]


def test_split_pairs_and_resize_reencode(tmp_path):
    make_aligned(tmp_path / "src", {None: 3}, size=(64, 32))
    assert run_shard(tmp_path / "src", tmp_path / "out", "--split-pairs", "--resize", "8") == 0
    found = samples_by_tarfile(str(tmp_path / "out"))
    for members in found.values():
        meta = json.loads(members["json"])
        assert (meta["layout"], meta["source_layout"], meta["reencoded"]) == ("separate", "pair", "png")
        for kind in ("input", "target"):
            assert Image.open(io.BytesIO(members[f"{kind}.png"])).size == (8, 8)
    # --split-pairs alone is lossless: halves equal the decoded source's halves
    assert run_shard(tmp_path / "src", tmp_path / "out2", "--split-pairs") == 0
    for members in samples_by_tarfile(str(tmp_path / "out2")).values():
        source = Image.open(tmp_path / "src" / json.loads(members["json"])["source"]).convert("RGB")
        assert Image.open(io.BytesIO(members["input.png"])).tobytes() == source.crop((0, 0, 32, 32)).tobytes()
        assert Image.open(io.BytesIO(members["target.png"])).tobytes() == source.crop((32, 0, 64, 32)).tobytes()


def _upload(folder: Path, url: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            storage.put(str(path), storage.join(url, str(path.relative_to(folder))))


def test_s3_roundtrip_moto_source_and_dest(tmp_path, moto_s3, monkeypatch):
    moto_s3.use(monkeypatch)
    files = make_aligned(tmp_path / "src", {"train": 10, "test": 3})
    bucket = moto_s3.make_bucket()
    _upload(tmp_path / "src", f"s3://{bucket}/src")
    dest = f"s3://{bucket}/shards"
    assert run_shard(f"s3://{bucket}/src", dest, "--workers", "2") == 0
    found = samples_by_tarfile(dest)
    assert_pairs_intact(found, files)
    assert samples_by_webdataset(dest) == found
    assert inspect_shards.main([dest]) == 0
    # same shards, byte for byte, as a local run from a local source
    assert run_shard(tmp_path / "src", tmp_path / "local") == 0
    for info in manifest(dest)["splits"].values():
        for s in info["shards"]:
            assert storage.read_bytes(storage.join(dest, s["name"])) == (tmp_path / "local" / s["name"]).read_bytes()


@pytest.mark.timeout(120)
def test_s3_seaweedfs_dest_and_bad_credentials(tmp_path, seaweed_s3, monkeypatch):
    seaweed_s3.use(monkeypatch)
    files = make_aligned(tmp_path / "src", {"train": 9})
    dest = f"s3://{seaweed_s3.make_bucket()}/facades"
    assert run_shard(tmp_path / "src", dest) == 0
    assert_pairs_intact(samples_by_tarfile(dest), files)
    written = storage.list_files(dest)
    assert storage.join(dest, "manifest.json") in written and len(written) > 10
    assert not any(seaweed_s3.secret_key.encode() in storage.read_bytes(url) for url in written)
    # bad credentials: the CLI fails at once, one line, no secret in it
    wrong = "wrong-secret-" + "q" * 24
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY=wrong)
    result = subprocess.run(SHARD_PY + [str(tmp_path / "src"), dest + "2", "--quiet"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    output = (result.stdout + result.stderr).strip()
    assert output.count("\n") == 0 and "access denied" in output and dest in output
    assert wrong not in output and seaweed_s3.secret_key not in output


# ------------------------------------------------------------------------ determinism

def test_workers_and_slices_give_identical_bytes(tmp_path):
    make_aligned(tmp_path / "src", {"train": 30, "val": 6})
    src = tmp_path / "src"
    assert run_shard(src, tmp_path / "w1", "--workers", "1", "--max-samples", "3") == 0
    assert run_shard(src, tmp_path / "w2", "--workers", "2", "--max-samples", "3") == 0
    for i in (1, 0):  # slices in any order, then merge
        assert run_shard(src, tmp_path / "sl", "--slice", f"{i}/2", "--max-samples", "3") == 0
        assert not (tmp_path / "sl" / "manifest.json").exists()
    assert shard.main(["merge", str(tmp_path / "sl")]) == 0
    reference = tree(tmp_path / "w1")
    assert len([n for n in reference if n.endswith(".tar")]) == 16  # 10 train + 6 val (one each)
    assert tree(tmp_path / "w2") == reference
    assert tree(tmp_path / "sl") == reference
    # a different seed reorders pairs across shards
    assert run_shard(src, tmp_path / "s1", "--seed", "1", "--max-samples", "3") == 0
    assert tree(tmp_path / "s1")["train-000000.tar"] != reference["train-000000.tar"]


def test_merge_refuses_missing_slices(tmp_path):
    make_aligned(tmp_path / "src", {None: 8})
    assert run_shard(tmp_path / "src", tmp_path / "out", "--slice", "0/2") == 0
    with pytest.raises(SystemExit, match="4 of 8 shards .* not packed yet"):
        shard.main(["merge", str(tmp_path / "out")])


# ----------------------------------------------------------------------------- resume

@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig,workers", [(signal.SIGKILL, 1), (signal.SIGINT, 1), (signal.SIGTERM, 2)])
def test_resume_after_real_kill(tmp_path, sig, workers):
    make_aligned(tmp_path / "src", {None: 600})
    args = [str(tmp_path / "src"), "--workers", str(workers), "--max-samples", "10", "--verify",
            "--quiet"]
    subprocess.run(SHARD_PY + [args[0], str(tmp_path / "ref")] + args[1:], check=True, timeout=60)
    reference = tree(tmp_path / "ref")

    dest = tmp_path / "out"
    # SIGINT as at a terminal: a job started in the background by a non-interactive shell
    # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt for it
    process = subprocess.Popen(SHARD_PY + [args[0], str(dest)] + args[1:], stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while not list((dest / "_parts").glob("*-*.json")):  # first finished shard
        assert process.poll() is None, "finished before it could be interrupted"
        time.sleep(0.005)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode != 0
    if sig != signal.SIGKILL:  # a catchable signal: the shards being written are cleaned up
        assert stderr.decode().strip() == ("shard.py: interrupted; finished shards are kept, "
                                           "run the same command again to resume")
        assert not list(dest.glob(".*.tmp"))
    interrupted = tree(dest)
    tars = [n for n in interrupted if n.endswith(".tar")]
    assert 0 < len(tars) < 60 and "manifest.json" not in interrupted
    for name in tars:  # any shard under its final name is complete, never truncated
        assert interrupted[name] == reference[name]

    rerun = subprocess.run(SHARD_PY + [args[0], str(dest)] + args[1:], check=True,
                           timeout=60, capture_output=True, text=True)
    parts = [n for n in interrupted if n.startswith("_parts/") and "-" in n]
    assert f"; {len(parts)} already done" in rerun.stderr  # finished shards were skipped
    assert tree(dest) == reference


# -------------------------------------------------------------------------- bad input

def test_bad_aligned_inputs_are_counted_and_listed(tmp_path):
    src = tmp_path / "src"
    files = make_aligned(src, {None: 6})
    jpeg = image_bytes(32, 16)
    write_files(src, {
        "text.jpg": b"this is not an image",
        "gif.gif": image_bytes(32, 16, "GIF"),
        "odd.jpg": image_bytes(33, 16),          # halves of different sizes
        "huge.jpg": image_bytes(64, 32),        # above --max-pixels below
        "cut.jpg": jpeg[:jpeg.find(b"\xff\xda") + 100],  # headers whole, data cut
    })
    dest = tmp_path / "out"
    assert run_shard(src, dest, "--max-pixels", "1000") == 0
    assert manifest(dest)["rejected"] == {"not_an_image": 1, "size_mismatch": 1,
                                          "too_large": 1, "unsupported_format": 1}
    rows = [json.loads(line) for line in (dest / "rejected.jsonl").read_text().splitlines()]
    assert sorted((r["source"], r["reason"]) for r in rows) == [
        ("gif.gif", "unsupported_format"), ("huge.jpg", "too_large"),
        ("odd.jpg", "size_mismatch"), ("text.jpg", "not_an_image")]
    found = samples_by_tarfile(str(dest))
    assert_pairs_intact({k: v for k, v in found.items() if k[1] != "cut"}, files)

    assert run_shard(src, tmp_path / "verified", "--max-pixels", "1000", "--verify") == 0
    assert manifest(tmp_path / "verified")["rejected"]["decode_error"] == 1
    assert manifest(tmp_path / "verified")["splits"]["train"]["samples"] == 6
    with pytest.raises(SystemExit):  # --strict: any rejection is a non-zero exit
        sys.exit(run_shard(src, tmp_path / "strict", "--strict"))


def test_bad_folder_inputs_missing_halves_and_size_policy(tmp_path):
    src = tmp_path / "src"
    make_folders(src, 4)
    write_files(src, {"A/only_a.png": image_bytes(16, 16, "PNG"),
                      "B/only_b.png": image_bytes(16, 16, "PNG"),
                      "A/big.png": image_bytes(16, 16, "PNG"),
                      "B/big.png": image_bytes(8, 8, "PNG")})
    assert run_shard(src, tmp_path / "skip") == 0
    m = manifest(tmp_path / "skip")
    assert m["rejected"] == {"missing_input": 1, "missing_target": 1, "size_mismatch": 1}
    assert m["splits"]["train"]["samples"] == 4

    assert run_shard(src, tmp_path / "resize", "--on-size-mismatch", "resize") == 0
    found = samples_by_tarfile(str(tmp_path / "resize"))
    assert len(found) == 5
    big = found[("train", "big")]
    assert Image.open(io.BytesIO(big["target.png"])).size == (16, 16)
    assert json.loads(big["json"])["reencoded"] == "png"


def test_rejected_pair_leaves_a_hole(tmp_path):
    files = make_aligned(tmp_path / "src", {None: 16})
    assert run_shard(tmp_path / "src", tmp_path / "good") == 0
    (tmp_path / "src" / "3.jpg").write_bytes(b"garbage")
    assert run_shard(tmp_path / "src", tmp_path / "bad") == 0
    good, bad = manifest(tmp_path / "good"), manifest(tmp_path / "bad")
    changed = [a["name"] for a, b in zip(good["splits"]["train"]["shards"],
                                         bad["splits"]["train"]["shards"]) if a != b]
    assert len(changed) == 1  # only the shard that held 3.jpg differs
    assert len(files) - 1 == bad["splits"]["train"]["samples"]


@pytest.mark.parametrize("case", ["empty", "unwritable", "pipe"])
def test_fails_at_once_with_one_line(tmp_path, case):
    (tmp_path / "empty").mkdir()
    make_aligned(tmp_path / "src", {None: 2})
    (tmp_path / "file").write_text("x")
    source, dest, expected = {
        "empty": (tmp_path / "empty", tmp_path / "out", "no image pairs found"),
        "unwritable": (tmp_path / "src", tmp_path / "file" / "out", "cannot write to"),
        "pipe": ("pipe:curl http://x/a.tar", tmp_path / "out", "pipe: URLs run a shell"),
    }[case]
    result = subprocess.run(SHARD_PY + [str(source), str(dest)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and expected in result.stderr
    assert result.stderr.startswith("shard.py: error: ")


def test_help_lists_every_option_with_default():
    text = shard.build_parser().format_help()
    for action in shard.build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.option_strings[-1] in text
    assert text.count("(default:") == len([a for a in shard.build_parser()._actions
                                           if a.option_strings and a.dest != "help"])
