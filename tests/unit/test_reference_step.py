"""The standing rule, pinned: with the default config, the trainer's step (gan.train_step
with the hooks the trainer gives it) is the reference pix2pix step, bit for bit.

The reference's order (junyanz/pytorch-CycleGAN-and-pix2pix, Pix2PixModel.optimize_parameters)
is written out plainly below: G forward; D on (x, G(x)) detached then on (x, y), BCE with
logits, halved; D frozen; G's loss = GAN + 100 x L1. Both run on the same weights, inputs
and dropout masks; every loss and every weight must be equal after several steps.
"""
import copy

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from pipeline.config import Config
from pipeline.engines import make_engines
from pipeline.gan import train_step
from pipeline.losses import Pix2PixObjective

STEPS = 3


def reference_step(G, D, opt_G, opt_D, x, y) -> list[float]:
    fake = G(x)
    for p in D.parameters():
        p.requires_grad_(True)
    opt_D.zero_grad()
    pred_fake = D(torch.cat((x, fake.detach()), 1))
    loss_D_fake = F.binary_cross_entropy_with_logits(pred_fake, torch.zeros_like(pred_fake))
    pred_real = D(torch.cat((x, y), 1))
    loss_D_real = F.binary_cross_entropy_with_logits(pred_real, torch.ones_like(pred_real))
    loss_D = (loss_D_fake + loss_D_real) * 0.5
    loss_D.backward()
    opt_D.step()
    for p in D.parameters():
        p.requires_grad_(False)
    opt_G.zero_grad()
    pred_fake = D(torch.cat((x, fake), 1))
    loss_G_GAN = F.binary_cross_entropy_with_logits(pred_fake, torch.ones_like(pred_fake))
    loss_G_L1 = F.l1_loss(fake, y) * 100.0
    loss_G = loss_G_GAN + loss_G_L1
    loss_G.backward()
    opt_G.step()
    return [loss_D.item(), loss_G.item(), loss_G_GAN.item(), (loss_G_L1 / 100.0).item()]


def test_the_default_step_is_the_reference_step_bit_for_bit():
    cfg = Config()  # the defaults: unet_256, 70x70 PatchGAN, batch norm, vanilla, 100 x L1
    engines = make_engines(cfg, Accelerator(cpu=True, mixed_precision="no"))
    G, D = copy.deepcopy(engines.generator), copy.deepcopy(engines.discriminator)
    # the reference's Adam (lr 2e-4, betas 0.5/0.999), with the kernel the config picks
    adam = dict(lr=2e-4, betas=(0.5, 0.999), fused=cfg.optim.adam_impl == "fused")
    opt_G, opt_D = torch.optim.Adam(G.parameters(), **adam), torch.optim.Adam(D.parameters(), **adam)
    objective = Pix2PixObjective(cfg.loss.gan, cfg.loss.lambda_l1)
    hooks = engines.guarded_hooks(lambda model: None)
    inputs = torch.Generator().manual_seed(7)
    size = cfg.data.crop_size
    batches = [(torch.rand(cfg.data.batch_size, 3, size, size, generator=inputs) * 2 - 1,
                torch.rand(cfg.data.batch_size, 3, size, size, generator=inputs) * 2 - 1)
               for _ in range(STEPS)]
    torch.manual_seed(11)
    ours = [train_step(engines.G, engines.D, engines.opt_G, engines.opt_D, x, y, objective, hooks)
            for x, y in batches]
    torch.manual_seed(11)  # the same dropout masks
    theirs = [reference_step(G, D, opt_G, opt_D, x, y) for x, y in batches]
    for step, (a, b) in enumerate(zip(ours, theirs), 1):
        assert [a["loss_D"], a["loss_G"], a["loss_G_gan"], a["loss_G_l1"]] == b, f"step {step}"
    for mine, reference in ((engines.generator, G), (engines.discriminator, D)):
        for (name, p), q in zip(mine.state_dict().items(), reference.state_dict().values()):
            assert torch.equal(p, q), name
