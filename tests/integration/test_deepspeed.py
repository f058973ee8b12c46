"""The trainer under DeepSpeed, launched for real: G and D in one engine each, ZeRO-1 and
ZeRO-2, fp32 and bf16, 2 CPU processes over gloo (and 2 "nodes" on 127.0.0.1). Checked
against the DDP trainer on the same data and seed: losses and the generator export bit
for bit. Every launch sees autocast as DeepSpeed does on CUDA (deepspeed_env's
sitecustomize): what fails there in bf16 fails here. With CI=true a missing deepspeed
fails these tests instead of skipping them."""
import importlib.util
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pipeline.distributed import free_port
from tests.conftest import require_component
from tests.helpers.runs import (
    DECAY,
    LOSSES,
    assert_global_part_held_then_trained,
    losses_by_step,
    resume_from,
    staged_runs_args,
)
from tests.helpers.trainer_runs import (
    ROOT,
    accelerate,
    cpu_env,
    deepspeed,
    deepspeed_env,
    explain,
    gloo_env,
    latest,
    run,
    single,
    step_log,
    train_args,
)

# every test here launches DeepSpeed (10-25 s each on 2 cores; the file ~3-5 min); CI runs them
pytestmark = pytest.mark.slow

DEEPSPEED = all(importlib.util.find_spec(name) for name in ("deepspeed", "transformers"))
STEPS = 8
# Compared with DDP bit for bit: DeepSpeed keeps weights contiguous, so DDP must too, and
# the per-tensor Adam (the fused kernel rounds a flat ZeRO partition differently in the
# last bit than the same values tensor by tensor)
RUN = (f"--train.max_steps={STEPS}", "--data.num_workers=1", "--train.channels_last=false",
       "--optim.adam_impl=auto", f"--train.ckpt_every={STEPS // 2}", *DECAY)
LAUNCH_TIMEOUT = 420  # one 8-step launch; ~90 s on 2 busy cores


@pytest.fixture(scope="module", autouse=True)
def deepspeed_ops():
    """DeepSpeed installed, and its CPU comm op compiled once (not by racing ranks)."""
    require_component(DEEPSPEED, "DeepSpeed (pip install -e '.[deepspeed]')")
    result = subprocess.run([sys.executable, "-m", "tests.helpers.build_deepspeed_ops"], cwd=ROOT,
                            env=deepspeed_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, explain(result)


def launch(args, stage, precision="no") -> tuple[list[str], dict]:
    """(command, environment) of a 2-process launch: DDP for stage None, else ZeRO-`stage`."""
    if stage is None:
        return accelerate(args, precision=precision), gloo_env()
    return deepspeed(args, stage=stage, precision=precision), deepspeed_env()


@pytest.fixture(scope="module")
def runs(demo_shards, tmp_path_factory):
    """Uninterrupted 8-step runs with a decaying lr, each launched once on first use:
    runs(stage, precision) -> (run_dir, result); stage None is the DDP trainer."""
    done = {}

    def get(stage, precision="no"):
        if (stage, precision) not in done:
            run_dir = tmp_path_factory.mktemp(f"zero{stage}-{precision}") / "run"
            command, env = launch(train_args(run_dir, demo_shards, *RUN), stage, precision)
            done[stage, precision] = run_dir, run(command, env, timeout=LAUNCH_TIMEOUT)
        return done[stage, precision]
    return get


def export(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / latest(run_dir) / "generator.safetensors")


@pytest.mark.timeout(LAUNCH_TIMEOUT + 60)
@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_keeps_g_and_d_equal_across_ranks(runs, stage, precision):
    run_dir, result = runs(stage, precision)
    assert result.returncode == 0, explain(result)
    # a real ZeRO world of 2: not silently DDP, not two runs of world size 1
    assert '"world_size": 2' in result.stdout and '"engines": "deepspeed"' in result.stdout
    assert f'"zero_stage": {stage}' in result.stdout
    assert ("DeepSpeedZeroOptimizer" in result.stdout) == (stage > 0)
    assert f'"mixed_precision": "{precision}"' in result.stdout
    # bf16 as on CUDA: DeepSpeed switched our autocast off inside its engines (deepspeed_env)
    assert ("but disabled within the DeepSpeed engine" in result.stdout) == (precision == "bf16")
    assert "replicas agree: G and D digest" in result.stdout and "on 2 rank(s)" in result.stdout
    assert "[rank 0] exiting with code 0" in result.stderr
    assert "[rank 1] exiting with code 0" in result.stderr
    records = step_log(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert torch.isfinite(torch.tensor([[r[k] for k in LOSSES] for r in records])).all()


@pytest.mark.timeout(LAUNCH_TIMEOUT + 60)
def test_channels_last_asked_for_under_deepspeed_is_refused_in_one_line(demo_shards, tmp_path):
    # the auto default picks NCHW under DeepSpeed (the runs above); an explicit true is a
    # user error, not a silent NCHW run
    result = run(deepspeed(train_args(tmp_path / "run", demo_shards, *RUN, "--train.channels_last=true"),
                           stage=2), deepspeed_env(), timeout=LAUNCH_TIMEOUT)
    assert result.returncode != 0, explain(result)  # accelerate's launcher exits 1 for any failure
    assert "error: train.channels_last: not supported under DeepSpeed" in result.stderr
    assert "[rank 0] exiting with code 2" in result.stderr  # a user error, in one line


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT + 60)
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_fp32_losses_and_export_equal_ddp_bit_for_bit(runs, stage):
    (ddp_dir, ddp), (zero_dir, zero) = runs(None), runs(stage)
    assert ddp.returncode == 0, explain(ddp)
    assert zero.returncode == 0, explain(zero)
    assert losses_by_step(step_log(zero_dir)) == losses_by_step(step_log(ddp_dir))
    ddp_export, zero_export = export(ddp_dir), export(zero_dir)
    assert sorted(zero_export) == sorted(ddp_export)
    differing = [name for name in ddp_export if not torch.equal(zero_export[name], ddp_export[name])]
    assert not differing, f"export differs from DDP's in {differing}"


@pytest.mark.timeout(LAUNCH_TIMEOUT + 60)
@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_export_is_the_fp32_masters_not_the_bf16_working_copy(runs, stage):
    run_dir, result = runs(stage, "bf16")
    assert result.returncode == 0, explain(result)
    master = export(run_dir)
    assert all(t.dtype in (torch.float32, torch.int64) for t in master.values())
    # the engine's own copy of the module (written by us, so trusted for the pickle)
    engine_file = run_dir / "checkpoints" / latest(run_dir) / "G" / "engine" / "mp_rank_00_model_states.pt"
    working = torch.load(engine_file, map_location="cpu", weights_only=False)["module"]
    weights = [name for name, t in working.items() if t.dtype == torch.bfloat16 and name.endswith("weight")]
    assert weights, "no bf16 working copy in the engine's checkpoint"
    for name in weights:  # the working copy is the masters rounded to bf16 ...
        assert torch.equal(master[name].bfloat16(), working[name]), name
    # ... and the masters hold what bf16 cannot: the export is not an upcast working copy
    assert any(not torch.equal(master[name], working[name].float()) for name in weights)


@pytest.mark.timeout(LAUNCH_TIMEOUT + 60)
def test_g_step_without_freezing_d_fails_under_zero2(demo_shards, tmp_path):
    # D left trainable in the G step: G's loss reaches D's parameters, and ZeRO-2's
    # gradient hooks reduce them a second time in D's next update
    helper = str(ROOT / "tests" / "helpers" / "train_without_freezing_d.py")
    result = run(deepspeed(train_args(tmp_path / "run", demo_shards, "--train.max_steps=3", *RUN[1:]),
                           stage=2, script=helper), deepspeed_env(), timeout=LAUNCH_TIMEOUT)
    assert result.returncode != 0
    assert "Gradient computed twice for this partition" in result.stderr
    assert "[rank 0] exiting with code 1" in result.stderr


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT + 60)
def test_zero2_bf16_resume_reproduces_the_uninterrupted_losses(runs, demo_shards, tmp_path):
    whole_dir, whole = runs(2, "bf16")
    assert whole.returncode == 0, explain(whole)
    run_dir = tmp_path / "resumed"  # from the checkpoint the whole run wrote at step 4
    resumed = resume_from(lambda args: deepspeed(args, stage=2, precision="bf16"), deepspeed_env(),
                          whole_dir, run_dir, demo_shards, STEPS // 2, STEPS, *RUN[1:])
    expected, got = losses_by_step(step_log(whole_dir)), losses_by_step(resumed)
    assert sorted(got) == list(range(STEPS // 2 + 1, STEPS + 1))  # no step lost or repeated
    for step in range(5, STEPS + 1):
        assert got[step] == expected[step], f"step {step} differs after resume"
    checkpoint = run_dir / "checkpoints" / latest(run_dir)
    for model, rank in [("G", 0), ("G", 1), ("D", 0), ("D", 1)]:  # every rank saved its partition
        partition = f"*zero_pp_rank_{rank}_*optim_states.pt"
        assert list((checkpoint / model / "engine").glob(partition)), (model, rank)
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


@pytest.mark.timeout(LAUNCH_TIMEOUT + 60)
def test_two_nodes_on_loopback_train_as_one_deepspeed_world(demo_shards, tmp_path):
    port, args = free_port(), train_args(tmp_path / "run", demo_shards, "--train.max_steps=3")
    nodes = [subprocess.Popen(deepspeed(args, processes=2, machines=2, machine_rank=rank, port=port),
                              cwd=ROOT, env=deepspeed_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=LAUNCH_TIMEOUT) for node in nodes]
    finally:
        for node in nodes:
            node.kill()  # a node left alone would wait for its peer forever
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert '"world_size": 2' in outputs[0][0] and '"engines": "deepspeed"' in outputs[0][0]
    assert "replicas agree: G and D digest" in outputs[0][0] and "on 2 rank(s)" in outputs[0][0]
    assert "[rank 1] exiting with code 0" in outputs[1][1]


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT + 60)
@pytest.mark.parametrize("stage", [None, 2], ids=["ddp", "zero2"])
def test_activation_checkpointing_changes_no_loss(runs, stage, demo_shards, tmp_path):
    plain_dir, plain = runs(stage)
    assert plain.returncode == 0, explain(plain)
    run_dir = tmp_path / "run"
    command, env = launch(train_args(run_dir, demo_shards, *RUN, "--model.activation_checkpointing=true"),
                          stage)
    result = run(command, env, timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, explain(result)
    assert "activation_checkpointing: true" in result.stdout
    # recomputed in backward, dropout masks replayed: the same numbers, bit for bit
    assert losses_by_step(step_log(run_dir)) == losses_by_step(step_log(plain_dir))


HD = ("--model.generator=resnet_6blocks", "--model.discriminator=multiscale", "--model.norm=instance",
      "--model.dropout=false", "--loss.gan=lsgan", "--loss.lambda_feat=10", "--train.grad_accum=2",
      "--data.num_workers=1", *DECAY)


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT + 60)
def test_zero2_bf16_accumulates_the_hd_objective_with_an_ema_and_resumes_exactly(demo_shards, tmp_path):
    """DeepSpeed's own gradient accumulation (gradient_accumulation_steps, fp32 sums under
    bf16) with the multiscale D, feature matching and G's EMA kept on each rank's master
    partition: ranks equal, exact resume of the raw G's losses and of the EMA."""
    launch = lambda args: deepspeed(args, stage=2, precision="bf16")
    hd = (*HD, "--train.ema_decay=0.9")
    whole = run(launch(train_args(tmp_path / "whole", demo_shards, "--train.max_steps=4",
                                  "--train.ckpt_every=2", *hd)), deepspeed_env(), timeout=LAUNCH_TIMEOUT)
    assert whole.returncode == 0, explain(whole)
    assert '"zero_stage": 2' in whole.stdout and "replicas agree: G and D digest" in whole.stdout
    resumed = resume_from(launch, deepspeed_env(), tmp_path / "whole", tmp_path / "resumed",
                          demo_shards, 2, 4, *hd)
    expected, got = losses_by_step(step_log(tmp_path / "whole")), losses_by_step(resumed)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step] == expected[step], f"step {step} differs after resume"
    assert all(r["train/loss_G_feat"] > 0 for r in resumed)
    final = lambda run_dir: run_dir / "checkpoints" / "step_00000004"
    ema, resumed_ema = (load_file(final(d) / "generator.safetensors") for d in (tmp_path / "whole",
                                                                                tmp_path / "resumed"))
    assert all(ema[k].equal(resumed_ema[k]) for k in ema)  # the EMA resumed exactly
    assert sorted(p.name for p in (final(tmp_path / "whole") / "G").glob("ema_partition_rank*.pt")) == [
        "ema_partition_rank0.pt", "ema_partition_rank1.pt"]  # each rank's share, no whole copy
    # the export is the EMA, not G: G's own fp32 masters, from the partitions DeepSpeed saved
    raw = raw_generator_masters(final(tmp_path / "whole"))
    assert raw.keys() <= ema.keys() and not all(ema[k].equal(raw[k]) for k in raw)


@pytest.mark.timeout(LAUNCH_TIMEOUT + 60)
def test_zero0_bf16_with_grad_accum_trains_summing_in_bf16_and_says_so(demo_shards, tmp_path):
    """ZeRO-0 refuses fp32 gradient sums for bf16 parameters (NotImplementedError at
    start-up): train.grad_accum there accumulates in bf16, said once, and trains."""
    run_dir = tmp_path / "run"
    args = train_args(run_dir, demo_shards, "--train.max_steps=2", "--train.grad_accum=2", *RUN[1:])
    result = run(deepspeed(args, stage=0, precision="bf16"), deepspeed_env(), timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, explain(result)
    assert '"zero_stage": 0' in result.stdout and '"mixed_precision": "bf16"' in result.stdout
    assert "replicas agree: G and D digest" in result.stdout and "on 2 rank(s)" in result.stdout
    assert result.stderr.count("under ZeRO-0 in bf16: DeepSpeed sums the micro-steps' gradients in bf16") == 1
    records = step_log(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert torch.isfinite(torch.tensor([[r[k] for k in LOSSES] for r in records])).all()


@pytest.mark.timeout(LAUNCH_TIMEOUT + 120)
def test_zero2_bf16_local_run_starts_from_a_global_run_and_holds_its_global_part_still(
        demo_shards, tmp_path):
    """Staged training under DeepSpeed: init_from reaches the fp32 masters (not only the
    bf16 working copies), and the frozen global part, in the optimiser's partitions from
    the start, stays exactly put until freeze_global_steps, then trains."""
    first, second = staged_runs_args(tmp_path, demo_shards)
    first = run(single(first), cpu_env())
    assert first.returncode == 0, explain(first)
    second = run(deepspeed(second, stage=2, precision="bf16"), deepspeed_env(), timeout=LAUNCH_TIMEOUT)
    assert second.returncode == 0, explain(second)
    assert "G initialised from" in second.stdout and "replicas agree: G and D digest" in second.stdout
    assert_global_part_held_then_trained(tmp_path)


def raw_generator_masters(checkpoint_dir) -> dict[str, torch.Tensor]:
    """G's fp32 weights from a ZeRO checkpoint's optimiser partitions, with DeepSpeed's own
    consolidation tool (what a user runs to get weights out of a DeepSpeed checkpoint)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir / "G"), tag="engine")
