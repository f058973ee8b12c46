"""The pix2pixHD objective through the real trainer on 2 processes (gloo): a ResNet G, the
multiscale D, feature matching, 2 accumulated micro-batches per update and G's EMA keep G
and D bitwise equal across ranks, log the feature-matching term, and resume exactly: the
raw G's losses and the EMA the export holds."""
import pytest
from safetensors.torch import load_file

from tests.helpers.runs import (
    DECAY,
    STAGED,
    assert_global_part_held_then_trained,
    losses_by_step,
    resume_from,
    staged_runs_args,
)
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
    whole = run(accelerate(train_args(tmp_path / "whole", demo_shards, "--train.max_steps=6",
                                      "--train.ckpt_every=3", *HD)), gloo_env(), timeout=400)
    assert whole.returncode == 0, explain(whole)
    assert "replicas agree: G and D digest" in whole.stdout and "on 2 rank(s)" in whole.stdout
    records = step_log(tmp_path / "whole")
    assert all(r["train/loss_G_feat"] > 0 for r in records)
    resumed = resume_from(lambda args: accelerate(args), gloo_env(), tmp_path / "whole",
                          tmp_path / "resumed", demo_shards, 3, 6, *HD)
    expected, got = losses_by_step(records), losses_by_step(resumed)
    assert sorted(got) == [4, 5, 6]
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
    first, second = staged_runs_args(tmp_path, demo_shards)
    first = run(single(first), cpu_env())
    assert first.returncode == 0, explain(first)
    second = run(single(second), cpu_env())
    assert second.returncode == 0, explain(second)
    assert "G initialised from" in second.stdout
    assert_global_part_held_then_trained(tmp_path)
    wrong = run(single(train_args(tmp_path / "wrong", demo_shards, "--model.generator=resnet_6blocks",
                                  f"--model.init_from={tmp_path / 'global'}", *STAGED)), cpu_env())
    lines = wrong.stderr.strip().splitlines()
    assert wrong.returncode == 2 and len(lines) == 1, explain(wrong)
    assert "model.init_from" in lines[0] and "cannot start from a global" in lines[0]


@pytest.mark.timeout(300)
def test_the_vgg_loss_trains_from_the_weights_folder_and_is_refused_in_one_line_without_it(
        demo_shards, substitute_weights, tmp_path):
    args = lambda name: train_args(tmp_path / name, demo_shards, "--model.generator=resnet_6blocks",
                                   "--loss.lambda_vgg=10", "--train.max_steps=2", *STAGED)
    trained = run(single(args("vgg")), cpu_env(P2P_WEIGHTS_DIR=substitute_weights))
    assert trained.returncode == 0, explain(trained)
    vgg = [r["train/loss_G_vgg"] for r in step_log(tmp_path / "vgg")]
    assert len(vgg) == 2 and all(v > 0 for v in vgg)
    refused = run(single(args("no_weights")), cpu_env())  # P2P_WEIGHTS_DIR: an empty place
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, explain(refused)
    assert "loss.lambda_vgg needs vgg19-dcbb9e9d.pth" in lines[0]
    assert not (tmp_path / "no_weights" / "checkpoints").exists()
