"""pipeline/data/ in-process: listing, decoding, augmentation, the eval stream, resume
and skips (loader workers included); real ranks, shard.py output and S3 are in
tests/integration/test_data_streams.py."""
import io
import json
import multiprocessing
import struct
import tarfile
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import data, storage
from pipeline.config import DataConfig
from pipeline.data import decode as data_decode
from pipeline.errors import DataError
from tests.helpers.images import (
    SIZE,
    config,
    image_bytes,
    keys_of,
    next_batch,
    sample_pixels,
    write_dataset,
)

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
        with pytest.raises(DataError, match="data.train: unsupported storage URL"):
            data.list_shards(refused, "train")


def test_damaged_tars_are_counted_not_silently_short(tmp_path):
    write_dataset(tmp_path, [3])
    shard = tmp_path / "train-000000.tar"
    whole = shard.read_bytes()
    offsets = [m.offset for m in tarfile.open(shard)]  # 9 members: 3 per sample
    # (key, None) for a sample, (None, reason) for a skip
    read = lambda: [(e.key, None) if isinstance(e, data.Entry) else (None, e.reason)
                    for e in data.read_entries([shard])]
    assert read() == [("s00n000", None), ("s00n001", None), ("s00n002", None)]
    cases = {"at a header boundary": whole[:offsets[6]],
             "inside member data": whole[:offsets[6] + 700],
             "garbage header": whole[:offsets[3]] + b"x" * 512 + whole[offsets[3] + 512:]}
    for case, damaged in cases.items():
        shard.write_bytes(damaged)
        entries = read()
        assert entries[-1] == (None, "truncated_shard"), case
        assert all(key is not None for key, _ in entries[:-1]), case


def test_streams_cut_the_epoch_into_equal_ranges_read_alike_by_any_layout():
    counts, order, streams = [7, 3, 9, 5], [2, 0, 3, 1], 8
    segments = data.stream_segments(counts, order, streams)
    covered = [(g.shard, i) for stream in segments for g in stream for i in range(g.first, g.end)]
    assert covered == [(shard, i) for shard in order for i in range(counts[shard])]  # contiguous, once
    total = sum(counts)
    assert [sum(g.end - g.first for g in stream) for stream in segments] == \
        [len(range(s, total, streams)) for s in range(streams)]  # exactly the j = s mod V
    assert data.epoch_shards(list(range(9)), 1, 0) != data.epoch_shards(list(range(9)), 1, 1)
    cfg = DataConfig(batch_size=2)
    for world, workers in [(1, 1), (2, 2), (4, 2), (8, 1), (1, 8)]:
        plans = [data.StreamLayout(cfg, (), 0, rank, world, workers, streams, 3, 3) for rank in range(world)]
        assert sorted(s for p in plans for w in range(workers) for s in p.streams_of(w)) == \
            list(range(streams))
        for start in (0, 2, 5, 13):  # any start: a resume on another world size starts anywhere
            parts = [list(p.rank_samples(start)) for p in plans]
            assert sorted(sum(parts, [])) == list(range(start, start + 2 * world))
            assert all(len(part) == 2 for part in parts)  # full batches on every rank


def test_streams_must_split_evenly_over_processes_and_workers(tmp_path):
    write_dataset(tmp_path, [4, 4, 4])
    make = lambda **kw: data.make_train_loader(config(tmp_path, **kw), rank=0, world_size=2, seed=0,
                                               in_channels=3, out_channels=3, have_batch_all_ranks=bool)
    with pytest.raises(DataError, match="6 streams, not a multiple of 2 processes x 2 workers = 4"):
        make(num_workers=2, streams=6)
    assert make(num_workers=2).streams == 4  # a small dataset: one stream per reader
    assert make(num_workers=2, streams=8).streams == 8  # more streams than shards: ranges


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
    batch = next_batch(data.make_train_loader(worker, rank=0, world_size=1, seed=3,
                                              in_channels=3, out_channels=3))
    raw = next_batch(data.make_train_loader(device, rank=0, world_size=1, seed=3,
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
    pixels = sample_pixels(batch["key"][0])
    top, left, flip = data.Geometry.of(worker).params(3, 0, batch["key"][0], pixels.shape[:2])
    manual = data.resize_u8(data.chw(pixels), 24)[0, :, top:top + 16,
                                                                          left:left + 16]
    manual = manual.flip(-1) if flip else manual
    assert torch.equal(data.to_unit_range(manual), batch["input"][0])


def test_device_resize_matches_the_cpu_kernel():
    images = torch.from_numpy(np.stack([sample_pixels("r1", 40), sample_pixels("r2", 40)]))
    images = images.permute(0, 3, 1, 2)
    for size in (28, 57, (20, 60)):  # down (antialiased), up, and non-square (h, w)
        cpu, via_float = data.resize_u8(images, size), data.resize_u8_via_float(images, size)
        assert (cpu.int() - via_float.int()).abs().max() <= 1


# ----------------------------------------------------------------------- eval / resume

def test_eval_loader_every_sample_once_across_ranks(tmp_path):
    keys = write_dataset(tmp_path, [5, 4], split="val")
    cfg = config(tmp_path, crop_size=8, num_workers=2)
    seen = []
    for rank in range(2):
        loader = data.make_eval_loader(cfg, rank=rank, world_size=2, in_channels=3,
                                       out_channels=1, batch_size=3, persistent=rank == 1)
        others = {p.pid for p in multiprocessing.active_children()}
        batches = list(loader)
        workers = {p.pid for p in multiprocessing.active_children()} - others
        assert keys_of(batches) == keys_of(list(loader))  # deterministic, re-iterable
        if rank == 1:  # the trainer's: one set of workers for every evaluation
            assert len(workers) == 2 and workers <= {p.pid for p in multiprocessing.active_children()}
        assert batches[0]["input"].shape[1:] == (3, 8, 8)
        assert batches[0]["target"].shape[1:] == (1, 8, 8)
        seen += keys_of(batches)
    assert sorted(seen) == sorted(keys)


def test_capped_eval_takes_the_same_seeded_subset_on_any_world_size(tmp_path):
    """eval.max_images: the same images on 1 or 3 processes (x 2 workers), each once; another
    seed draws another subset; a cap at or over the split's size is the whole split."""
    keys = write_dataset(tmp_path, [5, 4, 6], split="val")
    cfg = config(tmp_path, crop_size=8, num_workers=2)

    def evaluated(world, cap, seed=0):
        seen = []
        for rank in range(world):
            loader = data.make_eval_loader(cfg, rank=rank, world_size=world, in_channels=3,
                                           out_channels=1, batch_size=2, max_images=cap, seed=seed)
            mine = keys_of(list(loader))
            assert len(mine) == loader.rank_images  # what the progress line counts down
            seen += mine
        assert len(seen) == len(set(seen)) == loader.images
        return sorted(seen)

    subset = evaluated(1, 7)
    assert len(subset) == 7 and set(subset) < set(keys)
    assert evaluated(3, 7) == subset
    assert evaluated(1, 7, seed=1) != subset
    assert evaluated(2, 15) == evaluated(2, 0) == sorted(keys)


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
    reference = [next_batch(straight) for _ in range(total)]  # crosses into epoch 1
    assert straight.epoch == 1
    for k in stops:
        first = make()
        consumed = [next_batch(first) for _ in range(k)]
        state = json.loads(json.dumps(first.state_dict()))
        resumed = make()
        resumed.load_state_dict(state)
        batches = consumed + [next_batch(resumed) for _ in range(total - k)]
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
    assert state["positions"]["0"]["offset"] > 0  # a block start deep inside the shard
    expected = next_batch(first)["key"]
    decoded, reads = [], []
    real_decode, real_open = data_decode.decode_image, storage.open_read
    monkeypatch.setattr(data_decode, "decode_image", lambda *a: decoded.append(1) or real_decode(*a))
    monkeypatch.setattr(storage, "open_read", lambda url: reads.append(url) or real_open(url))
    resumed = make()
    resumed.load_state_dict(state)
    assert next_batch(resumed)["key"] == expected
    assert len(decoded) == 4  # 2 samples x 2 images: the 50 consumed ones were not decoded
    assert len(reads) == 1


def test_all_bad_data_ends_instead_of_spinning(tmp_path):
    write_dataset(tmp_path, [4, 4])
    for shard in tmp_path.glob("*.tar"):
        shard.write_bytes(b"not a tar" * 100)
    for mode in ("exact", "resampled"):
        loader = data.make_train_loader(config(tmp_path, mode=mode), rank=0, world_size=1,
                                        seed=0, in_channels=3, out_channels=3)
        with pytest.raises(DataError, match="no usable global batch"):
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
    for _ in range(loader.steps_per_epoch + 1):  # into the next epoch
        next(loader)
    list(data.make_eval_loader(cfg, rank=0, world_size=1, in_channels=3, out_channels=3))
    assert torch.equal(torch.get_rng_state(), before)  # the trainer's dropout RNG


def test_an_update_is_grad_accum_batches_of_the_one_sample_order(tmp_path):
    """With train.grad_accum 3 the loader hands out updates of 3 batches: the batches a
    loader with 1 hands out one at a time, the epoch ending on a whole update (30 of 32
    samples here), the next epoch starting from its own beginning."""
    write_dataset(tmp_path, [8, 8, 8, 8])
    cfg = config(tmp_path, batch_size=2, num_workers=2, streams=4)
    make = lambda k: data.make_train_loader(cfg, rank=0, world_size=1, seed=0, in_channels=3,
                                            out_channels=3, accumulate=k)
    single, loader = make(1), make(3)
    assert (single.steps_per_epoch, loader.steps_per_epoch) == (16, 5)
    singles = [next_batch(single) for _ in range(19)]  # epoch 0, then epoch 1's first 3
    updates = [next(loader) for _ in range(6)]
    assert [u.epoch for u in updates] == [0] * 5 + [1] and {len(u.batches) for u in updates} == {3}
    batches = [b for u in updates for b in u.batches]
    assert [b["key"] for b in batches] == [b["key"] for b in singles[:15] + singles[16:]]
    assert all(torch.equal(a["input"], b["input"]) for a, b in zip(batches, singles[:15] + singles[16:]))


def test_one_set_of_loader_workers_serves_the_whole_run(tmp_path):
    """The workers are forked once: the same two processes read every epoch and the
    tail of each (a stream with bad samples runs dry early), handing out exactly what a
    loader without workers does."""
    write_dataset(tmp_path, [8, 8, 8, 8], corrupt=("s01n000", "s01n001", "s01n002"))
    cfg = config(tmp_path, batch_size=2, streams=4, shuffle_buffer=3)
    make = lambda workers: data.make_train_loader(replace(cfg, num_workers=workers), rank=0,
                                                  world_size=1, seed=0, in_channels=3, out_channels=3)
    reference, loader = make(0), make(2)
    others = {p.pid for p in multiprocessing.active_children()}
    pids, tails, epochs = set(), 0, set()
    for _ in range(40):
        want, got = next(reference), next(loader)
        assert [b["key"] for b in got.batches] == [b["key"] for b in want.batches]
        assert torch.equal(got.batches[0]["input"], want.batches[0]["input"])
        pids |= {p.pid for p in multiprocessing.active_children()} - others
        tails, epochs = tails + loader.in_tail, epochs | {got.epoch}
    assert len(pids) == 2 and tails > 0 and epochs == {0, 1, 2}


# the state a checkpoint of the code before the stream package held (rank_00000.json's
# "data"), less "data" and "tail", which checkpoints older still lack
SAVED = {"version": 2, "epoch": 0, "consumed": 9, "streams": 4, "positions": {
    "0": {"segment": 0, "offset": 0, "index": 0, "taken": 3, "good": 3, "skipped": {}, "mismatched": []},
    **{str(s): {"segment": 0, "offset": 3072, "index": 1, "taken": 2, "good": 2, "skipped": {},
                "mismatched": []} for s in (1, 2, 3)}},
    "skipped_before": {}, "seed": 5, "mode": "exact", "shuffle_buffer": 4, "rank": 0,
    "world_size": 1, "num_workers": 1, "batch_size": 3}


@pytest.mark.parametrize("workers", [0, 2])
def test_an_old_checkpoints_stream_position_still_resumes(tmp_path, workers):
    write_dataset(tmp_path, [7, 6, 5, 6])
    cfg = config(tmp_path, batch_size=3, streams=4, num_workers=workers)
    make = lambda: data.make_train_loader(cfg, rank=0, world_size=1, seed=5, in_channels=3,
                                          out_channels=3)
    loader = make()
    loader.load_state_dict([SAVED])
    assert [next_batch(loader)["key"] for _ in range(2)] == [["s01n002", "s03n003", "s00n002"],
                                                             ["s02n001", "s01n001", "s03n002"]]
    state = loader.state_dict()  # the same JSON shape, "tail" and "data" recorded again
    assert set(state) == set(SAVED) | {"tail", "data"} and state["consumed"] == 15
    assert set(state["positions"]["0"]) == set(SAVED["positions"]["0"])
    old = make()
    old.load_state_dict({"version": 1, "epoch": 3})  # before the streams: the epoch restarts
    assert (old.epoch, old.consumed) == (3, 0)


def test_the_tail_walks_on_over_the_streams_that_still_have_samples():
    status = {0: data.TailStatus(good=2, ahead=3, ended=True), 1: data.TailStatus(2, 0, ended=True),
              2: data.TailStatus(good=1, ahead=4, ended=False)}
    first = [(2, 1), (0, 2), (2, 2), (0, 3), (2, 3)]  # stream 2 finishes round 1 first; 1 is dry
    assert data.tail_walk(status, 5) == (first, True)
    # stream 2 may hold a 6th good sample: unknown until it reads further
    assert data.tail_walk(status, 8) == (first + [(0, 4), (2, 4)], False)
    status[2] = data.TailStatus(good=1, ahead=4, ended=True)
    assert data.tail_walk(status, 8) == (first + [(0, 4), (2, 4)], True)  # fewer: the tail is over


def lockstep(world: int):
    """The collectives of `world` loaders run in threads: {"have_batch_all_ranks": an
    all-reduce MIN, "gather_all_ranks": an all-gather} for each rank."""
    barrier, slots = threading.Barrier(world), [None] * world
    def exchange(rank, value) -> list:
        slots[rank] = value
        barrier.wait()
        everyone = list(slots)
        barrier.wait()
        return everyone
    return lambda rank: {"have_batch_all_ranks": lambda have: all(exchange(rank, have)),
                         "gather_all_ranks": lambda obj: exchange(rank, obj)}


def run_together(loaders, steps: int, record) -> list[list]:
    """Loaders (one per rank) run `steps` steps together, in threads: per rank, what
    `record(loader, batch)` says after each step."""
    out = [[] for _ in loaders]
    def run(rank):
        for _ in range(steps):
            out[rank].append(record(loaders[rank], next(loaders[rank])))
    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(loaders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def global_batches(loaders, steps: int) -> list[dict]:
    """`steps` global updates of loaders (one per rank) run together: {key: input}."""
    out = run_together(loaders, steps, lambda _, update: {k: x for batch in update.batches
                                                          for k, x in zip(batch["key"], batch["input"])})
    return [{k: v for rank in out for k, v in rank[i].items()} for i in range(steps)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bad", [False, True])
@pytest.mark.parametrize("first,then", [((2, 2), (1, 4)), ((1, 4), (2, 2)), ((4, 1), (2, 2))])
def test_resume_on_another_world_size_continues_the_global_order(tmp_path, bad, first, then):
    """(world, per-rank batch) -> another with the same global batch: the global batches
    are the uninterrupted run's, each sample at most once an epoch, bad samples included."""
    # one corrupt sample: its stream refills it with its next, then runs dry one sample early
    keys = write_dataset(tmp_path, [7, 6, 5, 6], corrupt=("s02n002",) if bad else ())
    cfg = lambda batch: config(tmp_path, batch_size=batch, streams=4, shuffle_buffer=3)
    straight = global_batches(worlds(cfg, 1, 4), 8)  # into epoch 1
    epoch0 = [k for b in straight[:6 - bad] for k in b]
    assert len(epoch0) == len(set(epoch0)) == 24 - 4 * bad  # once; the 3 left are less than a batch
    assert set(epoch0) <= set(keys)
    for stop in (1, 3):
        assert_same_batches(resumed_batches(cfg, first, then, stop, 8), straight)


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert [sorted(b) for b in got] == [sorted(b) for b in want]
    assert all(torch.equal(b[k], s[k]) for b, s in zip(got, want) for k in s)


def worlds(cfg, world, batch, accumulate=1):
    """`world` loaders, one per rank, with a per-rank batch, `accumulate` batches an update."""
    ranks = lockstep(world)
    return [data.make_train_loader(cfg(batch), rank=r, world_size=world, seed=3, in_channels=3,
                                   out_channels=3, accumulate=accumulate, **ranks(r)) for r in range(world)]


def resumed_batches(cfg, first, then, stop: int, steps: int) -> list[dict]:
    """`stop` global batches (updates) on layout `first`, the rest of `steps` on `then`
    from its state; a layout is (world, batch[, accumulate])."""
    before = worlds(cfg, *first)
    done = global_batches(before, stop)
    after = worlds(cfg, *then)
    for loader in after:
        loader.load_state_dict([b.state_dict() for b in before])
    return done + global_batches(after, steps - stop)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("first,then,workers", [((1, 4), (2, 2), 0), ((2, 2), (4, 1), 0),
                                                ((4, 1), (1, 4), 0), ((2, 2), (1, 2, 2), 0),
                                                ((2, 2), (1, 4), 2)])
def test_an_epoch_with_a_short_stream_hands_out_all_but_less_than_a_global_batch(tmp_path, first, then,
                                                                                  workers):
    """A stream with 5 of its 8 samples bad runs dry after 3 rounds of 4 streams; the 15
    good samples the others still have make 3 more global batches (the tail, gathered
    across ranks) and 3 are left out: fewer than one global batch of 4. Resumed on
    another world size before and inside the tail: the same global batches."""
    keys = write_dataset(tmp_path, [8, 8, 8, 8], corrupt=tuple(f"s01n00{i}" for i in range(5)))
    cfg = lambda batch: config(tmp_path, batch_size=batch, streams=4, shuffle_buffer=3, num_workers=workers)
    straight = global_batches(worlds(cfg, 1, 4), 8)  # into epoch 1
    epoch0 = [k for b in straight[:6] for k in b]
    assert len(epoch0) == len(set(epoch0)) == 24 and set(epoch0) <= set(keys[:8] + keys[13:])
    assert [sorted(b) for b in global_batches(worlds(cfg, *first), 8)] == [sorted(b) for b in straight]
    for stop in (2, 4):  # before the tail and one step into it
        assert_same_batches(resumed_batches(cfg, first, then, stop, 8), straight)


@pytest.mark.timeout(120)
def test_skip_counts_in_the_tail_do_not_depend_on_the_layout(tmp_path):
    """The bad samples past a stream's last good one count when that sample is handed
    out, on every layout: not when one rank's read-ahead happened to reach them."""
    write_dataset(tmp_path, [11, 4, 6], corrupt=("s00n010", *(f"s02n00{i}" for i in range(1, 6))))
    cfg = lambda batch: config(tmp_path, batch_size=batch, streams=4, shuffle_buffer=5)
    def skipped_each_step(loaders) -> list[int]:
        counts = run_together(loaders, 6, lambda loader, _: sum(loader.skipped.values()))
        return [sum(step) for step in zip(*counts)]
    one = skipped_each_step(worlds(cfg, 1, 4))
    assert one[3] - one[0] == 6  # epoch 0's bad samples all counted by its end
    for world, batch in ((4, 1), (2, 2)):
        assert skipped_each_step(worlds(cfg, world, batch)) == one, (world, batch)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_a_resume_with_another_update_size_runs_on_into_the_next_epoch(tmp_path, workers):
    """Resumed mid-epoch with twice the update (train.allow_batch_change, grad_accum 2): the
    epoch ends on its last whole update, and the next epoch is the one a run with the new
    update size has (the persistent workers must not hand out a part of the old epoch)."""
    write_dataset(tmp_path, [8, 8, 8, 8])
    cfg = lambda batch: config(tmp_path, batch_size=batch, streams=4, shuffle_buffer=3, num_workers=workers)
    resumed = resumed_batches(cfg, (1, 2), (1, 2, 2), stop=3, steps=3 + 6 + 8)
    epoch0 = [k for b in resumed[:9] for k in b]  # 3 updates of 2, then 6 of 4: 2 left out
    assert len(epoch0) == len(set(epoch0)) == 30
    straight = global_batches(worlds(cfg, 1, 2, 2), 16)  # epochs 0 and 1 at the new size
    assert_same_batches(resumed[9:], straight[8:])
