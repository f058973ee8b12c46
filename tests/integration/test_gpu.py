"""What only a GPU can show: run by `benchmarks/gpu_check.sh` on a lent device, skipped
without CUDA (also under CI=true: the CI machine has no GPU)."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import Config
from pipeline.data import Geometry, augment, resize_u8
from pipeline.engines import build_models, build_optimizers
from pipeline.gan import StepHooks, train_step
from pipeline.losses import Pix2PixObjective
from tests.helpers.inference_runs import make_export
from tests.helpers.trainer_runs import ROOT

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def cuda_step(channels_last: bool = False, compile: bool = False, bf16: bool = True, steps: int = 2):
    """Losses of a few unet_128 steps on CUDA from seeded weights and inputs."""
    cfg = Config()
    cfg.model.generator, cfg.data.crop_size = "unet_128", 128
    G, D = build_models(cfg, channels_last)
    G, D = G.cuda(), D.cuda()
    opt_G, opt_D, _ = build_optimizers(cfg, G, D)
    if compile:
        G, D = torch.compile(G), torch.compile(D)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    generator = torch.Generator().manual_seed(0)
    x, y = (torch.rand(4, 3, 128, 128, generator=generator).cuda().to(memory_format=fmt) * 2 - 1
            for _ in range(2))
    hooks = StepHooks(autocast=lambda: torch.autocast("cuda", torch.bfloat16, enabled=bf16))
    torch.manual_seed(0)
    return [train_step(G, D, opt_G, opt_D, x, y, Pix2PixObjective(), hooks)["loss_G_l1"]
            for _ in range(steps)]


def test_bf16_autocast_runs_the_convolutions_in_bf16_on_cuda():
    cfg = Config()
    cfg.model.generator, cfg.data.crop_size = "unet_128", 128
    G, _ = build_models(cfg, channels_last=False)
    seen = []
    G.cuda().model.model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cuda", torch.bfloat16):
        G(torch.zeros(1, 3, 128, 128, device="cuda"))
    assert seen == [torch.bfloat16]


def test_channels_last_and_compile_train_like_eager_on_cuda():
    eager = cuda_step()
    assert all(np.isfinite(eager))
    assert cuda_step(channels_last=True) == pytest.approx(eager, rel=0.02)
    assert cuda_step(compile=True) == pytest.approx(eager, rel=0.02)


def test_device_augmentation_matches_the_cpu_kernel():
    images = torch.randint(0, 256, (4, 3, 300, 200), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    cpu, cuda = resize_u8(images, 286), resize_u8(images.cuda(), 286).cpu()
    assert (cpu.int() - cuda.int()).abs().max() <= 1  # rounding of float vs uint8 kernels
    cfg = Geometry.of(Config().data)
    params = torch.tensor([[3, 7, 1], [0, 0, 0], [30, 30, 1], [15, 2, 0]])  # top, left, flip
    on_cuda, on_cpu = augment(images.cuda(), params, cfg).cpu(), augment(images, params, cfg)
    assert on_cuda.shape == on_cpu.shape == (4, 3, 256, 256)
    assert (on_cuda.int() - on_cpu.int()).abs().max() <= 1


def test_translate_and_evaluate_run_on_cuda(trained_run, tmp_path):
    export = make_export(tmp_path / "g")
    Image.fromarray(np.full((128, 128, 3), 100, np.uint8)).save(tmp_path / "a.png")
    translate = subprocess.run([sys.executable, str(ROOT / "pipeline" / "translate.py"), "--checkpoint",
                                export, "--device", "cuda", "--out", str(tmp_path / "out"),
                                str(tmp_path / "a.png"), "--quiet"], capture_output=True, text=True)
    assert translate.returncode == 0 and "on cuda" in translate.stdout, translate.stderr
    evaluate = subprocess.run([sys.executable, str(ROOT / "pipeline" / "evaluate.py"), "--checkpoint",
                               trained_run["checkpoint"], "--data", trained_run["shards"], "--out",
                               str(tmp_path / "report")], capture_output=True, text=True)
    assert evaluate.returncode == 0 and "report in" in evaluate.stdout, evaluate.stderr
