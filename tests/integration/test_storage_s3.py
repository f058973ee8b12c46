"""pipeline.storage on real S3 servers (moto, SeaweedFS) on loopback: the whole API,
atomic multipart writes, and one-line errors for bad credentials, a missing bucket and an
unreachable endpoint."""
import os

import pytest

from pipeline import storage
from pipeline.distributed import free_port
from tests.helpers.storage_roundtrip import roundtrip


def test_s3_api_on_moto(moto_s3, monkeypatch, tmp_path):
    moto_s3.use(monkeypatch)
    bucket = moto_s3.make_bucket()
    roundtrip(f"s3://{bucket}/prefix")
    local = tmp_path / "x.bin"
    local.write_bytes(b"x" * 5000)
    storage.put(str(local), f"s3://{bucket}/put/x.bin")
    assert storage.read_bytes(f"s3://{bucket}/put/x.bin") == local.read_bytes()


def test_s3_atomic_write_appears_only_when_complete(moto_s3, monkeypatch):
    moto_s3.use(monkeypatch)
    monkeypatch.setattr(storage, "WRITE_BLOCK_SIZE", 5 * 2**20)  # S3's smallest part
    bucket = moto_s3.make_bucket()
    url = f"s3://{bucket}/big.bin"
    chunk = os.urandom(2**20)
    with pytest.raises(RuntimeError):
        with storage.atomic_write(url) as f:
            for _ in range(12):  # two parts uploaded, then a crash
                f.write(chunk)
            assert not storage.exists(url)
            raise RuntimeError("crash mid-upload")
    assert not storage.exists(url)
    client = moto_s3.client()
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    with storage.atomic_write(url) as f:
        for _ in range(12):
            f.write(chunk)
        assert not storage.exists(url)  # multipart in flight: not visible yet
    assert len(storage.read_bytes(url)) == 12 * 2**20


def test_s3_api_on_seaweedfs(seaweed_s3, monkeypatch):
    seaweed_s3.use(monkeypatch)
    roundtrip(f"s3://{seaweed_s3.make_bucket()}/prefix")


def _one_clear_line(err, url, secret):
    message = str(err.value)
    assert "\n" not in message and url in message and secret not in message
    return message


@pytest.mark.slow
def test_s3_bad_credentials_missing_bucket_unreachable(seaweed_s3, monkeypatch):
    seaweed_s3.use(monkeypatch)
    bucket = seaweed_s3.make_bucket()
    storage.write_bytes(f"s3://{bucket}/x.bin", b"x")

    wrong_secret = "not-the-secret-" + "z" * 20
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    url = f"s3://{bucket}/x.bin"
    for call in (storage.read_bytes, storage.exists, storage.list_files):
        with pytest.raises(storage.StorageError) as err:
            call(url)
        assert "access denied" in _one_clear_line(err, url, wrong_secret)
    with pytest.raises(storage.StorageError) as err:
        storage.write_bytes(url, b"y")
    _one_clear_line(err, url, wrong_secret)

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed_s3.secret_key)
    url = "s3://no-such-bucket-p2p/x.bin"
    with pytest.raises(storage.StorageError) as err:
        storage.read_bytes(url)
    assert "bucket does not exist" in _one_clear_line(err, url, seaweed_s3.secret_key)
    with pytest.raises(FileNotFoundError):  # a missing key in a good bucket stays plain
        storage.read_bytes(f"s3://{bucket}/missing.bin")

    dead_port = free_port()  # a port nobody listens on
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead_port}")
    url = f"s3://{bucket}/x.bin"
    with pytest.raises(storage.StorageError) as err:
        storage.read_bytes(url)
    assert "cannot reach" in _one_clear_line(err, url, seaweed_s3.secret_key)
