"""Substitute weights for the realism metrics, in the real architectures and under the
standard file names, for tests and benchmarks on a machine that cannot download:

    python -m tests.helpers.substitute_weights DIR

writes DIR/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth (torch-fidelity's
FID Inception-v3), DIR/hub/checkpoints/alexnet-owt-7be5be79.pth (torchvision's AlexNet,
LPIPS' backbone; its linear layers ship with torchmetrics) and
DIR/hub/checkpoints/vgg19-dcbb9e9d.pth (torchvision's VGG19, its convolutional part only:
loss.lambda_vgg's), the layout `--weights-dir DIR` reads. The numbers they give show the
plumbing only: never rank models with them.

torch-fidelity's Inception loads its weights in __init__ (downloading them when no path is
given), so its state dict is built from the library's own blocks in the same order and
names, then loaded strictly into the real class from a file. A random Inception in eval
mode gives degenerate features (mean ~4e-8 with PyTorch's init), so the BatchNorm running
statistics are calibrated on generated images until the features are of order 1.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline import realism

CALIBRATION_IMAGES = 32


def inception_skeleton() -> nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 layers, without its weight loading."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe
    layers = nn.Module()
    blocks = [("Conv2d_1a_3x3", fe.BasicConv2d(3, 32, kernel_size=3, stride=2)),
              ("Conv2d_2a_3x3", fe.BasicConv2d(32, 32, kernel_size=3)),
              ("Conv2d_2b_3x3", fe.BasicConv2d(32, 64, kernel_size=3, padding=1)),
              ("Conv2d_3b_1x1", fe.BasicConv2d(64, 80, kernel_size=1)),
              ("Conv2d_4a_3x3", fe.BasicConv2d(80, 192, kernel_size=3)),
              ("Mixed_5b", fe.InceptionA(192, pool_features=32)),
              ("Mixed_5c", fe.InceptionA(256, pool_features=64)),
              ("Mixed_5d", fe.InceptionA(288, pool_features=64)),
              ("Mixed_6a", fe.InceptionB(288)),
              ("Mixed_6b", fe.InceptionC(768, channels_7x7=128)),
              ("Mixed_6c", fe.InceptionC(768, channels_7x7=160)),
              ("Mixed_6d", fe.InceptionC(768, channels_7x7=160)),
              ("Mixed_6e", fe.InceptionC(768, channels_7x7=192)),
              ("Mixed_7a", fe.InceptionD(768)),
              ("Mixed_7b", fe.InceptionE_1(1280)),
              ("Mixed_7c", fe.InceptionE_2(2048)),
              ("fc", nn.Linear(2048, 1008))]
    for name, block in blocks:
        layers.add_module(name, block)
    return layers


def generated_images(count: int, size: int = 128, seed: int = 0) -> torch.Tensor:
    """count x 3 x size x size uint8: smooth colour fields with edges, like photos more
    than like noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 6, 6, generator=g)
    smooth = nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    edges = (torch.rand(count, 3, 12, 12, generator=g) > 0.5).float()
    blocks = nn.functional.interpolate(edges, size=(size, size), mode="nearest")
    return ((0.7 * smooth + 0.3 * blocks).clamp(0, 1) * 255).to(torch.uint8)


def calibrate(extractor: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Set every BatchNorm's running statistics to those of `images`; returns the features
    the calibrated extractor gives them in eval mode."""
    batchnorms = [m for m in extractor.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in batchnorms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the calibration batches
        bn.train()
    with torch.no_grad():
        for batch in images.split(16):
            extractor(batch)
    extractor.eval()
    with torch.no_grad():
        return torch.cat([extractor(batch)[0] for batch in images.split(16)])


def write_inception(path: Path) -> None:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.pth")
        torch.save(inception_skeleton().state_dict(), raw)
        extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                feature_extractor_weights_path=raw)  # strict load
    features = calibrate(extractor, generated_images(CALIBRATION_IMAGES))
    spread = features.std(0).mean().item()
    if not (torch.isfinite(features).all() and 0.05 < spread < 20):
        raise RuntimeError(f"calibrated Inception features are degenerate (mean per-dim std {spread:.3g})")
    torch.save(extractor.state_dict(), path)


def write_alexnet(path: Path) -> None:
    from torchvision.models import alexnet
    torch.manual_seed(0)
    torch.save(alexnet(weights=None).state_dict(), path)


def write_vgg19(path: Path) -> None:
    from torchvision.models.vgg import cfgs, make_layers
    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["E"]).state_dict().items()}, path)


def write(root: str | os.PathLike) -> Path:
    """The files under `root` (skipping those present); returns root."""
    root = Path(root)
    for name, writer in ((realism.INCEPTION_FILE, write_inception), (realism.ALEXNET_FILE, write_alexnet),
                         (realism.VGG19_FILE, write_vgg19)):
        path = root / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            writer(path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
    return root


METRICS_PACKAGES = all(realism.missing_package(n) is None for n in ("fid", "kid", "lpips"))


@pytest.fixture(scope="session")
def substitute_weights(tmp_path_factory) -> str:
    """A weights folder for fid, kid and lpips (the metrics packages installed, else a
    skip, or a failure on CI); never the user's own caches."""
    from tests.conftest import require_component
    require_component(METRICS_PACKAGES, f"the metrics packages ({realism.EXTRA})")
    return str(write(tmp_path_factory.mktemp("weights")))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.helpers.substitute_weights DIR")
    print(f"substitute weights (plumbing only, never for ranking models) in {write(sys.argv[1])}")
