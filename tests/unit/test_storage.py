"""pipeline.storage on local disk and on real S3 servers (moto, SeaweedFS) on loopback."""
import os
import socket

import pytest

from pipeline import storage


@pytest.mark.parametrize("url", ["pipe:cat /etc/passwd", "http://example.com/x.tar",
                                 "gs://bucket/x"])
def test_refuses_other_schemes(url):
    for call in (storage.exists, storage.read_bytes, storage.open_read, storage.list_files):
        with pytest.raises(ValueError, match="only local paths"):
            call(url)


def _roundtrip(root):
    """The whole API on one root (a local folder or s3://bucket/prefix)."""
    storage.makedirs(storage.join(root, "sub"))
    storage.write_bytes(storage.join(root, "sub", "b.bin"), b"bee")
    storage.write_bytes(storage.join(root, "a.txt"), b"ay")
    with storage.atomic_write(storage.join(root, "c.bin")) as f:
        f.write(b"c" * 1000)
    assert storage.exists(storage.join(root, "a.txt"))
    assert not storage.exists(storage.join(root, "nope"))
    assert storage.read_bytes(storage.join(root, "sub/b.bin")) == b"bee"
    with storage.open_read(storage.join(root, "c.bin"), block_size=64) as f:
        assert f.read(10) == b"c" * 10 and len(f.read()) == 990
    assert storage.list_files(root) == [storage.join(root, n) for n in ("a.txt", "c.bin", "sub/b.bin")]
    assert storage.list_files(root, suffix=".bin") == [storage.join(root, "c.bin"),
                                                        storage.join(root, "sub/b.bin")]
    assert storage.list_sizes(root, recursive=False) == {storage.join(root, "a.txt"): 2,
                                                         storage.join(root, "c.bin"): 1000}
    assert storage.list_files(storage.join(root, "missing")) == []
    storage.remove(storage.join(root, "a.txt"))
    storage.remove(storage.join(root, "a.txt"))  # twice: missing is fine
    assert not storage.exists(storage.join(root, "a.txt"))


def test_local_api(tmp_path):
    _roundtrip(str(tmp_path / "root"))
    _roundtrip("file://" + str(tmp_path / "viafile"))
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(3 * 2**20))
    storage.put(str(local), str(tmp_path / "copy.bin"))
    assert (tmp_path / "copy.bin").read_bytes() == local.read_bytes()


def test_local_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "ckpt.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with storage.atomic_write(str(target)) as f:
            f.write(b"half a new checkp")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["ckpt.bin"]  # temp file removed


def test_s3_api_on_moto(moto_s3, monkeypatch, tmp_path):
    moto_s3.use(monkeypatch)
    bucket = moto_s3.make_bucket()
    _roundtrip(f"s3://{bucket}/prefix")
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
    _roundtrip(f"s3://{seaweed_s3.make_bucket()}/prefix")


def _one_clear_line(err, url, secret):
    message = str(err.value)
    assert "\n" not in message and url in message and secret not in message
    return message


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

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead_port}")
    url = f"s3://{bucket}/x.bin"
    with pytest.raises(storage.StorageError) as err:
        storage.read_bytes(url)
    assert "cannot reach" in _one_clear_line(err, url, seaweed_s3.secret_key)
