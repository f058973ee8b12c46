"""Loss values checked by hand on small tensors."""
import math

import pytest
import torch

from pipeline.losses import Pix2PixObjective, gan_loss

LOGITS = torch.tensor([[0.0, 2.0], [-1.0, 3.0]])


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def test_vanilla_is_bce_on_logits():
    # -log(sigmoid(z)) = softplus(-z); -log(1 - sigmoid(z)) = softplus(z)
    real = sum(softplus(-z) for z in (0.0, 2.0, -1.0, 3.0)) / 4
    fake = sum(softplus(z) for z in (0.0, 2.0, -1.0, 3.0)) / 4
    assert gan_loss(LOGITS, True, "vanilla").item() == pytest.approx(real, rel=1e-6)
    assert gan_loss(LOGITS, False, "vanilla").item() == pytest.approx(fake, rel=1e-6)


def test_lsgan_is_squared_distance_to_the_label():
    assert gan_loss(LOGITS, True, "lsgan").item() == pytest.approx((1 + 1 + 4 + 4) / 4)
    assert gan_loss(LOGITS, False, "lsgan").item() == pytest.approx((0 + 4 + 1 + 9) / 4)


def test_hinge_for_discriminator_and_generator():
    assert gan_loss(LOGITS, True, "hinge").item() == pytest.approx((1 + 0 + 2 + 0) / 4)
    assert gan_loss(LOGITS, False, "hinge").item() == pytest.approx((1 + 3 + 0 + 4) / 4)
    assert gan_loss(LOGITS, True, "hinge", for_discriminator=False).item() == pytest.approx(-1.0)


def test_unknown_gan_loss_is_rejected():
    with pytest.raises(ValueError, match="unknown GAN loss 'wgan'"):
        gan_loss(LOGITS, True, "wgan")


def test_discriminator_loss_is_half_the_sum():
    objective = Pix2PixObjective("lsgan")
    real, fake = torch.ones(4), torch.zeros(4)  # a perfect D: both terms 0
    assert objective.discriminator(real, fake).item() == 0.0
    assert objective.discriminator(fake, real).item() == pytest.approx(0.5 * (1 + 1))


def test_generator_loss_is_gan_plus_lambda_times_l1():
    objective = Pix2PixObjective("lsgan", lambda_l1=100.0)
    output = torch.tensor([0.5, -0.5, 0.0, 1.0])
    target = torch.tensor([0.0, 0.0, 0.0, 0.0])
    loss = objective.generator(torch.zeros(4), output, target)
    assert loss.gan.item() == pytest.approx(1.0)
    assert loss.l1.item() == pytest.approx(0.5)
    assert loss.total.item() == pytest.approx(1.0 + 100 * 0.5) and loss.feat is None


def test_losses_are_computed_in_fp32_under_bf16_inputs():
    objective = Pix2PixObjective()
    loss = objective.generator(LOGITS.bfloat16(), torch.ones(4).bfloat16(), torch.zeros(4))
    assert loss.total.dtype == torch.float32


def test_feature_matching_weights_layers_and_scales_and_leaves_d_untouched():
    from pipeline.losses import feature_matching
    # 2 scales x (3 feature layers + logits): n_layers + 1 = 3 -> 4/3 per layer, 1/2 per scale
    fake = [[torch.full((2, 4), 1.0, requires_grad=True) for _ in range(4)] for _ in range(2)]
    real = [[torch.full((2, 4), 0.0, requires_grad=True) for _ in range(4)] for _ in range(2)]
    fake[0][3].data.fill_(100.0)  # the logits never count
    fake[1][0].data.fill_(3.0)  # |3 - 0| on one layer of the second scale
    value = feature_matching(fake, real)
    assert value.item() == pytest.approx((4 / 3) * 0.5 * (3 * 1 + (3 + 1 + 1)))
    value.backward()
    assert all(r.grad is None for scale in real for r in scale)  # the real side is a target
    assert fake[0][3].grad is None and fake[0][0].grad is not None


def test_multiscale_losses_sum_the_scales_and_add_feature_matching():
    objective = Pix2PixObjective("lsgan", lambda_l1=0.0, lambda_feat=10.0)
    scales = [[torch.zeros(1, 2), torch.ones(1, 1)], [torch.zeros(1, 2), torch.ones(1, 1)]]
    assert objective.discriminator(scales, scales).item() == pytest.approx(0.5 * (0 + 2))
    real = [[torch.ones(1, 2), torch.ones(1, 1)], [torch.zeros(1, 2), torch.ones(1, 1)]]
    loss = objective.generator(scales, torch.zeros(2), torch.zeros(2), real)
    assert loss.gan.item() == 0.0 and loss.feat.item() == pytest.approx(4 / 1 * 0.5 * 1)
    assert loss.total.item() == pytest.approx(10 * loss.feat.item())


def test_vgg_loss_taps_relu1_to_relu5_weighted_and_trains_only_g():
    """On torchvision's VGG19 layers (random weights: the plumbing, not the numbers): the
    term is pix2pixHD's weighted L1 over the five taps of ImageNet-normalised images,
    written out here; no gradient reaches VGG or the target."""
    tv = pytest.importorskip("torchvision")
    from pipeline.losses import VGGLoss
    torch.manual_seed(0)
    features = tv.models.vgg.make_layers(tv.models.vgg.cfgs["E"])
    loss = VGGLoss(features)
    output = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    target = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    relus = [1, 6, 11, 20, 29]  # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 in vgg19().features

    def tapped(images):
        x, out = (images.detach() + 1) / 2, []
        x = (x - mean) / std
        for i, layer in enumerate(features[:30]):
            x = layer(x)
            if i in relus:
                out.append(x)
        return out
    expected = sum(w * (a - b).abs().mean() for w, a, b in
                   zip([1 / 32, 1 / 16, 1 / 8, 1 / 4, 1], tapped(output), tapped(target)))
    value = loss(output, target)
    torch.testing.assert_close(value, expected)
    value.backward()
    assert output.grad is not None and target.grad is None
    assert all(p.grad is None and not p.requires_grad for p in loss.parameters())
    assert loss(target, target).item() == 0.0
    grey = torch.rand(1, 1, 32, 32) * 2 - 1
    rgb = grey.expand(-1, 3, -1, -1)
    torch.testing.assert_close(loss(grey, -grey), loss(rgb, -rgb))


def test_the_vgg_term_adds_to_the_generator_loss_only_when_weighted():
    perceptual = lambda output, target: (output - target).abs().sum()
    objective = Pix2PixObjective("vanilla", lambda_l1=0.0, lambda_vgg=10.0, perceptual=perceptual)
    logits, output, target = torch.zeros(1, 1, 2, 2), torch.ones(2), torch.zeros(2)
    loss = objective.generator(logits, output, target)
    assert loss.vgg.item() == 2.0 and loss.feat is None
    assert loss.total.item() == pytest.approx(loss.gan.item() + 10 * 2.0)
    assert set(loss.terms()) == {"loss_G", "loss_G_gan", "loss_G_l1", "loss_G_vgg"}
    assert set(Pix2PixObjective().generator(logits, output, target).terms()) == {
        "loss_G", "loss_G_gan", "loss_G_l1"}
