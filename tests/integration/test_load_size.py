"""shard.py --load-size N stores pairs already resized by the trainer's own resize: a run
on such shards trains on exactly the pixels it would compute from the originals, and a
run whose data.load_size is another N is refused at start-up."""
import pytest

from data_tools.make_demo import main as make_demo
from data_tools.shard import main as shard
from pipeline.data.format import Manifest
from tests.helpers.trainer_runs import cpu_env, explain, run, single, step_log, train_args


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_pre_resized_shards_train_exactly_like_the_originals(tmp_path):
    assert make_demo([str(tmp_path / "raw"), "--train", "8", "--val", "2", "--size", "96",
                      "--format", "png"]) == 0
    for name, extra in (("originals", []), ("resized", ["--load-size", "136"])):
        assert shard([str(tmp_path / "raw"), str(tmp_path / name), "--quiet", "--workers", "1",
                      *extra]) == 0
    assert Manifest.read(str(tmp_path / "resized")).options["load_size"] == 136
    assert "load_size" not in Manifest.read(str(tmp_path / "originals")).options
    losses = {}
    for name in ("originals", "resized"):
        args = train_args(tmp_path / f"run_{name}", tmp_path / name, "--train.max_steps=3",
                          "--data.load_size=136", "--data.num_workers=1", "--log.tracker=none")
        result = run(single(args), cpu_env())
        assert result.returncode == 0, explain(result)
        losses[name] = [{k: v for k, v in r.items() if k.startswith("train/loss")}
                        for r in step_log(tmp_path / f"run_{name}")]
    assert losses["resized"] == losses["originals"] and len(losses["originals"]) == 3
    wrong = run(single(train_args(tmp_path / "run_wrong", tmp_path / "resized", "--data.load_size=143")),
                cpu_env())
    assert wrong.returncode == 2
    assert "already resized to 136 x 136 (shard.py --load-size 136)" in wrong.stderr
    assert "--data.load_size=136" in wrong.stderr and not (tmp_path / "run_wrong").exists()
