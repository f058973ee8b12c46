"""pipeline/data/ across processes and servers: real ranks (forked, gloo) take equal
steps on good and bad data, shards written by the shard.py process read back, and the
same stream from S3 (SeaweedFS) as from local disk."""
import io
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import data, storage
from tests.helpers.gloo_ranks import run_ranks
from tests.helpers.images import config, epoch_batches, keys_of, sample_pixels, write_dataset
from tests.helpers.trainer_runs import ROOT

# ------------------------------------------------------------------- real ranks (gloo)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_take_equal_steps(tmp_path, world, workers):
    cases, datasets = {}, {}
    for shards in (1, 7, 9, 12):  # 12: divides evenly for every ranks x workers here
        folder = tmp_path / f"d{shards}"
        datasets[shards] = write_dataset(folder, [6] * shards, prefix=f"d{shards}")
        cases[f"resampled{shards}"] = config(folder, mode="resampled", num_workers=workers)
        if shards >= world * max(1, workers):
            cases[f"exact{shards}"] = config(folder, num_workers=workers)
    results = run_ranks(world, cases, tmp_path)
    for name in cases:
        steps = [len(r[name]["keys"]) for r in results]
        assert len(set(steps)) == 1 and steps[0] == results[0][name]["planned"] > 0, (name, steps)
        if name.startswith("exact"):
            seen = [k for r in results for batch in r[name]["keys"] for k in batch]
            assert len(seen) == len(set(seen)), f"{name}: a sample seen twice"
            shards = int(name.removeprefix("exact"))
            if shards % (world * max(1, workers)) == 0:
                assert sorted(seen) == sorted(datasets[shards])


def corrupt_dataset(folder: Path, world: int) -> None:
    """8 shards; in two of rank 1's (epoch 0) a sample loses its target, another gets a
    corrupt image, and the second shard is truncated. Rank 1's: the last quarter of the
    epoch's order is stream 3 of 4 and stream 1 of 2, rank 1's streams either way."""
    assert world == 2
    write_dataset(folder, [6] * 8)
    shards = data.list_shards(str(folder), "train")
    corrupt, truncated = (Path(shard.url) for shard in data.epoch_shards(shards, 7, 0)[-2:])
    orphan = f"s{int(corrupt.stem.split('-')[1]):02d}n000.target.png"
    with tarfile.open(corrupt) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(corrupt, "w") as tar:
        for member, payload in members:
            if member.name != orphan:
                tar.addfile(member, io.BytesIO(payload))
    raw = bytearray(corrupt.read_bytes())
    png_at = raw.index(b"\x89PNG", 4096)  # a later sample's image
    raw[png_at + 40:png_at + 120] = b"\x00" * 80
    corrupt.write_bytes(bytes(raw))
    truncated.write_bytes(truncated.read_bytes()[:5000])


@pytest.mark.timeout(180)
def test_bad_data_on_one_rank_no_hang_equal_steps_counted(tmp_path):
    corrupt_dataset(tmp_path, world=2)
    cases = {"exact": config(tmp_path, num_workers=2), "exact0": config(tmp_path),
             "resampled": config(tmp_path, mode="resampled", num_workers=2)}
    results = run_ranks(2, cases, tmp_path)
    steps = [len(r["resampled"]["keys"]) for r in results]  # endless: bad data never cuts
    assert steps[0] == steps[1] == results[0]["resampled"]["planned"]
    for name in ("exact", "exact0"):
        steps = [len(r[name]["keys"]) for r in results]
        assert steps[0] == steps[1] > 0
        assert results[0][name]["skipped"] == {}
        skipped = results[1][name]["skipped"]
        assert skipped == {"truncated_shard": 1, "corrupt_image": 1, "missing_target": 1}
        assert steps[0] < results[0][name]["planned"]  # rank 1 ran short: all cut together


# ---------------------------------------------------------------------- shard.py and S3

def make_shards_with_shard_py(tmp_path) -> Path:
    """An aligned A|B source folder (PNG: exact pixels), packed by data_tools/shard.py."""
    source = tmp_path / "source"
    for split, count in (("train", 12), ("val", 3)):
        (source / split).mkdir(parents=True)
        for i in range(count):
            a = sample_pixels(f"{split}{i}")
            Image.fromarray(np.concatenate([a, 255 - a], axis=1)).save(
                source / split / f"{i}.png")
    dest = tmp_path / "shards"
    subprocess.run([sys.executable, "data_tools/shard.py", str(source), str(dest),
                    "--min-shards", "4", "--workers", "1", "--quiet"],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    return dest


@pytest.mark.timeout(120)
def test_reads_shards_written_by_shard_py(tmp_path):
    dest = make_shards_with_shard_py(tmp_path)
    cfg = config(dest, num_workers=0, batch_size=3, load_size=16, flip=False)
    loader = data.make_train_loader(cfg, rank=0, world_size=1, seed=0, in_channels=3,
                                    out_channels=3)
    batches = epoch_batches(loader)
    assert len(keys_of(batches)) == 12 and loader.skipped == {}
    for batch in batches:  # pair members split after decode: target = 255 - input
        assert (batch["input"] + batch["target"]).abs().max() < 1e-6
    evaluated = list(data.make_eval_loader(cfg, rank=0, world_size=1, in_channels=3,
                                           out_channels=3))
    assert len(keys_of(evaluated)) == 3


@pytest.mark.timeout(180)
def test_same_stream_from_s3(tmp_path, seaweed_s3, monkeypatch):
    write_dataset(tmp_path / "local", [5, 4, 6, 5])
    seaweed_s3.use(monkeypatch)
    bucket = seaweed_s3.make_bucket()
    for path in sorted((tmp_path / "local").iterdir()):
        storage.put(str(path), f"s3://{bucket}/ds/{path.name}")
    for workers in (0, 2):
        local = config(tmp_path / "local", num_workers=workers)
        remote = replace(local, train=f"s3://{bucket}/ds")
        runs = [epoch_batches(data.make_train_loader(c, rank=0, world_size=1, seed=1,
                                                     in_channels=3, out_channels=3))
                for c in (local, remote)]
        assert keys_of(runs[0]) == keys_of(runs[1]) and len(keys_of(runs[0])) == 20
        assert all(torch.equal(a["input"], b["input"]) for a, b in zip(*runs))
