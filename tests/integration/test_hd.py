"""The pix2pixHD objective through the real trainer on 2 processes (gloo): a ResNet G, the
multiscale D, feature matching, 2 accumulated micro-batches per update and G's EMA keep G
and D bitwise equal across ranks, log the feature-matching term, and resume exactly: the
raw G's losses and the EMA the export holds."""
import pytest
from safetensors.torch import load_file

from tests.helpers.runs import DECAY, losses_by_step, run_then_resume
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

pytestmark = pytest.mark.slow

HD = ("--model.generator=resnet_6blocks", "--model.discriminator=multiscale", "--model.num_d=2",
      "--model.norm=instance", "--model.dropout=false", "--loss.gan=lsgan", "--loss.lambda_feat=10",
      "--train.grad_accum=2", "--train.ema_decay=0.9", "--data.num_workers=1", "--log.tracker=none",
      *DECAY)


@pytest.mark.timeout(600)
def test_hd_objective_on_two_processes_stays_in_step_and_resumes_exactly(demo_shards, tmp_path):
    whole = run(accelerate(train_args(tmp_path / "whole", demo_shards, "--train.max_steps=6", *HD)),
                gloo_env(), timeout=400)
    assert whole.returncode == 0, explain(whole)
    assert "replicas agree: G and D digest" in whole.stdout and "on 2 rank(s)" in whole.stdout
    records = step_log(tmp_path / "whole")
    assert all(r["train/loss_G_feat"] > 0 for r in records)
    resumed = run_then_resume(lambda args: accelerate(args), gloo_env(), tmp_path / "resumed",
                              demo_shards, 3, 6, *HD)
    expected, got = losses_by_step(records), losses_by_step(resumed)
    for step in range(4, 7):
        assert got[step] == expected[step], f"step {step} differs after resume"
    feat = {r["step"]: r["train/loss_G_feat"] for r in resumed}
    assert [feat[s] for s in range(4, 7)] == [r["train/loss_G_feat"] for r in records[3:6]]
    final = lambda run_dir, name: load_file(str(run_dir / "checkpoints" / "step_00000006" / name))
    ema, resumed_ema = final(tmp_path / "whole", "generator.safetensors"), \
        final(tmp_path / "resumed", "generator.safetensors")
    raw = final(tmp_path / "whole", "generator_raw.safetensors")
    assert ema.keys() == resumed_ema.keys() == raw.keys()
    assert all(ema[k].equal(resumed_ema[k]) for k in ema)  # the EMA resumed exactly
    assert not all(ema[k].equal(raw[k]) for k in ema)  # and the export is the EMA, not G


@pytest.mark.timeout(600)
def test_a_local_run_starts_from_a_global_run_and_trains_its_global_part_after_the_freeze(
        demo_shards, tmp_path):
    """pix2pixHD's staged training as two runs: global, then local around it (init_from),
    the global part held still for freeze_global_steps and trained after."""
    common = ("--model.norm=instance", "--model.dropout=false", "--data.num_workers=1",
              "--log.tracker=none")
    first = run(single(train_args(tmp_path / "global", demo_shards, "--model.generator=global",
                                  "--model.g_filters=8", "--train.max_steps=2", *common)), cpu_env())
    assert first.returncode == 0, explain(first)
    second = run(single(train_args(tmp_path / "local", demo_shards, "--model.generator=local",
                                   "--model.g_filters=4", f"--model.init_from={tmp_path / 'global'}",
                                   "--train.freeze_global_steps=2", "--train.max_steps=3",
                                   "--train.ckpt_every=2", *common)), cpu_env())
    assert second.returncode == 0, explain(second)
    assert "G initialised from" in second.stdout
    source = load_file(str(tmp_path / "global" / "checkpoints" / "step_00000002" / "generator.safetensors"))
    at = lambda step: load_file(str(tmp_path / "local" / "checkpoints" / f"step_{step:08d}" /
                                    "generator.safetensors"))
    mapped = {k.replace("model.", "global_part.", 1): v for k, v in source.items()
              if k.replace("model.", "global_part.", 1) in at(2)}
    assert len(mapped) > 10
    assert all(at(2)[k].equal(v) for k, v in mapped.items())  # held still for 2 steps
    assert not all(at(3)[k].equal(v) for k, v in mapped.items())  # then trained
    wrong = run(single(train_args(tmp_path / "wrong", demo_shards, "--model.generator=resnet_6blocks",
                                  f"--model.init_from={tmp_path / 'global'}", *common)), cpu_env())
    lines = wrong.stderr.strip().splitlines()
    assert wrong.returncode == 2 and len(lines) == 1, explain(wrong)
    assert "model.init_from" in lines[0] and "cannot start from a global" in lines[0]
