"""The GAN step: it learns, and each update touches only its own network."""
import pytest
import torch

from pipeline.gan import StepHooks, train_step
from pipeline.losses import Pix2PixObjective
from pipeline.models import PatchDiscriminator, init_weights, unet


def tiny_setup(seed: int = 0):
    torch.manual_seed(seed)
    G = init_weights(unet("unet_128", base_filters=8))
    D = init_weights(PatchDiscriminator(6, 8, 3))
    adam = dict(lr=2e-4, betas=(0.5, 0.999))
    return G, D, torch.optim.Adam(G.parameters(), **adam), torch.optim.Adam(D.parameters(), **adam)


def fixed_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 128, 128, generator=g) * 2 - 1
    return x, x.flip(-1) * 0.5  # the target is a known function of the input


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def test_twenty_steps_lower_l1_on_a_fixed_batch():
    G, D, opt_G, opt_D = tiny_setup()
    x, y = fixed_batch()
    losses = [train_step(G, D, opt_G, opt_D, x, y, Pix2PixObjective()) for _ in range(20)]
    assert all(set(step) == {"loss_D", "loss_G", "loss_G_gan", "loss_G_l1"} for step in losses)
    assert all(isinstance(v, float) for v in losses[-1].values())
    l1 = [step["loss_G_l1"] for step in losses]
    assert l1[-1] < 0.97 * l1[0]
    assert sum(l1[-5:]) < sum(l1[:5])  # a trend, not one lucky step


def test_d_update_leaves_g_alone_and_g_update_leaves_d_alone():
    G, D, opt_G, opt_D = tiny_setup()
    x, y = fixed_batch()
    before = {"G": snapshot(G), "D": snapshot(D)}
    seen = {}

    def record_step(optimizer, model):  # parameters as each optimiser step leaves them
        optimizer.step()
        seen[model] = {"G": snapshot(G), "D": snapshot(D)}

    train_step(G, D, opt_G, opt_D, x, y, Pix2PixObjective(), StepHooks(step=record_step))
    after_d, after_g = seen[D], seen[G]
    assert all(torch.equal(a, b) for a, b in zip(before["G"], after_d["G"])), "D step changed G"
    assert not all(torch.equal(a, b) for a, b in zip(before["D"], after_d["D"])), "D did not learn"
    assert all(torch.equal(a, b) for a, b in zip(after_d["D"], after_g["D"])), "G step changed D"
    assert not all(torch.equal(a, b) for a, b in zip(after_d["G"], after_g["G"])), "G did not learn"


def test_g_loss_leaves_no_gradient_in_d():
    G, D, opt_G, opt_D = tiny_setup()
    x, y = fixed_batch()
    d_grads = {}

    def backward(loss, model):  # D's gradients right after each backward
        loss.backward()
        d_grads[model] = [p.grad.clone() for p in D.parameters()]

    train_step(G, D, opt_G, opt_D, x, y, Pix2PixObjective(), StepHooks(backward=backward))
    for from_d_loss, after_g_loss in zip(d_grads[D], d_grads[G]):
        assert torch.equal(from_d_loss, after_g_loss), "G's loss leaked a gradient into D"
    assert all(p.requires_grad for p in D.parameters()), "D must be trainable after the step"


def test_hooks_carry_autocast_into_the_forward_passes():
    G, D, opt_G, opt_D = tiny_setup()
    x, y = fixed_batch()
    dtypes = []
    handle = G.model.model[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    bf16 = StepHooks(autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    losses = train_step(G, D, opt_G, opt_D, x, y, Pix2PixObjective(), bf16)
    handle.remove()
    assert dtypes == [torch.bfloat16]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


@pytest.mark.parametrize("gan", ["vanilla", "lsgan", "hinge"])
def test_every_gan_loss_trains(gan):
    G, D, opt_G, opt_D = tiny_setup()
    x, y = fixed_batch()
    first = train_step(G, D, opt_G, opt_D, x, y, Pix2PixObjective(gan))
    for _ in range(9):
        last = train_step(G, D, opt_G, opt_D, x, y, Pix2PixObjective(gan))
    assert last["loss_G_l1"] < first["loss_G_l1"]


def test_a_multiscale_d_with_feature_matching_trains_and_reports_the_term():
    from pipeline.config import ModelConfig
    from pipeline.models import build_discriminator, build_generator
    cfg = ModelConfig(generator="resnet_6blocks", g_filters=8, d_filters=8, discriminator="multiscale",
                      norm="instance", dropout=False)
    torch.manual_seed(0)
    G, D = build_generator(cfg), build_discriminator(cfg)
    opt_G, opt_D = (torch.optim.Adam(m.parameters(), 2e-4, betas=(0.5, 0.999)) for m in (G, D))
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    objective = Pix2PixObjective("lsgan", lambda_feat=10.0)
    losses = [train_step(G, D, opt_G, opt_D, x, y, objective) for _ in range(3)]
    assert all(set(step) == {"loss_D", "loss_G", "loss_G_gan", "loss_G_l1", "loss_G_feat"} for step in losses)
    assert all(step["loss_G_feat"] > 0 for step in losses)
    assert losses[-1]["loss_G_l1"] < losses[0]["loss_G_l1"]


def _hd_models(seed=0):
    from pipeline.config import ModelConfig
    from pipeline.models import build_discriminator, build_generator
    cfg = ModelConfig(generator="resnet_6blocks", g_filters=8, d_filters=8, norm="instance", dropout=False)
    torch.manual_seed(seed)
    G, D = build_generator(cfg), build_discriminator(cfg)
    # SGD: the update is linear in the gradient, so equal gradients give equal weights
    # (Adam's g / sqrt(v) turns last-bit differences of near-zero gradients into lr-sized ones)
    opt_G, opt_D = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (G, D))
    return G, D, opt_G, opt_D


def test_accumulating_k_micro_batches_equals_one_batch_k_times_larger():
    """fp32, instance norm (statistics per image): grad_accum 2 x batch 2 == 1 x batch 4."""
    from pipeline.gan import train_step_accumulated
    torch.manual_seed(1)
    batches = [(torch.rand(4, 3, 32, 32) * 2 - 1, torch.rand(4, 3, 32, 32) * 2 - 1) for _ in range(3)]
    whole, accumulated = _hd_models(), _hd_models()
    for x, y in batches:
        a = train_step(*whole, x, y, Pix2PixObjective())
        b = train_step_accumulated(*accumulated, [x[:2], x[2:]], [y[:2], y[2:]], Pix2PixObjective())
        assert a.keys() == b.keys()
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=1e-5), name
    for model_a, model_b in zip(whole[:2], accumulated[:2]):
        for p, q in zip(model_a.parameters(), model_b.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_accumulation_replays_dropout_and_moves_batchnorm_once_per_micro_batch():
    """The fakes D judged are the ones G is trained through (same dropout masks), and the
    running statistics end as after one forward per micro-batch, not two."""
    import copy

    from pipeline.gan import train_step_accumulated
    torch.manual_seed(0)
    G, D = unet("unet_128", base_filters=8), PatchDiscriminator(base_filters=8)
    init_weights(G), init_weights(D)
    before = copy.deepcopy(G)
    xs = [torch.rand(1, 3, 128, 128) * 2 - 1 for _ in range(2)]
    ys = [torch.rand(1, 3, 128, 128) * 2 - 1 for _ in range(2)]
    torch.manual_seed(5)
    with torch.no_grad():
        expected = [before(x) for x in xs]  # the masks the step's no-grad forwards draw
    seen = []
    G.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    torch.manual_seed(5)
    opt = lambda m: torch.optim.SGD(m.parameters(), lr=0.0)  # weights stay: compare outputs
    train_step_accumulated(G, D, opt(G), opt(D), xs, ys, Pix2PixObjective())
    assert len(seen) == 4  # 2 no-grad forwards for D, 2 recomputed for G's update
    for i in range(2):
        assert torch.equal(seen[i], expected[i]) and torch.equal(seen[2 + i], expected[i])
    for b_after, b_before in zip(G.buffers(), before.buffers()):
        assert torch.equal(b_after, b_before)  # `before` ran one forward per micro-batch too
