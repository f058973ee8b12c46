"""pipeline.engines in-process: the DDP engines under bf16 autocast on CPU."""
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
