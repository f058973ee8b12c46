"""checkpoint.mirror on a real S3 server (moto): a committed checkpoint, sub-folders
included (DeepSpeed's G/ and D/), then the `latest` marker."""
import pytest

from pipeline import checkpoint, storage


@pytest.mark.timeout(120)
def test_mirror_copies_sub_folders_then_the_marker(moto_s3, monkeypatch, tmp_path):
    moto_s3.use(monkeypatch)
    bucket = moto_s3.make_bucket()
    local = tmp_path / "step_00000008"
    files = {"trainer.json": b"{}", "generator.safetensors": b"weights",
             "G/engine/zero_pp_rank_0_mp_rank_00_optim_states.pt": b"G0",
             "D/engine/zero_pp_rank_1_mp_rank_00_optim_states.pt": b"D1"}
    for name, content in files.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(content)
    checkpoint.mirror(str(local), f"s3://{bucket}/run")
    listed = moto_s3.client().list_objects_v2(Bucket=bucket)["Contents"]
    expected = [f"run/step_00000008/{n}" for n in files] + ["run/latest"]
    assert sorted(o["Key"] for o in listed) == sorted(expected)
    for name, content in files.items():
        assert storage.read_bytes(f"s3://{bucket}/run/step_00000008/{name}") == content
    assert storage.read_bytes(f"s3://{bucket}/run/latest") == b"step_00000008"
