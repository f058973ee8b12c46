"""data_tools/shard.py as a process and against real S3 servers: round trips with moto
and SeaweedFS, bad credentials, resume after a real kill, one-line failures at start-up."""
import os
import re
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest

from data_tools import inspect_shards
from pipeline import storage
from tests.helpers.shard_trees import (
    SHARD_PY,
    assert_pairs_intact,
    make_aligned,
    manifest,
    run_shard,
    samples_by_tarfile,
    samples_by_webdataset,
    tree,
)

# ------------------------------------------------------------------------------- S3


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
            local = (tmp_path / "local" / s["name"]).read_bytes()
            assert storage.read_bytes(storage.join(dest, s["name"])) == local


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


# ----------------------------------------------------------------------------- resume

@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig,workers", [
    (signal.SIGKILL, 1), (signal.SIGINT, 1),
    pytest.param(signal.SIGTERM, 2, marks=pytest.mark.slow),  # 2 spawned packers: ~13 s here
])
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


@pytest.mark.timeout(120)
def test_pre_resizing_in_processes_writes_one_process_bytes_and_resumes(tmp_path):
    """--load-size: pairs packed by 2 processes pair by pair are the bytes one process
    packs, and a Ctrl-C mid-run stops them cleanly; the re-run completes the same tree."""
    make_aligned(tmp_path / "src", {None: 300}, size=(64, 32))
    args = [str(tmp_path / "src"), "--load-size", "24", "--encode", "jpeg", "--max-samples", "10",
            "--quiet"]
    assert run_shard(args[0], tmp_path / "ref", *args[1:], "--workers", "1") == 0
    reference = tree(tmp_path / "ref")
    dest = tmp_path / "out"
    process = subprocess.Popen(SHARD_PY + [args[0], str(dest), *args[1:], "--workers", "2"],
                               stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while not list((dest / "_parts").glob("*-*.json")):  # first finished shard
        assert process.poll() is None, "finished before it could be interrupted"
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr.decode()
    assert stderr.decode().strip() == ("shard.py: interrupted; finished shards are kept, "
                                       "run the same command again to resume")
    interrupted = tree(dest)
    tars = [n for n in interrupted if n.endswith(".tar")]
    assert 0 < len(tars) < 30 and not list(dest.glob(".*.tmp"))
    assert all(interrupted[name] == reference[name] for name in tars)
    parts = [n for n in interrupted if n.startswith("_parts/") and "-" in n]
    rerun = subprocess.run(SHARD_PY + [args[0], str(dest), *args[1:], "--workers", "2"],
                           check=True, timeout=60, capture_output=True, text=True)
    assert "with 2 processes" in rerun.stderr and f"; {len(parts)} already done" in rerun.stderr
    assert tree(dest) == reference


# -------------------------------------------------------------------------- bad input

@pytest.mark.timeout(60)
def test_a_write_limit_mid_run_is_one_line_with_two_processes(tmp_path):
    """A real EFBIG (RLIMIT_FSIZE: what a full disk is to a writer) in the spawned packing
    processes: exit 1, one line saying what was kept, no temporary file left; the same
    command without the limit packs only the rest, the bytes of a run never stopped."""
    make_aligned(tmp_path / "src", {None: 16})
    make_aligned(tmp_path / "src", {"big": 2}, size=(512, 256))  # noise JPEGs above the limit
    for path in (tmp_path / "src" / "big").iterdir():
        path.rename(tmp_path / "src" / f"big{path.name}")
    args = [str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "2", "--quiet"]
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    result = subprocess.run(SHARD_PY + args, capture_output=True, text=True, timeout=60,
                            preexec_fn=limit)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("shard.py: error: writing to ") and "File too large" in result.stderr
    assert re.search(r"kept \d of 8 shards finished before it", result.stderr), result.stderr
    assert not list((tmp_path / "out").rglob("*.tmp")) and not (tmp_path / "out" / "manifest.json").exists()
    assert run_shard(*args[:1], tmp_path / "ref", "--workers", "1") == 0
    assert run_shard(*args) == 0
    assert tree(tmp_path / "out") == tree(tmp_path / "ref")


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
