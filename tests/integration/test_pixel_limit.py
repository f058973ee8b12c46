"""shard.py and the trainer share one pixel limit (pipeline.data.format.MAX_IMAGE_PIXELS):
an image shard.py packs with its defaults is never skipped as too_large by a training run
with the defaults (they used to be 89,478,485 and 64,000,000)."""
import numpy as np
import pytest
from PIL import Image

from data_tools.shard import main as shard
from pipeline.data.format import MAX_IMAGE_PIXELS, Manifest
from tests.helpers.trainer_runs import cpu_env, explain, run, single, step_log


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_image_just_under_the_shard_limit_is_trained_on(tmp_path):
    height = 6688
    width = 2 * (MAX_IMAGE_PIXELS // height // 2)  # an A|B pair, just under the limit
    assert MAX_IMAGE_PIXELS - height * 2 < width * height <= MAX_IMAGE_PIXELS
    raw = tmp_path / "raw" / "train"
    raw.mkdir(parents=True)
    gradient = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None].repeat(3, 2)
    Image.fromarray(np.broadcast_to(gradient, (height, width, 3))).save(raw / "big.jpg", quality=80)
    Image.fromarray(np.full((64, 128, 3), 90, np.uint8)).save(raw / "small.jpg")
    assert shard([str(tmp_path / "raw"), str(tmp_path / "shards"), "--quiet", "--workers", "1"]) == 0
    manifest = Manifest.read(str(tmp_path / "shards"))
    assert manifest.split("train").samples == 2 and manifest.rejected == {}
    # defaults for the data, a tiny model; 2 steps of batch 1 = the whole epoch, both pairs
    args = [f"--train.run_dir={tmp_path / 'run'}", f"--data.train={tmp_path / 'shards'}",
            "--model.generator=unet_128", "--model.g_filters=8", "--model.d_filters=8",
            "--data.crop_size=128", "--data.load_size=143", "--train.max_steps=2",
            "--log.every=1", "--log.progress=false", "--log.tracker=none"]
    result = run(single(args), cpu_env(), timeout=280)
    assert result.returncode == 0, explain(result)
    records = step_log(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2]
    assert not any(key.startswith("data/skipped") for r in records for key in r), records
