"""FID, KID and LPIPS through the tools: the trainer's validation (eval.metrics) and its
`best` checkpoint marker, evaluate.py on 1 and 2 processes, and the trainer refusing a
metric it cannot measure offline; on substitute weights (tests/helpers/substitute_weights.py),
which show the plumbing only."""
import json
import subprocess
import sys

import pytest

from tests.helpers.trainer_runs import ROOT, accelerate, explain, gloo_env, run, single, train_args

REALISM = ("fid", "kid_mean", "kid_std", "lpips")
ALL = "--eval.metrics=l1,psnr,ssim,fid,kid,lpips"
QUIET = ("--log.tracker=none", "--data.num_workers=1")


def records(run_dir) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_validation_measures_realism_and_marks_the_best_checkpoint(demo_shards, substitute_weights, tmp_path):
    run_dir = tmp_path / "run"
    args = train_args(run_dir, demo_shards, "--train.max_steps=12", "--train.eval_every=3",
                      "--train.ckpt_every=1000", "--train.keep_last=1", ALL,
                      "--train.best_metric=l1", *QUIET)
    result = run(single(args), gloo_env(P2P_WEIGHTS_DIR=substitute_weights), timeout=500)
    assert result.returncode == 0, explain(result)
    measured = records(run_dir)
    assert sorted(measured) == [0, 3, 6, 9, 12]
    for record in measured.values():
        assert all(record[k] is not None for k in REALISM), record
        assert record["kid_subset_size"] == record["fid_images"] == record["images"] == 6
    best_step = min((s for s in measured if s), key=lambda s: measured[s]["l1"])
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "best").read_text().strip() == f"step_{best_step:08d}"
    # keep_last=1 keeps the newest, and the best beside it
    assert sorted(p.name for p in checkpoints.glob("step_*")) == sorted(
        {f"step_{best_step:08d}", "step_00000012"})
    report = tmp_path / "report"
    evaluate = [sys.executable, str(ROOT / "pipeline" / "evaluate.py"), "--checkpoint",
                str(checkpoints / "best"), "--data", demo_shards, "--out", str(report),
                "--metrics", "l1,lpips", "--weights-dir", substitute_weights, "--no-download"]
    result = run(evaluate, gloo_env())
    assert result.returncode == 0, explain(result)
    summary = json.loads((report / "metrics.json").read_text())
    assert summary["step"] == best_step
    for key in ("l1", "lpips"):
        assert summary[key] == pytest.approx(measured[best_step][key], rel=1e-6), key
    # a resumed run compares against the value metrics.jsonl holds for the best checkpoint
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    unbeatable = [json.dumps({**r, "l1": -1.0}) if r["step"] == best_step else json.dumps(r)
                  for r in map(json.loads, lines)]
    (run_dir / "metrics.jsonl").write_text("\n".join(unbeatable) + "\n")
    resumed = train_args(run_dir, demo_shards, "--train.max_steps=15", "--train.eval_every=3",
                         "--train.ckpt_every=1000", "--train.keep_last=1", "--train.best_metric=l1",
                         "--train.resume=auto", *QUIET)
    result = run(single(resumed), gloo_env(), timeout=300)
    assert result.returncode == 0, explain(result)
    assert (checkpoints / "best").read_text().strip() == f"step_{best_step:08d}"
    assert (checkpoints / f"step_{best_step:08d}").is_dir() and (checkpoints / "step_00000015").is_dir()
    exported = tmp_path / "export"
    result = run([sys.executable, str(ROOT / "pipeline" / "export.py"), "--checkpoint",
                  str(checkpoints / "best"), "--out", str(exported), "--format", "safetensors"], gloo_env())
    assert result.returncode == 0, explain(result)
    assert json.loads((exported / "generator.json").read_text())["step"] == best_step
    translated = tmp_path / "translated"
    result = run([sys.executable, str(ROOT / "pipeline" / "translate.py"), demo_shards, "--checkpoint",
                  str(checkpoints / "best"), "--out", str(translated), "--quiet"], gloo_env())
    assert result.returncode == 0, explain(result)
    assert len(list(translated.glob("*.png"))) == 6  # the val split, by the best generator


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_evaluate_py_gives_the_same_realism_on_1_and_2_processes(trained_run, substitute_weights, tmp_path):
    numbers = []
    for processes in (1, 2):
        out = tmp_path / f"report{processes}"
        args = ["--checkpoint", trained_run["checkpoint"], "--data", trained_run["shards"], "--out",
                str(out), "--num-workers", "0", "--weights-dir", substitute_weights, "--no-download",
                "--metrics", "l1,psnr,ssim,fid,kid,lpips"]
        script = str(ROOT / "pipeline" / "evaluate.py")
        command = [sys.executable, script, *args] if processes == 1 else \
            accelerate(args, processes=2, script=script)
        result = run(command, gloo_env(), timeout=500)
        assert result.returncode == 0, explain(result)
        numbers.append(json.loads((out / "metrics.json").read_text()))
        assert "<th>FID</th>" in (out / "index.html").read_text()
    one, two = numbers
    assert two["world_size"] == 2 and one["images"] == two["images"] == 6
    for key in REALISM:
        assert one[key] == pytest.approx(two[key], rel=1e-9, abs=1e-12), (key, one[key], two[key])
    assert [s["lpips"] for s in one["samples"]] == [s["lpips"] for s in two["samples"]]
    assert one["kid_subset_size"] == 6 and "torch-fidelity" in one["metrics"]["fid"]


@pytest.mark.timeout(300)
def test_the_trainer_refuses_a_metric_it_cannot_measure_in_one_line(demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = train_args(run_dir, demo_shards, "--eval.metrics=l1,fid", f"--eval.weights_dir={tmp_path}", *QUIET)
    result = subprocess.run(single(args), cwd=ROOT, env=gloo_env(), capture_output=True, text=True,
                            timeout=240)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, explain(result)
    assert "eval.metrics: fid needs weights-inception-2015-12-05-6726825d.pth" in lines[0]
    assert not run_dir.exists()
