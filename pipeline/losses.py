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
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


@dataclass
class GeneratorLoss:
    total: torch.Tensor
    gan: torch.Tensor
    l1: torch.Tensor
    feat: torch.Tensor | None = None  # feature matching, before lambda_feat


@dataclass(frozen=True)
class Pix2PixObjective:
    gan: str = "vanilla"
    lambda_l1: float = 100.0
    lambda_feat: float = 0.0  # pix2pixHD's feature matching (10 there); needs a multiscale D

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
        if not self.wants_real_features:
            return GeneratorLoss(total, gan, l1)
        feat = feature_matching(fake_logits, real_features)
        return GeneratorLoss(total + self.lambda_feat * feat, gan, l1, feat)
