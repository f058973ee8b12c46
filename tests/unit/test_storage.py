"""pipeline.storage on local disk, and what it refuses; on real S3 servers:
tests/integration/test_storage_s3.py."""
import os

import pytest

from pipeline import storage
from tests.helpers.storage_roundtrip import roundtrip


@pytest.mark.parametrize("url", ["pipe:cat /etc/passwd", "http://example.com/x.tar",
                                 "gs://bucket/x"])
def test_refuses_other_schemes(url):
    for call in (storage.exists, storage.read_bytes, storage.open_read, storage.list_files):
        with pytest.raises(storage.RefusedURL, match="only local paths"):
            call(url)


def test_local_api(tmp_path):
    roundtrip(str(tmp_path / "root"))
    roundtrip("file://" + str(tmp_path / "viafile"))
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
