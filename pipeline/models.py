"""The networks (pure torch): pix2pix's U-Net and PatchGAN, the reference's ResNet
generator, and pix2pixHD's global and local generators and multi-scale discriminator.

The structure follows the reference implementations (junyanz/pytorch-CycleGAN-and-pix2pix,
NVIDIA/pix2pixHD) layer for layer, so parameter counts match them exactly: unet_256 with
batch norm has 54,413,955 parameters, the 70x70 PatchGAN on 6 channels 2,768,705,
resnet_9blocks 11,383,427, global 182,443,267, local 182,701,827, the 2-scale D 5,535,618.
This module owns the networks and their registries (GENERATORS, DISCRIMINATORS) and builds
them from a ModelConfig; what they are made of (norms, inits, activation checkpointing,
test modes, the EMA) is pipeline/layers.py's, re-exported here. Nothing here knows about
devices, distribution or files.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.layers import (  # noqa: F401 - re-exported: pipeline.models is the networks' API
    INITS,
    NORMS,
    Choice,
    checkpointed,
    conv_bias,
    init_weights,
    norm_layer,
    set_test_mode,
    update_ema,
)


class _GradInInputLayout(torch.autograd.Function):
    """The identity, whose gradient comes back in channels_last when its input was.

    The gradient reaching a U-Net level's output is a channel slice of its parent's
    torch.cat gradient: in channels_last such a slice is neither contiguous nor
    channels_last, and BatchNorm's backward on those strides runs 3-10x slower (bf16 on an
    AMX CPU: 1.4x on the whole unet_256 step at batch 4). A copy into channels_last costs
    far less. Values are unchanged. Applied only to channels_last tensors that need a
    gradient (training): NCHW steps, inference and exports never see it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


def _channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class UNetBlock(nn.Module):
    """One level of the U-Net: down, the inner levels, up, and the skip connection.

    Built from the innermost level outwards, as the reference does. Non-outermost blocks
    return cat(input, processed), doubling the channels their parent's up-conv sees.
    """

    def __init__(self, outer_channels: int, inner_channels: int, *, in_channels: int | None = None,
                 submodule: nn.Module | None = None, outermost: bool = False,
                 innermost: bool = False, norm: str = "batch", dropout: bool = False):
        super().__init__()
        self.outermost = outermost
        in_channels = outer_channels if in_channels is None else in_channels
        bias = conv_bias(norm)
        down_conv = nn.Conv2d(in_channels, inner_channels, 4, stride=2, padding=1, bias=bias)
        up_in = inner_channels if innermost else inner_channels * 2
        if outermost:
            up_conv = nn.ConvTranspose2d(up_in, outer_channels, 4, stride=2, padding=1)
            layers = [down_conv, submodule, nn.ReLU(True), up_conv, nn.Tanh()]
        else:
            up_conv = nn.ConvTranspose2d(up_in, outer_channels, 4, stride=2, padding=1, bias=bias)
            down = [nn.LeakyReLU(0.2), down_conv]
            if not innermost:
                down.append(norm_layer(norm, inner_channels))
            inner = [] if innermost else [submodule]
            up = [nn.ReLU(True), up_conv, norm_layer(norm, outer_channels)]
            layers = down + inner + up + ([nn.Dropout(0.5)] if dropout else [])
        self.model = nn.Sequential(*layers)
        self.checkpointed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        if self.checkpointed and torch.is_grad_enabled():
            inner = checkpointed(self.model, x)
        else:
            inner = self.model(x)
        if inner.requires_grad and _channels_last(inner):
            inner = _GradInInputLayout.apply(inner)
        return torch.cat([x, inner], 1)


class UNetGenerator(nn.Module):
    """U-Net with `num_downs` stride-2 levels: a crop of 2**num_downs goes down to 1x1.

    Filters double from base_filters up to 8x base_filters; the num_downs - 5 innermost
    non-bottleneck levels use dropout 0.5 when `dropout` is on.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, num_downs: int = 8,
                 base_filters: int = 64, norm: str = "batch", dropout: bool = True,
                 checkpoint_blocks: int = 0):
        super().__init__()
        if num_downs < 5:
            raise ValueError(f"num_downs must be >= 5, got {num_downs}")
        self.num_downs = num_downs
        nf = base_filters
        block = UNetBlock(nf * 8, nf * 8, innermost=True, norm=norm)
        for _ in range(num_downs - 5):
            block = UNetBlock(nf * 8, nf * 8, submodule=block, norm=norm, dropout=dropout)
        for outer, inner in ((nf * 4, nf * 8), (nf * 2, nf * 4), (nf, nf * 2)):
            block = UNetBlock(outer, inner, submodule=block, norm=norm)
        self.model = UNetBlock(out_channels, nf, in_channels=in_channels, submodule=block,
                               outermost=True, norm=norm)
        self.set_activation_checkpointing(checkpoint_blocks)

    def set_activation_checkpointing(self, blocks: int) -> None:
        """Recompute the `blocks` outermost inner levels in backward instead of storing
        their activations: the outer levels hold the large (full and half resolution)
        activations, so they save most memory for a modest recompute."""
        levels = [m for m in self.modules() if isinstance(m, UNetBlock) and not m.outermost]
        for depth, level in enumerate(levels):  # modules() walks from the outside in
            level.checkpointed = depth < blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


UNET_DOWNS = {"unet_128": 7, "unet_256": 8, "unet_512": 9}  # preset -> downsamplings


def unet(preset: str, **kwargs) -> UNetGenerator:
    """`unet_128`, `unet_256` or `unet_512`: the U-Net for that crop size."""
    if preset not in UNET_DOWNS:
        raise ValueError(f"unknown generator {preset!r}: expected one of {', '.join(UNET_DOWNS)}")
    return UNetGenerator(num_downs=UNET_DOWNS[preset], **kwargs)


class ResnetBlock(nn.Module):
    """x + (reflect-pad, 3x3 conv, norm, ReLU, [dropout 0.5], reflect-pad, 3x3 conv, norm)."""

    def __init__(self, channels: int, norm: str, dropout: bool):
        super().__init__()
        bias = conv_bias(norm)
        layers = [nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=bias),
                  norm_layer(norm, channels), nn.ReLU(True)]
        if dropout:
            layers.append(nn.Dropout(0.5))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=bias),
                   norm_layer(norm, channels)]
        self.conv_block = nn.Sequential(*layers)
        self.checkpointed = False  # model.activation_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointed and torch.is_grad_enabled():
            return x + checkpointed(self.conv_block, x)
        return x + self.conv_block(x)


def checkpoint_residual_blocks(model: nn.Module, on: bool = True) -> nn.Module:
    """Activation checkpointing for the ResNet-style generators: every residual block
    keeps only its input for the backward pass (the blocks hold most of the activations
    at 1/4 or 1/16 resolution and most of the compute, so this costs ~1/3 more G time)."""
    for module in model.modules():
        if isinstance(module, ResnetBlock):
            module.checkpointed = on
    return model


class ResnetGenerator(nn.Module):
    """The reference's ResnetGenerator (Johnson et al.'s): a 7x7 conv, `downsamplings` stride-2
    convs, `blocks` residual blocks at 2**downsamplings x base_filters, as many
    transposed-conv upsamplings, a 7x7 conv and tanh. Inputs must be multiples of
    2**downsamplings pixels. With 4 downsamplings and 9 blocks it is pix2pixHD's
    GlobalGenerator."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, blocks: int = 9,
                 base_filters: int = 64, norm: str = "batch", dropout: bool = False,
                 downsamplings: int = 2):
        super().__init__()
        bias, nf = conv_bias(norm), base_filters
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, nf, 7, bias=bias), norm_layer(norm, nf),
                  nn.ReLU(True)]
        for i in range(downsamplings):
            c = nf * 2 ** i
            layers += [nn.Conv2d(c, c * 2, 3, stride=2, padding=1, bias=bias), norm_layer(norm, c * 2),
                       nn.ReLU(True)]
        width = nf * 2 ** downsamplings
        layers += [ResnetBlock(width, norm, dropout) for _ in range(blocks)]
        for i in range(downsamplings):
            c = width // 2 ** i
            layers += [nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1, bias=bias),
                       norm_layer(norm, c // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(nf, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


RESNET_BLOCKS = {"resnet_6blocks": 6, "resnet_9blocks": 9}  # preset -> residual blocks
HEAD = 3  # a ResnetGenerator's last layers: reflection pad, 7x7 conv, tanh


class LocalEnhancer(nn.Module):
    """pix2pixHD's LocalEnhancer with one enhancer: a GlobalGenerator at 2 x base_filters
    (4 downsamplings, 9 blocks, without its last HEAD layers) translates the input pooled
    to half size; the enhancer (a 7x7 and a stride-2 conv at base_filters, `local_blocks`
    residual blocks, an upsampling and the 7x7 head) adds the full-resolution detail to
    its features. `global_part` holds the global generator's layers under the indices a
    `global` run's G has them (model.N -> global_part.N), for staged training."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, base_filters: int = 32,
                 norm: str = "instance", global_downsamplings: int = 4, global_blocks: int = 9,
                 local_blocks: int = 3):
        super().__init__()
        bias, nf = conv_bias(norm), base_filters
        global_gen = ResnetGenerator(in_channels, out_channels, global_blocks, nf * 2, norm,
                                     downsamplings=global_downsamplings)
        self.global_part = nn.Sequential(*list(global_gen.model)[:-HEAD])
        self.local_down = nn.Sequential(
            nn.ReflectionPad2d(3), nn.Conv2d(in_channels, nf, 7, bias=bias), norm_layer(norm, nf),
            nn.ReLU(True), nn.Conv2d(nf, nf * 2, 3, stride=2, padding=1, bias=bias),
            norm_layer(norm, nf * 2), nn.ReLU(True))
        self.local_up = nn.Sequential(
            *[ResnetBlock(nf * 2, norm, dropout=False) for _ in range(local_blocks)],
            nn.ConvTranspose2d(nf * 2, nf, 3, stride=2, padding=1, output_padding=1, bias=bias),
            norm_layer(norm, nf), nn.ReLU(True),
            nn.ReflectionPad2d(3), nn.Conv2d(nf, out_channels, 7), nn.Tanh())
        self.downsample = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_up(self.local_down(x) + self.global_part(self.downsample(x)))

    def frozen_part(self) -> list[nn.Parameter]:
        """What train.freeze_global_steps holds still: the global generator's parameters."""
        return list(self.global_part.parameters())


def initialise_from(model: nn.Module, name: str, source: nn.Module, source_name: str) -> None:
    """Copy a trained generator's weights into `model` (model.init_from): the same
    architecture whole, or a `global` generator into a `local` one's global part
    (pix2pixHD's staged training: train global at half resolution, then local around it).
    ValueError when the two do not fit."""
    if source_name == name:
        model.load_state_dict(source.state_dict())
        return
    if not (name == "local" and source_name == "global"):
        raise ValueError(f"a {name} generator cannot start from a {source_name} one (only the same "
                         "generator, or global into local)")
    kept = len(source.model) - HEAD
    mapped = {k.replace("model.", "global_part.", 1): v for k, v in source.state_dict().items()
              if int(k.split(".")[1]) < kept}
    result = model.load_state_dict(mapped, strict=False)
    if result.unexpected_keys or any(k.startswith("global_part.") for k in result.missing_keys):
        raise ValueError(f"the global generator's layers do not fit this local one's global part "
                         f"({len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected)")


class PatchDiscriminator(nn.Module):
    """PatchGAN: classifies each overlapping patch of an (input, output) pair.

    n_layers=3 gives the 70x70 receptive field: 6x256x256 -> 1x30x30 logits.
    """

    def __init__(self, in_channels: int = 6, base_filters: int = 64, n_layers: int = 3,
                 norm: str = "batch"):
        super().__init__()
        bias = conv_bias(norm)
        nf = base_filters
        layers = [nn.Conv2d(in_channels, nf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last feature layer keeps resolution
            layers += [nn.Conv2d(nf * prev, nf * mult, 4, stride=stride, padding=1, bias=bias),
                       norm_layer(norm, nf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(nf * mult, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return self.model(pair)

    def features(self, pair: torch.Tensor) -> list[torch.Tensor]:
        """Every block's output (after each LeakyReLU), the logits last: what feature
        matching compares (n_layers + 2 tensors)."""
        out = []
        for layer in self.model:
            pair = layer(pair)
            if isinstance(layer, nn.LeakyReLU):
                out.append(pair)
        return [*out, pair]


class MultiscaleDiscriminator(nn.Module):
    """pix2pixHD's multi-scale D: `num_d` PatchGANs, copy k judging the pair downsampled k
    times (3x3 average pooling, stride 2, not counting the padding), each answering with
    its features (PatchDiscriminator.features). Our PatchGAN pads its 4x4 convs by 1, as
    pix2pix does; pix2pixHD pads by 2, so its maps are 1 px larger per layer (the same
    parameters: 5,535,618 for num_d 2, instance norm, 6 input channels)."""

    def __init__(self, num_d: int = 2, in_channels: int = 6, base_filters: int = 64,
                 n_layers: int = 3, norm: str = "instance"):
        super().__init__()
        self.scales = nn.ModuleList(PatchDiscriminator(in_channels, base_filters, n_layers, norm)
                                    for _ in range(num_d))
        self.downsample = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)

    def forward(self, pair: torch.Tensor) -> list[list[torch.Tensor]]:
        answers = []
        for k, scale in enumerate(self.scales):
            if k:
                pair = self.downsample(pair)
            answers.append(scale.features(pair))
        return answers


class PixelDiscriminator(nn.Module):
    """1x1 PatchGAN: judges every pixel's colour given the input pixel."""

    def __init__(self, in_channels: int = 6, base_filters: int = 64, norm: str = "batch"):
        super().__init__()
        bias = conv_bias(norm)
        nf = base_filters
        self.model = nn.Sequential(
            nn.Conv2d(in_channels, nf, 1), nn.LeakyReLU(0.2, True),
            nn.Conv2d(nf, nf * 2, 1, bias=bias), norm_layer(norm, nf * 2), nn.LeakyReLU(0.2, True),
            nn.Conv2d(nf * 2, 1, 1, bias=bias))

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return self.model(pair)



def _unet_from_config(cfg) -> UNetGenerator:
    return unet(cfg.generator, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                base_filters=cfg.g_filters, norm=cfg.norm, dropout=cfg.dropout,
                checkpoint_blocks=2 if cfg.activation_checkpointing else 0)


def _resnet_from_config(cfg) -> ResnetGenerator:
    model = ResnetGenerator(cfg.in_channels, cfg.out_channels, RESNET_BLOCKS[cfg.generator],
                            base_filters=cfg.g_filters, norm=cfg.norm, dropout=cfg.dropout)
    return checkpoint_residual_blocks(model, cfg.activation_checkpointing)


def _global_from_config(cfg) -> ResnetGenerator:
    model = ResnetGenerator(cfg.in_channels, cfg.out_channels, 9, base_filters=cfg.g_filters,
                            norm=cfg.norm, dropout=cfg.dropout, downsamplings=4)
    return checkpoint_residual_blocks(model, cfg.activation_checkpointing)


def _local_from_config(cfg) -> LocalEnhancer:
    model = LocalEnhancer(cfg.in_channels, cfg.out_channels, base_filters=cfg.g_filters, norm=cfg.norm)
    return checkpoint_residual_blocks(model, cfg.activation_checkpointing)


def _patch_from_config(cfg) -> PatchDiscriminator:
    return PatchDiscriminator(cfg.in_channels + cfg.out_channels, cfg.d_filters, cfg.d_layers,
                              cfg.norm)


def _multiscale_from_config(cfg) -> MultiscaleDiscriminator:
    return MultiscaleDiscriminator(cfg.num_d, cfg.in_channels + cfg.out_channels, cfg.d_filters,
                                   cfg.d_layers, cfg.norm)


def _pixel_from_config(cfg) -> PixelDiscriminator:
    return PixelDiscriminator(cfg.in_channels + cfg.out_channels, cfg.d_filters, cfg.norm)


GENERATORS = {name: Choice(_unet_from_config, f"U-Net, {downs} downsamplings ({2 ** downs} px crops)",
                           size_multiple=2 ** downs) for name, downs in UNET_DOWNS.items()}
GENERATORS.update({name: Choice(_resnet_from_config, f"ResNet, {blocks} residual blocks at 1/4 "
                                "resolution (the reference's ResnetGenerator)",
                                size_multiple=4)
                   for name, blocks in RESNET_BLOCKS.items()})
GENERATORS["global"] = Choice(_global_from_config, "pix2pixHD's GlobalGenerator: 4 downsamplings, "
                              "9 residual blocks (g_filters 64, norm instance in pix2pixHD)",
                              size_multiple=16)
GENERATORS["local"] = Choice(_local_from_config, "pix2pixHD's LocalEnhancer, one enhancer at g_filters "
                             "(32 in pix2pixHD) around a global generator at 2 x g_filters",
                             size_multiple=32)
DISCRIMINATORS = {
    "patch": Choice(_patch_from_config, "PatchGAN with d_layers strided convs (70x70 for 3)"),
    "pixel": Choice(_pixel_from_config, "1x1 PatchGAN: judges every pixel given its input"),
    "multiscale": Choice(_multiscale_from_config, "pix2pixHD's num_d PatchGANs at 1, 1/2, 1/4... "
                         "resolution, answering with their features (for loss.lambda_feat)"),
}


def size_multiple(generator: str) -> int:
    """What the height and width of a generator's input must be multiples of."""
    return GENERATORS[generator].size_multiple


def build_generator(cfg) -> nn.Module:
    """The generator a ModelConfig describes, initialised."""
    return init_weights(GENERATORS[cfg.generator].build(cfg), cfg.init, cfg.init_gain)


def build_discriminator(cfg) -> nn.Module:
    """The conditional discriminator a ModelConfig describes: it sees input and output."""
    return init_weights(DISCRIMINATORS[cfg.discriminator].build(cfg), cfg.init, cfg.init_gain)

