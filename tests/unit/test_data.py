"""pipeline/data.py: stages alone, then real multi-process ranks (gloo), S3, resume."""
import io
import json
import multiprocessing
import os
import socket
import struct
import subprocess
import sys
import tarfile
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import data
from pipeline.config import DataConfig

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16  # pixels of the test images: tiny, the 2 shared cores stay free


# ------------------------------------------------------------------------------ helpers

def image_bytes(pixels: np.ndarray, fmt: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **save)
    return buffer.getvalue()


def sample_pixels(key: str, size: int = SIZE) -> np.ndarray:
    """A smooth image unique to `key` (smooth: resizes keep it a known function)."""
    rng = np.random.default_rng(data.derive_seed(key))
    ramp = np.linspace(0, 1, size)
    base = rng.uniform(40, 200, 3) + rng.uniform(-30, 30, 3) * ramp[:, None, None] \
        + rng.uniform(-30, 30, 3) * ramp[None, :, None]
    return base.round().astype(np.uint8)


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_dataset(folder: Path, counts: list[int], split: str = "train",
                  prefix: str = "") -> list[str]:
    """Shards `split-00000N.tar` of PNG pairs (target = 255 - input) + manifest.json;
    returns every key."""
    folder.mkdir(parents=True, exist_ok=True)
    keys, entries = [], []
    for number, count in enumerate(counts):
        name = f"{split}-{number:06d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for i in range(count):
                key = f"{prefix}s{number:02d}n{i:03d}"
                pixels = sample_pixels(key)
                add_member(tar, f"{key}.input.png", image_bytes(pixels))
                add_member(tar, f"{key}.target.png", image_bytes(255 - pixels))
                add_member(tar, f"{key}.json", b'{"layout": "separate"}')
                keys.append(key)
        entries.append({"name": name, "samples": count, "bytes": (folder / name).stat().st_size})
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else \
        {"format_version": 1, "splits": {}, "options": {}}
    manifest["splits"][split] = {"samples": sum(counts),
                                 "bytes": sum(e["bytes"] for e in entries), "shards": entries}
    manifest_path.write_text(json.dumps(manifest))
    return keys


def config(folder, **overrides) -> DataConfig:
    base = dict(train=str(folder), val=str(folder), load_size=18, crop_size=16,
                batch_size=2, num_workers=0, shuffle_buffer=4)
    return DataConfig(**{**base, **overrides})


def epoch_batches(loader) -> list[dict]:
    """The batches of the loader's current epoch (stops at the first batch of the next);
    sets loader.epoch_skipped to the skip counts as the epoch ended."""
    epoch, batches = loader.epoch, []
    while True:
        skipped = loader.skipped
        batch = next(loader)
        if loader.epoch != epoch:
            loader.epoch_skipped = skipped
            return batches
        batches.append(batch)


def keys_of(batches) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ listing

def test_list_shards_forms(tmp_path):
    write_dataset(tmp_path, [3, 2])
    by_folder = data.list_shards(str(tmp_path), "train")
    assert [s.samples for s in by_folder] == [3, 2]
    assert data.list_shards(str(tmp_path / "manifest.json"), "train") == by_folder
    pattern = str(tmp_path / "train-{000000..000001}.tar")
    assert data.list_shards(pattern, "ignored") == by_folder  # counts from the manifest
    (tmp_path / "manifest.json").unlink()
    assert data.list_shards(pattern, "ignored") == by_folder  # counts from tar headers
    for refused in ("pipe:cat x.tar", "http://host/x.tar"):
        with pytest.raises(ValueError, match="refusing"):
            data.list_shards(refused, "train")


def test_damaged_tars_are_counted_not_silently_short(tmp_path):
    write_dataset(tmp_path, [3])
    shard = tmp_path / "train-000000.tar"
    whole = shard.read_bytes()
    offsets = [m.offset for m in tarfile.open(shard)]  # 9 members: 3 per sample
    read = lambda: [(e[2], e[3] if e[2] is None else None) for e in data.read_entries([shard])]
    assert read() == [("s00n000", None), ("s00n001", None), ("s00n002", None)]
    cases = {"at a header boundary": whole[:offsets[6]],
             "inside member data": whole[:offsets[6] + 700],
             "garbage header": whole[:offsets[3]] + b"x" * 512 + whole[offsets[3] + 512:]}
    for case, damaged in cases.items():
        shard.write_bytes(damaged)
        entries = read()
        assert entries[-1] == (None, "truncated_shard"), case
        assert all(key is not None for key, _ in entries[:-1]), case


def test_shard_order_and_splits_partition():
    shards = list(range(9))
    assert data.epoch_shards(shards, 1, 0) == data.epoch_shards(shards, 1, 0)
    assert data.epoch_shards(shards, 1, 0) != data.epoch_shards(shards, 1, 1)
    parts = [data.split_by_worker(data.split_by_node(shards, r, 2), w, 2)
             for r in range(2) for w in range(2)]
    assert sorted(sum(parts, [])) == shards


def test_exact_mode_refuses_too_few_shards(tmp_path):
    write_dataset(tmp_path, [4, 4, 4])
    with pytest.raises(ValueError, match="3 shards < 2 ranks x 2 workers"):
        data.make_train_loader(config(tmp_path, num_workers=2), rank=0, world_size=2, seed=0,
                               in_channels=3, out_channels=3, have_batch_all_ranks=bool)


# ------------------------------------------------------------------------------- decode

def decode(payload: bytes, ext: str, channels: int = 3, max_pixels: int = 10**6):
    return data.decode_image(payload, ext, channels, max_pixels)


def test_decode_policy():
    rgb = sample_pixels("policy")
    gray = rgb[..., 0]
    # JPEG (simplejpeg) and PNG/WebP (PIL) give uint8 HxWxC with the channels asked for
    assert np.abs(decode(image_bytes(rgb, "JPEG", quality=95), "jpg").astype(int) - rgb).max() < 12
    assert np.array_equal(decode(image_bytes(rgb, "WEBP", lossless=True), "webp"), rgb)
    assert decode(image_bytes(gray, "JPEG"), "jpg").shape == (SIZE, SIZE, 3)  # gray -> RGB
    png_gray = decode(image_bytes(rgb), "png", channels=1)                   # RGB -> luma
    assert np.array_equal(png_gray[..., 0], np.asarray(Image.fromarray(rgb).convert("L")))
    # 16-bit grayscale PNG is scaled to 8 bits, not clipped
    deep = np.array([[0, 32768, 65535, 257]], dtype=np.uint16)
    assert decode(image_bytes(deep), "png", channels=1)[0, :, 0].tolist() == [0, 128, 255, 1]
    # palette PNG with transparency: colours kept, alpha dropped
    palette = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    buffer = io.BytesIO()
    palette.save(buffer, "PNG", transparency=0)
    assert np.array_equal(decode(buffer.getvalue(), "png"), np.asarray(palette.convert("RGB")))
    # CMYK JPEG (PIL path) decodes to RGB
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buffer, "JPEG", quality=95)
    cmyk = decode(buffer.getvalue(), "jpg")
    assert cmyk.shape == (SIZE, SIZE, 3) and np.abs(cmyk.astype(int) - rgb).max() < 24
    # corrupt bytes are a BadSample, never another exception
    for ext in ("jpg", "png", "webp"):
        with pytest.raises(data.BadSample, match="corrupt_image"):
            decode(image_bytes(rgb, "PNG")[:60], ext)


def test_exif_orientation_is_ignored_alike_for_both_halves():
    pixels = np.zeros((8, 16, 3), np.uint8)
    pixels[:, :8] = 200
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    tagged = image_bytes(pixels, "JPEG", quality=95, exif=exif.tobytes())
    assert Image.open(io.BytesIO(tagged)).getexif()[0x0112] == 6
    decoded = decode(tagged, "jpg")
    assert decoded.shape == (8, 16, 3)  # stored pixel grid, not rotated
    cfg = DataConfig()
    parts = {"pair.jpg": tagged, "json": b'{"split_x": 8}'}
    a, b = data.decode_sample(parts, cfg, 3, 3)
    assert a.shape == b.shape == (8, 8, 3) and a.mean() > 150 > 50 > b.mean()


def test_bomb_guard_reads_only_the_header():
    # PNG claiming 100000 x 100000 pixels: rejected from the header, no allocation
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body +
                                struct.pack(">I", __import__("zlib").crc32(kind + body)))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
    with pytest.raises(data.BadSample, match="too_large"):
        decode(png, "png")
    # JPEG whose frame header says 60000 x 60000
    jpeg = bytearray(image_bytes(sample_pixels("bomb"), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
    with pytest.raises(data.BadSample, match="too_large"):
        decode(bytes(jpeg), "jpg")
    with pytest.raises(data.BadSample, match="too_large"):  # the configured limit
        decode(image_bytes(sample_pixels("x", 64)), "png", max_pixels=64 * 64 - 1)


def test_pair_layout_split_and_direction():
    a, b = sample_pixels("a"), sample_pixels("b")
    whole = np.concatenate([a, b[:, :10]], axis=1)  # split not at the middle
    parts = {"pair.png": image_bytes(whole), "json": json.dumps({"split_x": SIZE}).encode()}
    got_a, got_b = data.decode_sample(parts, DataConfig(direction="AtoB"), 3, 1)
    assert np.array_equal(got_a, a) and got_b.shape == (SIZE, 10, 1)
    got_b3, got_a1 = data.decode_sample(parts, DataConfig(direction="BtoA"), 3, 1)
    assert np.array_equal(got_b3, b[:, :10]) and got_a1.shape == (SIZE, SIZE, 1)
    with pytest.raises(data.BadSample, match="missing_target"):
        data.decode_sample({"input.png": parts["pair.png"]}, DataConfig(), 3, 3)


# ------------------------------------------------------------------------- augmentation

def test_augmentation_keeps_pairs_aligned_in_worker_and_on_device(tmp_path):
    write_dataset(tmp_path, [8])
    worker = config(tmp_path, load_size=24, crop_size=16, batch_size=8)
    device = replace(worker, augment_on="device")
    batch = next(data.make_train_loader(worker, rank=0, world_size=1, seed=3,
                                        in_channels=3, out_channels=3))
    raw = next(data.make_train_loader(device, rank=0, world_size=1, seed=3,
                                      in_channels=3, out_channels=3))
    x, y = data.to_device(raw, "cpu", cfg=device, channels_last=True)
    assert x.shape == (8, 3, 16, 16) and x.is_contiguous(memory_format=torch.channels_last)
    assert raw["key"] == batch["key"] and raw["input"].dtype == torch.uint8
    assert torch.equal(x, batch["input"]) and torch.equal(y, batch["target"])  # same params
    # target = 255 - input survives resize, crop and flip: y == -x (up to rounding)
    assert (batch["input"] + batch["target"]).abs().max() <= 2.01 / 127.5
    params = raw["aug"].tolist()
    assert len({tuple(p[:2]) for p in params}) > 1 and {p[2] for p in params} == {0, 1}
    # the crop really is each key's: recompute one sample by hand
    top, left, flip = data.augment_params(3, 0, batch["key"][0], worker)
    manual = data.resize_u8(data._chw(sample_pixels(batch["key"][0])), 24)[0, :, top:top + 16,
                                                                          left:left + 16]
    manual = manual.flip(-1) if flip else manual
    assert torch.equal(data.to_unit_range(manual), batch["input"][0])


def test_device_resize_matches_the_cpu_kernel():
    images = torch.from_numpy(np.stack([sample_pixels("r1", 40), sample_pixels("r2", 40)]))
    images = images.permute(0, 3, 1, 2)
    for size in (28, 57):  # down (antialiased) and up
        cpu, via_float = data.resize_u8(images, size), data.resize_u8_via_float(images, size)
        assert (cpu.int() - via_float.int()).abs().max() <= 1


# ----------------------------------------------------------------------- eval / resume

def test_eval_loader_every_sample_once_across_ranks(tmp_path):
    keys = write_dataset(tmp_path, [5, 4], split="val")
    cfg = config(tmp_path, crop_size=8, num_workers=2)
    seen = []
    for rank in range(2):
        loader = data.make_eval_loader(cfg, rank=rank, world_size=2, in_channels=3,
                                       out_channels=1, batch_size=3)
        batches = list(loader)
        assert keys_of(batches) == keys_of(list(loader))  # deterministic, re-iterable
        assert batches[0]["input"].shape[1:] == (3, 8, 8)
        assert batches[0]["target"].shape[1:] == (1, 8, 8)
        seen += keys_of(batches)
    assert sorted(seen) == sorted(keys)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("mode,rank,world,counts,total,stops", [
    ("exact", 1, 2, [7, 6, 5, 6], 6, (1, 2, 3)),
    ("exact", 0, 1, [3, 12, 3, 9], 12, (1, 6, 8, 10)),  # workers with unequal batch counts
    ("resampled", 1, 2, [7, 6, 5, 6], 6, (2, 4)),
])
def test_resume_equals_uninterrupted_stream(tmp_path, workers, mode, rank, world, counts,
                                            total, stops):
    write_dataset(tmp_path, counts)
    cfg = config(tmp_path, num_workers=workers, batch_size=3, mode=mode)
    make = lambda: data.make_train_loader(cfg, rank=rank, world_size=world, seed=5,
                                          in_channels=3, out_channels=3,
                                          have_batch_all_ranks=bool)
    straight = make()
    reference = [next(straight) for _ in range(total)]  # crosses into epoch 1
    assert straight.epoch == 1
    for k in stops:
        first = make()
        consumed = [next(first) for _ in range(k)]
        state = json.loads(json.dumps(first.state_dict()))
        resumed = make()
        resumed.load_state_dict(state)
        batches = consumed + [next(resumed) for _ in range(total - k)]
        assert [b["key"] for b in batches] == [b["key"] for b in reference]
        for got, want in zip(batches, reference):
            assert torch.equal(got["input"], want["input"])
            assert torch.equal(got["target"], want["target"])


def test_resume_deep_in_a_shard_decodes_nothing_skipped(tmp_path, monkeypatch):
    write_dataset(tmp_path, [60])
    cfg = config(tmp_path, shuffle_buffer=8, batch_size=2)
    make = lambda: data.make_train_loader(cfg, rank=0, world_size=1, seed=0, in_channels=3,
                                          out_channels=3)
    first = make()
    for _ in range(25):
        next(first)
    state = first.state_dict()
    assert state["workers"][0]["offset"] > 0  # a block start deep inside the shard
    expected = next(first)["key"]
    decoded, reads = [], []
    real_decode, real_open = data.decode_image, data.storage.open_read
    monkeypatch.setattr(data, "decode_image", lambda *a: decoded.append(1) or real_decode(*a))
    monkeypatch.setattr(data.storage, "open_read", lambda url: reads.append(url) or real_open(url))
    resumed = make()
    resumed.load_state_dict(state)
    assert next(resumed)["key"] == expected
    assert len(decoded) == 4  # 2 samples x 2 images: the 50 consumed ones were not decoded
    assert len(reads) == 1


def test_all_bad_data_ends_instead_of_spinning(tmp_path):
    write_dataset(tmp_path, [4, 4])
    for shard in tmp_path.glob("*.tar"):
        shard.write_bytes(b"not a tar" * 100)
    for mode in ("exact", "resampled"):
        loader = data.make_train_loader(config(tmp_path, mode=mode), rank=0, world_size=1,
                                        seed=0, in_channels=3, out_channels=3)
        with pytest.raises(RuntimeError, match="no usable batch"):
            next(loader)
        assert loader.skipped["truncated_shard"] >= 2


@pytest.mark.parametrize("workers", [0, 1])
def test_loaders_leave_the_global_torch_rng_alone(tmp_path, workers):
    write_dataset(tmp_path, [4, 4], split="train")
    write_dataset(tmp_path, [2], split="val")
    cfg = config(tmp_path, num_workers=workers)
    before = torch.get_rng_state()
    loader = data.make_train_loader(cfg, rank=0, world_size=1, seed=0, in_channels=3,
                                    out_channels=3)
    for _ in range(loader.steps_per_epoch + 1):  # into the next epoch: a new DataLoader
        next(loader)
    list(data.make_eval_loader(cfg, rank=0, world_size=1, in_channels=3, out_channels=3))
    assert torch.equal(torch.get_rng_state(), before)  # the trainer's dropout RNG


def test_changed_world_size_restarts_the_epoch(tmp_path, caplog):
    write_dataset(tmp_path, [4, 4, 4, 4])
    cfg = config(tmp_path)
    two = data.make_train_loader(cfg, rank=0, world_size=2, seed=0, in_channels=3,
                                 out_channels=3, have_batch_all_ranks=bool)
    for _ in range(5):
        next(two)
    one = data.make_train_loader(cfg, rank=0, world_size=1, seed=0, in_channels=3, out_channels=3)
    one.load_state_dict(two.state_dict())
    assert "restarting epoch 1" in caplog.text
    assert (one.epoch, one.step_in_epoch, one.steps_per_epoch) == (1, 0, 8)


# ------------------------------------------------------------------- real ranks (gloo)

def _rank_main(rank, world, port, cases, out_dir):
    """One rank: read one epoch of every case, write what it saw to out_dir/rank.json."""
    import torch.distributed as dist
    code = 0
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world)

        def have_batch_all_ranks(flag: bool) -> bool:
            t = torch.tensor([int(flag)])
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            return bool(t.item())

        seen = {}
        for name, cfg in cases.items():
            loader = data.make_train_loader(cfg, rank=rank, world_size=world, seed=7,
                                            in_channels=3, out_channels=3,
                                            have_batch_all_ranks=have_batch_all_ranks)
            batches = epoch_batches(loader)
            seen[name] = {"keys": [b["key"] for b in batches], "skipped": loader.epoch_skipped,
                          "planned": loader.steps_per_epoch}
        (Path(out_dir) / f"{rank}.json").write_text(json.dumps(seen))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # gloo can SIGABRT at interpreter exit (pytorch issue 190489)


def run_ranks(world: int, cases: dict, out_dir: Path, timeout: float = 100) -> list[dict]:
    """Real processes, one per rank, a gloo group on loopback; fails on a hang."""
    context = multiprocessing.get_context("fork")
    port = free_port()
    procs = [context.Process(target=_rank_main, args=(r, world, port, cases, str(out_dir)))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, f"{len(hung)} ranks hung"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [json.loads((out_dir / f"{r}.json").read_text()) for r in range(world)]


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
    """8 shards; in rank 1's shards (epoch 0) a sample loses its target, another gets a
    corrupt image, and a third shard is truncated."""
    write_dataset(folder, [6] * 8)
    shards = data.list_shards(str(folder), "train")
    mine = data.split_by_node(data.epoch_shards(shards, 7, 0), 1, world)
    corrupt, truncated = Path(mine[0].url), Path(mine[1].url)
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
        data.storage.put(str(path), f"s3://{bucket}/ds/{path.name}")
    for workers in (0, 2):
        local = config(tmp_path / "local", num_workers=workers)
        remote = replace(local, train=f"s3://{bucket}/ds")
        runs = [epoch_batches(data.make_train_loader(c, rank=0, world_size=1, seed=1,
                                                     in_channels=3, out_channels=3))
                for c in (local, remote)]
        assert keys_of(runs[0]) == keys_of(runs[1]) and len(keys_of(runs[0])) == 20
        assert all(torch.equal(a["input"], b["input"]) for a, b in zip(*runs))
