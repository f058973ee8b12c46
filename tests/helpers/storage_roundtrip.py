"""The whole pipeline.storage API exercised on one root, local or S3."""
from pipeline import storage


def roundtrip(root) -> None:
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
