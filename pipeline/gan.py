"""One pix2pix training step as plain functions: D update, then G update with D frozen.

No I/O, no devices, no distribution: the trainer supplies small hooks (how to run
backward, which autocast to use, how to reach D without its DDP wrapper) so the same
step runs single-process, under DDP and under DeepSpeed.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from pipeline.losses import Pix2PixObjective


def _plain_backward(loss: torch.Tensor, model: nn.Module) -> None:
    loss.backward()


def _plain_step(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    optimizer.step()


@dataclass
class StepHooks:
    """What the trainer changes about a step.

    backward(loss, model): e.g. accelerator.backward or a DeepSpeed engine's backward.
    step(optimizer, model): the optimiser step (clipping, a DeepSpeed engine's step).
    autocast(): the mixed-precision context for the forward passes.
    frozen_view(model): the module to call for D in the G step; the unwrapped module
        under DDP, so that a D whose parameters are frozen triggers no all-reduce.
    no_sync(model): the context of an accumulation micro-step that does not update
        (DDP's no_sync: no all-reduce until the last one).
    engine_accumulates: the engine divides each micro-step's loss by K itself and wants
        step() after every micro-step, updating at the K-th (DeepSpeed's own accumulation).
    """
    backward: Callable[[torch.Tensor, nn.Module], None] = _plain_backward
    step: Callable[[torch.optim.Optimizer, nn.Module], None] = _plain_step
    autocast: Callable[[], AbstractContextManager] = field(default=nullcontext)
    frozen_view: Callable[[nn.Module], nn.Module] = field(default=lambda model: model)
    no_sync: Callable[[nn.Module], AbstractContextManager] = field(default=lambda model: nullcontext())
    engine_accumulates: bool = False


def finite_gradients(model: nn.Module) -> bool:
    """Sums, not isfinite(): a NaN or inf anywhere makes its sum non-finite, and a sum
    reads each gradient once without a mask as large as the model (17x faster for
    unet_256 on a CPU, where the mask cost ~20% of a step)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return not grads or bool(torch.stack([g.sum() for g in grads]).isfinite().all())


def guard_updates(hooks: StepHooks, on_nonfinite: Callable[[nn.Module], None]) -> StepHooks:
    """`hooks` whose step never applies a NaN or inf gradient: it calls
    `on_nonfinite(model)` instead (which may raise to stop the run) and drops the
    gradients. Under DDP they are all-reduced by now, and a NaN or inf on any rank stays
    non-finite in the sum: every rank decides the same without another collective."""
    def step(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        if finite_gradients(model):
            hooks.step(optimizer, model)
        else:
            on_nonfinite(model)
            optimizer.zero_grad(set_to_none=True)
    return dataclasses.replace(hooks, step=step)


def freeze_while(hooks: StepHooks, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                 active: Callable[[], bool]) -> StepHooks:
    """`hooks` whose step leaves `params` unchanged while active(): their gradients are
    dropped before `optimizer` steps, so Adam neither moves them nor starts their state
    (they begin fresh when released, as pix2pixHD's new optimiser does). They stay in the
    optimiser and in DDP's all-reduce from the start."""
    def step(opt: torch.optim.Optimizer, model: nn.Module) -> None:
        if opt is optimizer and active():
            for p in params:
                p.grad = None
        hooks.step(opt, model)
    return dataclasses.replace(hooks, step=step)


def set_requires_grad(model: nn.Module, flag: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(flag)


def train_step(G: nn.Module, D: nn.Module, opt_G: torch.optim.Optimizer,
               opt_D: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               objective: Pix2PixObjective, hooks: StepHooks = StepHooks()) -> dict[str, float]:
    """One D update on (x, y) real and (x, G(x)) fake, then one G update, in the
    reference's order. Returns the losses as floats."""
    with hooks.autocast():
        fake = G(x)

    set_requires_grad(D, True)
    opt_D.zero_grad(set_to_none=True)
    with hooks.autocast():
        # The fake is detached: D's loss must not reach G.
        fake_logits = D(torch.cat([x, fake.detach()], 1))
        real_logits = D(torch.cat([x, y], 1))
    loss_D = objective.discriminator(real_logits, fake_logits)
    hooks.backward(loss_D, D)
    hooks.step(opt_D, D)

    # D frozen: G's loss must leave no gradient in D (under ZeRO-1 it would leak into
    # D's next update; under ZeRO-2 it fails outright).
    set_requires_grad(D, False)
    opt_G.zero_grad(set_to_none=True)
    with hooks.autocast():
        fake_logits = hooks.frozen_view(D)(torch.cat([x, fake], 1))
    real_features = None
    if objective.wants_real_features:  # feature matching: the updated D on the real pair
        with hooks.autocast(), torch.no_grad():
            real_features = hooks.frozen_view(D)(torch.cat([x, y], 1))
    loss_G = objective.generator(fake_logits, fake, y, real_features)
    hooks.backward(loss_G.total, G)
    hooks.step(opt_G, G)
    set_requires_grad(D, True)

    terms = {"loss_D": loss_D, **loss_G.terms()}
    return dict(zip(terms, torch.stack([v.detach() for v in terms.values()]).tolist()))  # one device sync


# --------------------------------------------------------------------------- accumulation

def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _fakes_to_judge(G: nn.Module, xs: list[torch.Tensor], hooks: StepHooks) -> tuple[list, list]:
    """(the RNG state before each, G(x) for each x) from no-grad forwards, G's buffers left
    as they were: the G micro-steps replay each state and move the buffers once."""
    device = xs[0].device
    buffers = [b.clone() for b in G.buffers()]
    states, fakes = [], []
    with torch.no_grad():
        for x in xs:
            states.append(_rng_state(device))
            with hooks.autocast():
                fakes.append(hooks.frozen_view(G)(x))
        for buffer, saved in zip(G.buffers(), buffers):
            buffer.copy_(saved)
    return states, fakes


def train_step_accumulated(G: nn.Module, D: nn.Module, opt_G: torch.optim.Optimizer,
                           opt_D: torch.optim.Optimizer, xs: list[torch.Tensor], ys: list[torch.Tensor],
                           objective: Pix2PixObjective, hooks: StepHooks = StepHooks()) -> dict[str, float]:
    """train_step over K = len(xs) micro-batches: K D micro-steps and one D update, then K G
    micro-steps and one G update, so G always meets the updated D. Each micro-step's loss
    is divided by K (the gradient of the mean over the K micro-batches); only the last of
    each K all-reduces (hooks.no_sync); an engine that accumulates itself (DeepSpeed) does
    both and steps every micro-step (hooks.engine_accumulates). The fakes the D
    micro-steps judge come from no-grad forwards; the G micro-steps recompute them one at
    a time with the same dropout masks (the RNG state of each is replayed) and G's buffers
    as they were, so G's activations are held for one micro-batch only and BatchNorm's
    running statistics move once per micro-batch. Returns the losses averaged over the
    micro-batches."""
    run = _Accumulation(len(xs), hooks)
    states, fakes = _fakes_to_judge(G, xs, hooks)
    _discriminator_micro_steps(D, opt_D, xs, ys, fakes, objective, run)
    _generator_micro_steps(G, D, opt_G, xs, ys, states, objective, run)
    set_requires_grad(D, True)
    names = list(run.totals)
    return dict(zip(names, torch.stack([run.totals[n] for n in names]).tolist()))


class _Accumulation:
    """What K micro-steps of one update share: the loss scale, the step between micro-steps
    (DeepSpeed's own accumulation) or none, and the losses' running means."""

    def __init__(self, k: int, hooks: StepHooks):
        self.k, self.hooks = k, hooks
        self.scale = 1.0 if hooks.engine_accumulates else 1.0 / k
        self.totals: dict[str, torch.Tensor] = {}

    def last(self, i: int) -> bool:
        return i == self.k - 1

    def micro_step(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        if self.hooks.engine_accumulates:
            self.hooks.step(optimizer, model)

    def add(self, name: str, value: torch.Tensor) -> None:
        self.totals[name] = self.totals.get(name, 0) + value.detach() / self.k


def _discriminator_micro_steps(D: nn.Module, opt_D: torch.optim.Optimizer, xs: list[torch.Tensor],
                               ys: list[torch.Tensor], fakes: list[torch.Tensor],
                               objective: Pix2PixObjective, run: _Accumulation) -> None:
    hooks = run.hooks
    set_requires_grad(D, True)
    opt_D.zero_grad(set_to_none=True)
    for i, (x, y, fake) in enumerate(zip(xs, ys, fakes)):
        with hooks.no_sync(D) if not run.last(i) else nullcontext():
            with hooks.autocast():
                fake_logits = D(torch.cat([x, fake], 1))  # fake first, as train_step
                real_logits = D(torch.cat([x, y], 1))
            loss_D = objective.discriminator(real_logits, fake_logits)
            hooks.backward(loss_D * run.scale, D)
        run.add("loss_D", loss_D)
        if not run.last(i):
            run.micro_step(opt_D, D)
    hooks.step(opt_D, D)


def _generator_micro_steps(G: nn.Module, D: nn.Module, opt_G: torch.optim.Optimizer,
                           xs: list[torch.Tensor], ys: list[torch.Tensor], states: list,
                           objective: Pix2PixObjective, run: _Accumulation) -> None:
    hooks, device = run.hooks, xs[0].device
    set_requires_grad(D, False)
    opt_G.zero_grad(set_to_none=True)
    for i, (x, y, state) in enumerate(zip(xs, ys, states)):
        _set_rng_state(device, state)
        with hooks.no_sync(G) if not run.last(i) else nullcontext():
            with hooks.autocast():
                fake = G(x)
                fake_logits = hooks.frozen_view(D)(torch.cat([x, fake], 1))
            real_features = None
            if objective.wants_real_features:
                with hooks.autocast(), torch.no_grad():
                    real_features = hooks.frozen_view(D)(torch.cat([x, y], 1))
            loss_G = objective.generator(fake_logits, fake, y, real_features)
            hooks.backward(loss_G.total * run.scale, G)
        if not run.last(i):
            run.micro_step(opt_G, G)
        for name, value in loss_G.terms().items():
            run.add(name, value)
    hooks.step(opt_G, G)
