"""GAN losses and the pix2pix objective (pure torch).

D loss = 0.5 x (loss on real pairs + loss on fake pairs): halved to slow D relative to G.
G loss = GAN loss on fake pairs judged as real + lambda_l1 x L1(output, target).
The vanilla loss is the non-saturating one: G maximises log D(x, G(x)).
"""
from __future__ import annotations

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


@dataclass(frozen=True)
class Pix2PixObjective:
    gan: str = "vanilla"
    lambda_l1: float = 100.0

    def discriminator(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        return 0.5 * (gan_loss(real_logits, True, self.gan) + gan_loss(fake_logits, False, self.gan))

    def generator(self, fake_logits: torch.Tensor, output: torch.Tensor,
                  target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, gan term, L1 term) for the generator."""
        adversarial = gan_loss(fake_logits, True, self.gan, for_discriminator=False)
        l1 = F.l1_loss(output.float(), target.float())
        return adversarial + self.lambda_l1 * l1, adversarial, l1
