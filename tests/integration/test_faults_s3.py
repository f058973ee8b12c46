"""S3 that fails: a flaky network (tests/helpers/fault_proxy.py in front of a real S3 server on
loopback), an unreachable endpoint, a missing bucket, wrong or read-only credentials.
Sharding and training ride out transient faults and lose nothing; a shard that stays
unreadable is skipped and counted; what cannot work fails at start-up in one line; the
secret key appears in no output, no file and no stored object."""
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from data_tools.shard import main as shard
from pipeline import storage
from pipeline.distributed import free_port
from tests.helpers.trainer_runs import (
    accelerate,
    cpu_env,
    explain,
    gloo_env,
    run,
    single,
    step_log,
    train_args,
)

WRONG_SECRET = "wrong-secret-" + "k" * 27


def _point_at(endpoint_url: str, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint_url)
    storage.clear_cache()


def _raw(demo_shards) -> str:
    """The pairs demo_shards were packed from (with shard.py's default options)."""
    return str(Path(demo_shards).parent / "raw")


def _keys(url: str) -> list[str]:
    with storage.open_read(url) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        return [m.name.partition(".")[0] for m in tar if m.name.endswith(".json")]


def _assert_secret_nowhere(secret: str, outputs=(), folders=(), prefixes=()) -> int:
    """Not in any printed text, any file below `folders`, any object below `prefixes`;
    returns how many files and objects were searched."""
    assert not [text for text in outputs if secret in text]
    files = [p for folder in folders for p in Path(folder).rglob("*") if p.is_file()]
    assert not [p for p in files if secret.encode() in p.read_bytes()]
    objects = [url for prefix in prefixes for url in storage.list_files(prefix)]
    assert not [url for url in objects if secret.encode() in storage.read_bytes(url)]
    return len(files) + len(objects)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sharding_through_a_flaky_network_loses_and_repeats_nothing(
        demo_shards, seaweed_s3, fault_proxy, monkeypatch, capsys):
    seaweed_s3.use(monkeypatch)
    dest = f"s3://{seaweed_s3.make_bucket()}/shards"
    proxy = fault_proxy(seaweed_s3, rate=0.2, seed=3, stall_s=0.3)
    _point_at(proxy.endpoint_url, monkeypatch)
    assert shard([_raw(demo_shards), dest, "--quiet", "--workers", "1"]) == 0
    assert {"reset", "stall", "500", "503"} <= set(proxy.counts), proxy.counts
    _point_at(seaweed_s3.endpoint_url, monkeypatch)  # read back past the proxy
    local = sorted(p for p in Path(demo_shards).iterdir() if p.is_file())
    for path in local:  # shards, manifest, rejected list: byte for byte
        assert storage.read_bytes(storage.join(dest, path.name)) == path.read_bytes(), path.name
    pairs = [(path.name.split("-")[0], key) for path in local if path.suffix == ".tar"
             for key in _keys(storage.join(dest, path.name))]
    assert len(pairs) == len(set(pairs)) == 30  # 24 train + 6 val pairs, each once
    searched = _assert_secret_nowhere(seaweed_s3.secret_key, capsys.readouterr(), prefixes=[dest])
    assert searched == sum(1 for p in Path(demo_shards).rglob("*") if p.is_file())  # _parts/ too
    print(f"sharding: {dict(proxy.counts)}")


def _train(run_dir, data_url, *extra, steps=2, env=None, launch=single, timeout=120):
    return run(launch(train_args(run_dir, data_url, f"--train.max_steps={steps}", *extra)),
               env or cpu_env(), timeout=timeout)


def _one_error_line(result, program: str) -> str:
    """The single line a failed start-up prints: `PROGRAM: error: ...`, exit code 2 (a
    user error, for train.py and shard.py alike)."""
    assert result.returncode == 2, explain(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"{program}: error: "), explain(result)
    return lines[-1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["nothing listening", "missing bucket"])
def test_unreachable_data_fails_training_at_start_up_in_one_line(
        case, seaweed_s3, monkeypatch, tmp_path):
    seaweed_s3.use(monkeypatch)
    if case == "nothing listening":
        _point_at(f"http://127.0.0.1:{free_port()}", monkeypatch)
        data_url, expected = f"s3://{seaweed_s3.make_bucket()}/shards", "cannot reach"
    else:
        data_url, expected = f"s3://missing-{uuid.uuid4().hex[:12]}/shards", "bucket does not exist"
    start = time.monotonic()
    result = _train(tmp_path / "run", data_url)
    seconds = time.monotonic() - start
    assert expected in _one_error_line(result, "train.py") and seconds < 30, seconds
    print(f"{case}: exit 2 after {seconds:.1f} s")


def _upload(folder, url: str) -> None:
    for path in sorted(Path(folder).glob("*.*")):  # shards and manifest, not _parts/
        storage.put(str(path), storage.join(url, path.name))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_training_through_a_flaky_network_skips_and_counts_only_a_dead_shard(
        demo_shards, seaweed_s3, fault_proxy, monkeypatch, tmp_path):
    seaweed_s3.use(monkeypatch)
    bucket = seaweed_s3.make_bucket()
    data_url, mirror = f"s3://{bucket}/shards", f"s3://{bucket}/mirror"
    _upload(demo_shards, data_url)
    # train-000005 is rank 1's in epochs 0 and 1: its skips must reach rank 0's log
    proxy = fault_proxy(seaweed_s3, rate=0.1, seed=5, stall_s=0.3, always_fail="train-000005")
    run_dir = tmp_path / "run"
    env = gloo_env(AWS_ENDPOINT_URL=proxy.endpoint_url)
    result = _train(run_dir, data_url, f"--train.mirror={mirror}", "--data.num_workers=1",
                    steps=8, launch=accelerate, env=env, timeout=200)
    assert result.returncode == 0, explain(result)
    log = step_log(run_dir)
    assert [r["step"] for r in log] == list(range(1, 9))
    assert "replicas agree" in result.stdout  # both ranks took the same steps
    assert log[-1].get("data/skipped_unreadable_shard", 0) >= 1, log[-1]
    assert "train-000005.tar unreadable" in result.stderr
    assert proxy.counts["always_fail"] > 0 and proxy.faults > proxy.counts["always_fail"]
    _point_at(seaweed_s3.endpoint_url, monkeypatch)
    assert storage.read_bytes(storage.join(mirror, "latest")) == b"step_00000008"
    searched = _assert_secret_nowhere(seaweed_s3.secret_key, [result.stdout, result.stderr],
                                      folders=[run_dir], prefixes=[f"s3://{bucket}"])
    assert searched > 30 and list(run_dir.rglob("events.out.tfevents.*"))
    assert (run_dir / "config.yaml").exists()
    print(f"training: {dict(proxy.counts)}; skipped {log[-1]['data/skipped_unreadable_shard']}")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_mirror_that_breaks_mid_run_costs_copies_not_the_run(
        demo_shards, moto_s3, fault_proxy, monkeypatch, tmp_path):
    moto_s3.use(monkeypatch)
    mirror = f"s3://{moto_s3.make_bucket()}/mirror"
    # the start-up write probe passes; every checkpoint upload fails
    proxy = fault_proxy(moto_s3, always_fail="/mirror/step_")
    run_dir = tmp_path / "run"
    result = _train(run_dir, demo_shards, f"--train.mirror={mirror}", "--train.ckpt_every=2",
                    steps=4, env=cpu_env(AWS_ENDPOINT_URL=proxy.endpoint_url))
    assert result.returncode == 0, explain(result)
    assert result.stdout.count(f"mirror to {mirror} failed") == 2  # steps 2 and 4
    assert "the local checkpoint is intact" in result.stdout
    assert [r["step"] for r in step_log(run_dir)] == [1, 2, 3, 4]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"
    _point_at(moto_s3.endpoint_url, monkeypatch)
    assert not storage.exists(storage.join(mirror, "latest"))  # never names a partial copy


def _refusing_s3(problem: str, request, monkeypatch) -> tuple[dict, str, str]:
    """(env, url, secret key) for a start-up that S3 refuses because of `problem`."""
    if problem == "missing bucket":  # on moto: SeaweedFS creates a missing bucket on write
        server = request.getfixturevalue("moto_s3")
        secret = f"p2p-moto-secret-{uuid.uuid4().hex}"  # moto takes any key: a findable one
        bucket = f"missing-{uuid.uuid4().hex[:12]}"
    else:
        seaweed = request.getfixturevalue("seaweed_s3")
        server = seaweed.read_only if problem == "read-only keys" else seaweed
        secret = WRONG_SECRET if problem == "wrong secret" else server.secret_key
        bucket = seaweed.make_bucket()
    server.use(monkeypatch)
    return cpu_env(AWS_SECRET_ACCESS_KEY=secret), f"s3://{bucket}/out", secret


@pytest.mark.timeout(90)
@pytest.mark.parametrize("command, problem, expected", [
    ("shard.py", "wrong secret", "access denied"),
    ("shard.py", "read-only keys", "access denied"),
    ("shard.py", "missing bucket", "bucket does not exist"),
    ("train.py data", "wrong secret", "access denied"),
    ("train.py mirror", "wrong secret", "access denied"),
    ("train.py mirror", "read-only keys", "access denied"),
    ("train.py mirror", "missing bucket", "bucket does not exist"),
])
def test_s3_refusals_fail_at_start_up_in_one_line_without_the_secret(
        command, problem, expected, demo_shards, request, monkeypatch, tmp_path):
    env, url, secret = _refusing_s3(problem, request, monkeypatch)
    out = tmp_path / "out"
    if command == "shard.py":
        result = run([sys.executable, "data_tools/shard.py", _raw(demo_shards), url, "--quiet"],
                     env, timeout=60)
    elif command == "train.py data":
        result = _train(out, url, env=env)
    else:
        result = _train(out, demo_shards, f"--train.mirror={url}", env=env)
    line = _one_error_line(result, command.split()[0])
    assert expected in line and url in line, line
    _assert_secret_nowhere(secret, [result.stdout, result.stderr], folders=[out])
