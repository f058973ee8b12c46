"""The networks match the reference's structure: counts, shapes, init, checkpointing."""
import dataclasses

import pytest
import torch
import torch.nn as nn

from pipeline.config import ModelConfig
from pipeline.models import (
    PatchDiscriminator,
    PixelDiscriminator,
    ResnetBlock,
    UNetGenerator,
    build_discriminator,
    build_generator,
    init_weights,
    unet,
)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_unet_256_has_the_reference_parameter_count():
    assert count(unet("unet_256", in_channels=3, out_channels=3, norm="batch")) == 54_413_955


@pytest.mark.parametrize("generator,norm,dropout,params", [
    ("resnet_6blocks", "batch", True, 7_841_411), ("resnet_9blocks", "batch", True, 11_383_427),
    ("resnet_9blocks", "instance", False, 11_378_179)])
def test_resnet_generators_have_the_reference_parameter_counts(generator, norm, dropout, params):
    model = build_generator(ModelConfig(generator=generator, norm=norm, dropout=dropout))
    assert count(model) == params
    assert any(isinstance(m, nn.Dropout) for m in model.modules()) == dropout


@pytest.mark.parametrize("generator,filters,params",
                         [("global", 64, 182_443_267), ("local", 32, 182_701_827)])
def test_pix2pixhd_generators_have_pix2pixhds_parameter_counts(generator, filters, params):
    with torch.device("meta"):  # 182M parameters: counted without allocating them
        model = build_generator(ModelConfig(generator=generator, g_filters=filters, norm="instance",
                                            dropout=False))
    assert count(model) == params


def test_local_enhancer_keeps_the_global_generators_layer_indices():
    global_g = build_generator(ModelConfig(generator="global", g_filters=8, norm="instance", dropout=False))
    local_g = build_generator(ModelConfig(generator="local", g_filters=4, norm="instance", dropout=False))
    global_keys = {k for k in global_g.state_dict() if int(k.split(".")[1]) < len(global_g.model) - 3}
    assert {k.replace("model.", "global_part.", 1) for k in global_keys} == \
        {k for k in local_g.state_dict() if k.startswith("global_part.")}
    y = local_g(torch.rand(1, 3, 64, 96) * 2 - 1)
    assert y.shape == (1, 3, 64, 96) and y.abs().max() <= 1


def test_resnet_generator_keeps_any_multiple_of_4_and_is_bounded():
    model = build_generator(ModelConfig(generator="resnet_6blocks", g_filters=8)).eval()
    for h, w in ((64, 64), (36, 100)):
        y = model(torch.rand(2, 3, h, w) * 2 - 1)
        assert y.shape == (2, 3, h, w) and y.abs().max() <= 1


def test_patchgan_70x70_has_the_reference_parameter_count_and_output_grid():
    d = PatchDiscriminator(in_channels=6, base_filters=64, n_layers=3, norm="batch")
    assert count(d) == 2_768_705
    with torch.no_grad():
        assert d(torch.zeros(1, 6, 256, 256)).shape == (1, 1, 30, 30)


@pytest.mark.parametrize("preset,size", [("unet_128", 128), ("unet_256", 256), ("unet_512", 512)])
def test_unet_presets_map_their_crop_to_the_same_size(preset, size):
    g = unet(preset, in_channels=1, out_channels=3, base_filters=4).eval()
    with torch.no_grad():
        out = g(torch.zeros(1, 1, size, size))
    assert out.shape == (1, 3, size, size)


def test_unet_output_is_bounded_by_tanh():
    g = init_weights(unet("unet_128", base_filters=8), "normal", 1.0)  # large init saturates
    with torch.no_grad():
        out = g(torch.randn(2, 3, 128, 128) * 10)
    assert out.abs().max() <= 1.0


@pytest.mark.parametrize("norm,norm_type", [("batch", nn.BatchNorm2d), ("instance", nn.InstanceNorm2d),
                                            ("syncbatch", nn.BatchNorm2d)])
def test_norm_choice_builds_that_norm_and_biases_only_where_needed(norm, norm_type):
    g = unet("unet_128", base_filters=4, norm=norm)
    assert any(isinstance(m, norm_type) for m in g.modules())
    inner_convs = [m for m in g.modules() if isinstance(m, nn.Conv2d)][1:]
    assert all((m.bias is not None) == (norm == "instance") for m in inner_convs)


def test_norm_none_has_no_norm_layers_but_keeps_biases():
    g = unet("unet_128", base_filters=4, norm="none")
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) for m in g.modules())
    assert all(m.bias is not None for m in g.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))


def test_dropout_sits_in_the_inner_decoder_blocks_only():
    assert sum(isinstance(m, nn.Dropout) for m in unet("unet_256", base_filters=4).modules()) == 3
    without = unet("unet_256", base_filters=4, dropout=False)
    assert not any(isinstance(m, nn.Dropout) for m in without.modules())


def test_pixel_discriminator_judges_every_pixel():
    d = PixelDiscriminator(in_channels=6, base_filters=8)
    with torch.no_grad():
        assert d(torch.zeros(2, 6, 40, 24)).shape == (2, 1, 40, 24)


def test_normal_init_matches_the_reference():
    torch.manual_seed(0)
    g = init_weights(unet("unet_256"), "normal", 0.02)
    convs = torch.cat([m.weight.flatten() for m in g.modules()
                       if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
    norms = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, nn.BatchNorm2d)])
    biases = [m.bias for m in g.modules() if getattr(m, "bias", None) is not None]
    assert convs.mean().abs() < 1e-3 and abs(convs.std().item() - 0.02) < 1e-3
    assert abs(norms.mean().item() - 1.0) < 2e-3 and abs(norms.std().item() - 0.02) < 2e-3
    assert all(torch.count_nonzero(b) == 0 for b in biases)


@pytest.mark.parametrize("kind", ["xavier", "kaiming"])
def test_other_inits_are_selectable_and_differ_from_normal(kind):
    torch.manual_seed(0)
    d = init_weights(PatchDiscriminator(6, 8, 3), kind, 0.02)
    first = d.model[0].weight
    assert abs(first.std().item() - 0.02) > 0.005  # not the N(0, 0.02) init


def test_unknown_init_and_norm_are_rejected():
    with pytest.raises(ValueError, match="unknown init"):
        init_weights(nn.Conv2d(1, 1, 1), "uniform")
    with pytest.raises(ValueError, match="unknown norm"):
        unet("unet_128", norm="group")
    with pytest.raises(ValueError, match="unknown generator"):
        unet("unet_1024")


def test_activation_checkpointing_gives_the_same_outputs_gradients_and_statistics():
    torch.manual_seed(0)
    plain = init_weights(unet("unet_128", base_filters=8))
    checkpointed = unet("unet_128", base_filters=8, checkpoint_blocks=3)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 128, 128)
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # same dropout masks
        for _ in range(2):
            model(x).square().mean().backward()
    for a, b in zip(plain.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    for a, b in zip(plain.buffers(), checkpointed.buffers()):  # BN stats updated once per step
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_channels_last_unet_hands_batchnorm_channels_last_gradients():
    """The skip connection's gradient is a channel slice of torch.cat's; BatchNorm's
    backward on such strides is several times slower, so U-Net levels return it in
    channels_last. The values are the NCHW model's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    layouts = []

    class BatchNormBackwardLayouts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.native_batch_norm_backward:
                grad = args[0]
                layouts.append("nchw" if grad.is_contiguous() else "channels_last"
                               if grad.is_contiguous(memory_format=torch.channels_last) else "strided")
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    nchw = init_weights(unet("unet_128", base_filters=8, dropout=False))  # masks follow the layout
    channels_last = unet("unet_128", base_filters=8, dropout=False).to(memory_format=torch.channels_last)
    channels_last.load_state_dict(nchw.state_dict())
    x = torch.randn(2, 3, 128, 128)
    for model, batch in ((nchw, x), (channels_last, x.contiguous(memory_format=torch.channels_last))):
        with BatchNormBackwardLayouts():
            model(batch).square().mean().backward()
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in nchw.modules())
    assert layouts[batchnorms:] == ["channels_last"] * batchnorms
    assert "nchw" in layouts[:batchnorms]  # NCHW gradients pass untouched (slices stay strided)
    for a, b in zip(nchw.parameters(), channels_last.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("generator", ["resnet_6blocks", "local"])
def test_residual_block_checkpointing_gives_the_same_outputs_gradients_and_statistics(generator):
    norm, size = ("batch", 32) if generator == "resnet_6blocks" else ("instance", 64)
    cfg = ModelConfig(generator=generator, g_filters=4, norm=norm, dropout=generator != "local")
    torch.manual_seed(0)
    plain = build_generator(cfg)
    checkpointed = build_generator(dataclasses.replace(cfg, activation_checkpointing=True))
    assert sum(isinstance(m, ResnetBlock) and m.checkpointed for m in checkpointed.modules()) >= 6
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, size, size)
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # same dropout masks
        for _ in range(2):
            model(x).square().mean().backward()
    for a, b in zip(plain.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    for a, b in zip(plain.buffers(), checkpointed.buffers()):  # BN stats updated once per step
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_builders_follow_the_model_config():
    cfg = ModelConfig(generator="unet_128", in_channels=1, out_channels=3, g_filters=8,
                      d_filters=8, discriminator="pixel", norm="instance")
    g, d = build_generator(cfg), build_discriminator(cfg)
    assert isinstance(g, UNetGenerator) and g.num_downs == 7
    assert isinstance(d, PixelDiscriminator) and d.model[0].in_channels == 4


def test_multiscale_discriminator_has_pix2pixhds_parameter_count_and_answers_per_scale():
    from pipeline.models import MultiscaleDiscriminator
    D = MultiscaleDiscriminator(num_d=2, in_channels=6, norm="instance")
    assert count(D) == 5_535_618
    for size, grids in ((256, (30, 14)), (512, (62, 30))):
        answers = D(torch.rand(1, 6, size, size))
        assert len(answers) == 2 and all(len(scale) == 5 for scale in answers)  # n_layers + 2
        assert [scale[-1].shape[-1] for scale in answers] == list(grids)
        assert [t.shape[1] for t in answers[0]] == [64, 128, 256, 512, 1]
    # each scale's logits are its PatchGAN's, on the pair pooled k times
    pair = torch.rand(1, 6, 64, 64)
    torch.testing.assert_close(D(pair)[1][-1], D.scales[1](D.downsample(pair)), rtol=0, atol=0)


def test_ema_moves_toward_the_model_and_copies_its_buffers():
    from pipeline.models import update_ema
    model, ema = (unet("unet_128", base_filters=8) for _ in range(2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
        for p in ema.parameters():
            p.fill_(0.0)
        next(b for b in model.buffers() if b.is_floating_point()).fill_(3.0)
    update_ema(ema, model, decay=0.9)
    assert all(torch.allclose(p, torch.full_like(p, 0.1)) for p in ema.parameters())
    assert all(torch.equal(a, b) for a, b in zip(ema.buffers(), model.buffers()))
