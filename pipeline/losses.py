"""GAN losses and the pix2pix objective (pure torch).

D loss = 0.5 x (loss on real pairs + loss on fake pairs): halved to slow D relative to G.
G loss = GAN loss on fake pairs judged as real + lambda_l1 x L1(output, target).
The vanilla loss is the non-saturating one: G maximises log D(x, G(x)).

A multiscale D (models.MultiscaleDiscriminator) answers with one list of features per
scale, its logits last: the GAN losses are summed over the scales (as pix2pixHD does), and
lambda_feat > 0 adds pix2pixHD's feature matching: L1 between D's features on the fake
and on the real pair, every layer but the logits, weighted 4 / (n_layers + 1) per layer
and 1 / num_d per scale. The real features come from the D that was just updated (one
extra no-grad forward, gan.train_step), so fake and real are judged by the same D;
pix2pixHD takes both from one forward before its D update.

lambda_vgg > 0 adds pix2pixHD's perceptual loss (VGGLoss): L1 between VGG19 features of
output and target at relu1_1 ... relu5_1, weighted 1/32 ... 1. Unlike pix2pixHD, the
images are first mapped from [-1, 1] to ImageNet's normalisation, the one the weights
were trained with. The network comes in built and loaded (realism.load_vgg19_features).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

GAN_LOSSES = {  # the registry: the config validates loss.gan against these keys
    "vanilla": "non-saturating BCE on logits (the reference's)",
    "lsgan": "least squares (LSGAN)",
    "hinge": "hinge loss",
}


def gan_loss(logits: torch.Tensor, real: bool, kind: str, for_discriminator: bool = True) -> torch.Tensor:
    """The loss of discriminator logits against the label `real`.

    vanilla: BCE on logits (numerically stable, no sigmoid in D).
    lsgan:   mean squared distance to 1 (real) or 0 (fake).
    hinge:   D pushes real logits above 1 and fake below -1; G maximises the fake logit.
    Computed in fp32 whatever the autocast dtype: the losses are small reductions.
    """
    logits = logits.float()
    if kind == "vanilla":
        target = torch.ones_like(logits) if real else torch.zeros_like(logits)
        return F.binary_cross_entropy_with_logits(logits, target)
    if kind == "lsgan":
        return F.mse_loss(logits, torch.full_like(logits, 1.0 if real else 0.0))
    if kind == "hinge":
        if not for_discriminator:
            return -logits.mean() if real else logits.mean()
        return F.relu(1.0 - logits).mean() if real else F.relu(1.0 + logits).mean()
    raise ValueError(f"unknown GAN loss {kind!r}: expected one of {', '.join(GAN_LOSSES)}")


DOutput = torch.Tensor | Sequence[Sequence[torch.Tensor]]  # logits, or features per scale


def adversarial(out: DOutput, real: bool, kind: str, for_discriminator: bool = True) -> torch.Tensor:
    """gan_loss of a D's answer: its logits, or the sum over a multiscale D's scales."""
    if isinstance(out, torch.Tensor):
        return gan_loss(out, real, kind, for_discriminator)
    return sum(gan_loss(scale[-1], real, kind, for_discriminator) for scale in out)


def feature_matching(fake: Sequence[Sequence[torch.Tensor]],
                     real: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """pix2pixHD's feature-matching term (before lambda_feat): the real features are
    targets (detached), so no gradient reaches D from it."""
    total = 0.0
    for fake_scale, real_scale in zip(fake, real):
        layer_weight = 4.0 / (len(fake_scale) - 1) / len(fake)  # 4 / (n_layers + 1), 1 / num_d
        for f, r in zip(fake_scale[:-1], real_scale[:-1]):
            total = total + layer_weight * F.l1_loss(f.float(), r.detach().float())
    return total


VGG_TAPS = (2, 7, 12, 21, 30)  # torchvision vgg19().features[:i] ends at relu1_1 ... relu5_1
VGG_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)  # pix2pixHD's, shallow to deep
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class VGGLoss(nn.Module):
    """pix2pixHD's perceptual term (before lambda_vgg) on images in [-1, 1]; `features` is
    torchvision's VGG19 `features` (or its first VGG_TAPS[-1] layers), frozen here. The
    target's features are computed without gradient; one-channel images are repeated."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.features = features[:VGG_TAPS[-1]].eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        x = ((x + 1) / 2 - self.mean) / self.std
        out, start = [], 0
        for end in VGG_TAPS:
            x = self.features[start:end](x)
            out.append(x)
            start = end
        return out

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            real = self.taps(target)
        fake = self.taps(output)
        return sum(w * F.l1_loss(f.float(), r.float()) for w, f, r in zip(VGG_WEIGHTS, fake, real))


@dataclass
class GeneratorLoss:
    total: torch.Tensor
    gan: torch.Tensor
    l1: torch.Tensor
    feat: torch.Tensor | None = None  # feature matching, before lambda_feat
    vgg: torch.Tensor | None = None  # the perceptual term, before lambda_vgg

    def terms(self) -> dict[str, torch.Tensor]:
        """The logged losses, by name: loss_G, loss_G_gan, loss_G_l1 (, _feat, _vgg)."""
        named = {"loss_G": self.total, "loss_G_gan": self.gan, "loss_G_l1": self.l1,
                 "loss_G_feat": self.feat, "loss_G_vgg": self.vgg}
        return {name: value for name, value in named.items() if value is not None}


@dataclass(frozen=True)
class Pix2PixObjective:
    gan: str = "vanilla"
    lambda_l1: float = 100.0
    lambda_feat: float = 0.0  # pix2pixHD's feature matching (10 there); needs a multiscale D
    lambda_vgg: float = 0.0  # pix2pixHD's perceptual loss (10 there); needs `perceptual`
    perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = field(
        default=None, compare=False)  # a VGGLoss

    @property
    def wants_real_features(self) -> bool:
        return self.lambda_feat > 0

    def discriminator(self, real_logits: DOutput, fake_logits: DOutput) -> torch.Tensor:
        return 0.5 * (adversarial(real_logits, True, self.gan) + adversarial(fake_logits, False, self.gan))

    def generator(self, fake_logits: DOutput, output: torch.Tensor, target: torch.Tensor,
                  real_features: DOutput | None = None) -> GeneratorLoss:
        """The generator's loss; `real_features`: D's answer on the real pair, when
        wants_real_features."""
        gan = adversarial(fake_logits, True, self.gan, for_discriminator=False)
        l1 = F.l1_loss(output.float(), target.float())
        total = gan + self.lambda_l1 * l1
        if not (self.wants_real_features or self.lambda_vgg > 0):
            return GeneratorLoss(total, gan, l1)  # the pix2pix objective
        feat = vgg = None
        if self.wants_real_features:
            feat = feature_matching(fake_logits, real_features)
            total = total + self.lambda_feat * feat
        if self.lambda_vgg > 0:
            vgg = self.perceptual(output, target)
            total = total + self.lambda_vgg * vgg
        return GeneratorLoss(total, gan, l1, feat, vgg)
