"""pipeline.engines in-process: the DDP engines under bf16 autocast on CPU; what DeepSpeed
cannot do, refused by the start-up gate before anything is built."""
import json

import pytest
import torch

from tests.helpers.trainer_runs import train_args


@pytest.mark.timeout(120)
def test_bf16_runs_the_step_convolutions_in_bf16_on_cpu(demo_shards, tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from pipeline.config import from_cli
    from pipeline.engines import DDPEngines
    from pipeline.gan import train_step
    from pipeline.losses import Pix2PixObjective

    cfg, _ = from_cli(train_args(tmp_path / "run", demo_shards))
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    try:
        engines = DDPEngines(cfg, accelerator)
        G, D = engines.G, engines.D
        dtypes = set()
        for model in (G, D):
            for module in model.modules():
                if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                    module.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
        x = torch.rand(2, 3, 128, 128) * 2 - 1
        losses = train_step(G, D, engines.opt_G, engines.opt_D, x, x.flip(-1), Pix2PixObjective(),
                            engines.hooks)
    finally:
        AcceleratorState._reset_state(True)
    assert dtypes == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(list(losses.values()))))
    assert all(p.dtype == torch.float32 for p in G.parameters())  # fp32 master weights


@pytest.mark.timeout(120)
def test_the_hd_step_runs_its_convolutions_in_bf16_on_cpu(demo_shards, tmp_path):
    """The HD recipe's pieces (ResNet G, multiscale D, feature matching, grad_accum, EMA)
    under bf16 autocast: every convolution in bf16, the EMA and the weights in fp32."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from pipeline.config import from_cli
    from pipeline.engines import DDPEngines
    from pipeline.gan import train_step_accumulated
    from pipeline.losses import Pix2PixObjective

    cfg, _ = from_cli(train_args(tmp_path / "run", demo_shards, "--model.generator=resnet_6blocks",
                                 "--model.discriminator=multiscale", "--model.norm=instance",
                                 "--model.dropout=false", "--loss.lambda_feat=10", "--train.ema_decay=0.9"))
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    try:
        engines = DDPEngines(cfg, accelerator)
        dtypes = set()
        for model in (engines.G, engines.D):
            for module in model.modules():
                if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                    module.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
        xs = [torch.rand(1, 3, 128, 128) * 2 - 1 for _ in range(2)]
        losses = train_step_accumulated(engines.G, engines.D, engines.opt_G, engines.opt_D, xs,
                                        [x.flip(-1) for x in xs], Pix2PixObjective("lsgan", 0.0, 10.0),
                                        engines.hooks)
        engines.update_ema()
    finally:
        AcceleratorState._reset_state(True)
    assert dtypes == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(list(losses.values())))) and "loss_G_feat" in losses
    assert all(p.dtype == torch.float32 for p in [*engines.generator.parameters(), *engines.ema.parameters()])


@pytest.mark.timeout(120)
def test_evaluation_runs_a_copy_without_sync_batchnorm(demo_shards, tmp_path):
    """model.norm=syncbatch: SyncBatchNorm all-reduces on every train-mode forward, and
    evaluation (train mode, one image per forward, ranks holding different image counts)
    would hang on a GPU; on the CPU it refuses to run at all. Evaluation gets a plain
    BatchNorm copy with the same weights and statistics; training keeps SyncBatchNorm."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from pipeline.config import from_cli
    from pipeline.engines import DDPEngines

    cfg, _ = from_cli(train_args(tmp_path / "run", demo_shards, "--model.norm=syncbatch",
                                 "--train.ema_decay=0.99"))
    accelerator = Accelerator(cpu=True)
    try:
        engines = DDPEngines(cfg, accelerator)
    finally:
        AcceleratorState._reset_state(True)
    synced = lambda m: sum(isinstance(layer, torch.nn.SyncBatchNorm) for layer in m.modules())
    assert synced(engines.generator) > 0 and synced(engines.ema) > 0
    evaluated = engines.eval_generator()
    assert synced(evaluated) == 0 and evaluated.training
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in evaluated.modules()) == synced(engines.ema)
    state = engines.ema.state_dict()
    assert all(torch.equal(value, state[name]) for name, value in evaluated.state_dict().items())
    with torch.no_grad():
        assert torch.isfinite(evaluated(torch.rand(1, 3, 128, 128) * 2 - 1)).all()


DEEPSPEED_JSON = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}


@pytest.mark.parametrize("setting,json_change,message", [
    ("compile", {}, "train.compile: not supported under DeepSpeed"),
    ("channels_last", {}, "train.channels_last: not supported under DeepSpeed"),
    ("on_nonfinite", {}, "train.on_nonfinite: 'skip' is not supported under DeepSpeed"),
    ("", {"optimizer": {"type": "Adam"}}, "DeepSpeed config: remove 'optimizer'"),
    ("", {"zero_optimization": {"stage": 3}}, "DeepSpeed config: zero_optimization.stage 3 is not supported"),
])
def test_what_deepspeed_cannot_do_is_refused_before_launch(tmp_path, monkeypatch, setting,
                                                           json_change, message):
    """From the launch's own DeepSpeed JSON (what accelerate would hand the engines), before
    a process group, a run folder or an engine exists; none of it imports DeepSpeed."""
    from pipeline import startup
    from pipeline.config import Config, ConfigError

    (tmp_path / "ds.json").write_text(json.dumps({**DEEPSPEED_JSON, **json_change}))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "ds.json"))
    cfg = Config()
    cfg.log.tracker = "none"
    cfg.data.train = str(tmp_path / "no-shards")  # never reached: the DeepSpeed checks come first
    if setting:
        setattr(cfg.train, setting, {"compile": True, "channels_last": True, "on_nonfinite": "skip"}[setting])
    with pytest.raises(ConfigError, match=message):
        startup.check_before_launch(cfg)
