"""Deep Compression Autoencoder (DC-AE; Chen et al. 2024, "Deep Compression Autoencoder for Efficient
High-Resolution Diffusion Models") in the key layout and semantics of diffusers' `AutoencoderDC`.

Why this family: every resolution change is a parameter-free pixel-unshuffle / pixel-shuffle
shortcut plus a learned residual, so the network's widest convolutions run at the latent
resolution, where a CPU can afford them, instead of at full resolution as in CompVis' autoencoder.
With the first stage's layer count set to 0 (our bundled configs), the only full-resolution
convolutions are the 3 -> C/4 input conv and the C -> 12 output conv.

Module and parameter names are the checkpoint format (diffusers' `encoder.down_blocks.i.j.*`,
`decoder.up_blocks.i.j.*`), so our exports load into diffusers and diffusers-format DC-AE files load
here. Only ResBlock stages are implemented: checkpoints with EfficientViT (linear attention) stages,
such as the released SANA DC-AEs, are refused with a clear error.
"""

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "mish": nn.Mish}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class RMSNorm2d(nn.Module):
    """RMS normalisation over the channels of an NCHW tensor, with a per-channel scale and bias
    (diffusers' RMSNorm applied channels-last; the mean square is taken in float32)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(x.float().pow(2).mean(1, keepdim=True) + self.eps)
        return (x * scale).to(x.dtype) * self.weight[:, None, None] + self.bias[:, None, None]


def normalization(kind: str, channels: int) -> nn.Module:
    if kind == "rms_norm":
        return RMSNorm2d(channels)
    if kind == "batch_norm":
        return nn.BatchNorm2d(channels, eps=1e-5)
    raise ValueError(f"unsupported norm type {kind!r}; known: rms_norm, batch_norm")


class ResBlock(nn.Module):
    """x + norm(conv2(act(conv1(x)))). A zero norm scale (and bias) makes it the identity, which is
    how training starts (`zero_init_residuals`): the untrained autoencoder is the linear shortcut path."""

    def __init__(self, channels: int, norm_type: str = "rms_norm", act_fn: str = "silu"):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.nonlinearity = activation(act_fn)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm = normalization(norm_type, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.conv2(self.nonlinearity(self.conv1(x))))


class DownBlock(nn.Module):
    """Halve the resolution: a conv to out/4 channels then pixel-unshuffle (or a stride-2 conv), plus,
    with `shortcut`, the pixel-unshuffled input averaged over channel groups (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, unshuffle: bool = True, shortcut: bool = True):
        super().__init__()
        self.unshuffle = unshuffle
        self.shortcut = shortcut
        self.group_size = in_channels * 4 // out_channels
        if unshuffle and out_channels % 4:
            raise ValueError(f"a pixel-unshuffle down block needs out_channels divisible by 4, got {out_channels}")
        self.conv = nn.Conv2d(in_channels, out_channels // 4 if unshuffle else out_channels, 3,
                              1 if unshuffle else 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.unshuffle:
            h = F.pixel_unshuffle(h, 2)
        if not self.shortcut:
            return h
        return h + F.pixel_unshuffle(x, 2).unflatten(1, (-1, self.group_size)).mean(2)


class UpBlock(nn.Module):
    """Double the resolution: a conv to 4x out channels then pixel-shuffle (or nearest upsampling and a
    conv), plus, with `shortcut`, the input's channels repeated and pixel-shuffled (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, interpolate: bool = False, shortcut: bool = True):
        super().__init__()
        self.interpolate = interpolate
        self.shortcut = shortcut
        self.repeats = out_channels * 4 // in_channels
        self.conv = nn.Conv2d(in_channels, out_channels if interpolate else out_channels * 4, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.interpolate:
            h = self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        else:
            h = F.pixel_shuffle(self.conv(x), 2)
        if not self.shortcut:
            return h
        return h + F.pixel_shuffle(x.repeat_interleave(self.repeats, dim=1), 2)


def _per_stage(value: Union[str, Sequence[str]], stages: int) -> tuple[str, ...]:
    return (value,) * stages if isinstance(value, str) else tuple(value)


def _check_block_types(types: tuple[str, ...]) -> None:
    unsupported = sorted(set(types) - {"ResBlock"})
    if unsupported:
        raise ValueError(f"DC-AE block type {unsupported[0]} is not supported (only ResBlock stages)")


class Encoder(nn.Module):
    """Image -> latent. Stage i holds `layers_per_block[i]` ResBlocks at width `block_out_channels[i]`
    and, except the last, a DownBlock to the next width; a first stage without layers is replaced
    by a DownBlock as `conv_in`. `conv_out` adds the channel-group mean of its input (shortcut)."""

    def __init__(self, in_channels: int, latent_channels: int, block_out_channels: Sequence[int],
                 layers_per_block: Sequence[int], block_type: Union[str, Sequence[str]] = "ResBlock",
                 downsample_block_type: str = "pixel_unshuffle", out_shortcut: bool = True):
        super().__init__()
        stages = len(block_out_channels)
        _check_block_types(_per_stage(block_type, stages))
        unshuffle = downsample_block_type == "pixel_unshuffle"
        if layers_per_block[0] > 0:
            self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, 1, 1)
        else:
            self.conv_in = DownBlock(in_channels, block_out_channels[1], unshuffle, shortcut=False)
        blocks = []
        for i, (width, layers) in enumerate(zip(block_out_channels, layers_per_block)):
            stage: list[nn.Module] = [ResBlock(width, "rms_norm", "silu") for _ in range(layers)]
            if i < stages - 1 and layers > 0:
                stage.append(DownBlock(width, block_out_channels[i + 1], unshuffle, shortcut=True))
            blocks.append(nn.Sequential(*stage))
        self.down_blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(block_out_channels[-1], latent_channels, 3, 1, 1)
        self.out_shortcut = out_shortcut
        self.out_group_size = block_out_channels[-1] // latent_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down_blocks:
            h = stage(h)
        z = self.conv_out(h)
        if self.out_shortcut:
            z = z + h.unflatten(1, (-1, self.out_group_size)).mean(2)
        return z


class Decoder(nn.Module):
    """Latent -> image, the encoder mirrored: `conv_in` adds the latent's channels repeated
    (shortcut), each stage but the last starts with an UpBlock from the next width, then
    RMSNorm, an activation and `conv_out` (an UpBlock without shortcut when stage 0 has no layers)."""

    def __init__(self, in_channels: int, latent_channels: int, block_out_channels: Sequence[int],
                 layers_per_block: Sequence[int], block_type: Union[str, Sequence[str]] = "ResBlock",
                 norm_type: Union[str, Sequence[str]] = "rms_norm", act_fn: Union[str, Sequence[str]] = "silu",
                 upsample_block_type: str = "pixel_shuffle", in_shortcut: bool = True, conv_act_fn: str = "relu"):
        super().__init__()
        stages = len(block_out_channels)
        _check_block_types(_per_stage(block_type, stages))
        norms, acts = _per_stage(norm_type, stages), _per_stage(act_fn, stages)
        interpolate = upsample_block_type == "interpolate"
        self.conv_in = nn.Conv2d(latent_channels, block_out_channels[-1], 3, 1, 1)
        self.in_shortcut = in_shortcut
        self.in_repeats = block_out_channels[-1] // latent_channels
        blocks = []
        for i, (width, layers) in enumerate(zip(block_out_channels, layers_per_block)):
            stage: list[nn.Module] = []
            if i < stages - 1 and layers > 0:
                stage.append(UpBlock(block_out_channels[i + 1], width, interpolate, shortcut=True))
            stage += [ResBlock(width, norms[i], acts[i]) for _ in range(layers)]
            blocks.append(nn.Sequential(*stage))
        self.up_blocks = nn.ModuleList(blocks)  # indexed like the encoder's stages; run last to first
        width = block_out_channels[0] if layers_per_block[0] > 0 else block_out_channels[1]
        self.norm_out = RMSNorm2d(width)
        self.conv_act = activation(conv_act_fn)
        if layers_per_block[0] > 0:
            self.conv_out = nn.Conv2d(width, in_channels, 3, 1, 1)
        else:
            self.conv_out = UpBlock(width, in_channels, interpolate, shortcut=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        if self.in_shortcut:
            h = h + z.repeat_interleave(self.in_repeats, dim=1)
        for stage in reversed(self.up_blocks):
            h = stage(h)
        return self.conv_out(self.conv_act(self.norm_out(h)))


class AutoencoderDC(nn.Module):
    """A deterministic DC-AE first stage: `encode(x)` / `decode(z)` on unscaled latents and [-1, 1]
    NCHW images. Constructor arguments are diffusers' `AutoencoderDC` config names (config.json)."""

    def __init__(self, in_channels: int = 3, latent_channels: int = 32, attention_head_dim: int = 32,
                 encoder_block_types: Union[str, Sequence[str]] = "ResBlock",
                 decoder_block_types: Union[str, Sequence[str]] = "ResBlock",
                 encoder_block_out_channels: Sequence[int] = (128, 256, 512, 512, 1024, 1024),
                 decoder_block_out_channels: Sequence[int] = (128, 256, 512, 512, 1024, 1024),
                 encoder_layers_per_block: Sequence[int] = (2, 2, 2, 3, 3, 3),
                 decoder_layers_per_block: Sequence[int] = (3, 3, 3, 3, 3, 3),
                 encoder_qkv_multiscales: Sequence = (), decoder_qkv_multiscales: Sequence = (),
                 upsample_block_type: str = "pixel_shuffle", downsample_block_type: str = "pixel_unshuffle",
                 decoder_norm_types: Union[str, Sequence[str]] = "rms_norm",
                 decoder_act_fns: Union[str, Sequence[str]] = "silu", encoder_out_shortcut: bool = True,
                 decoder_in_shortcut: bool = True, decoder_conv_act_fn: str = "relu", scaling_factor: float = 1.0):
        super().__init__()
        if len(encoder_block_out_channels) != len(decoder_block_out_channels):
            raise ValueError("encoder and decoder need the same number of stages")
        self.encoder = Encoder(in_channels, latent_channels, encoder_block_out_channels, encoder_layers_per_block,
                               encoder_block_types, downsample_block_type, encoder_out_shortcut)
        self.decoder = Decoder(in_channels, latent_channels, decoder_block_out_channels, decoder_layers_per_block,
                               decoder_block_types, decoder_norm_types, decoder_act_fns, upsample_block_type,
                               decoder_in_shortcut, decoder_conv_act_fn)
        self.embed_dim = latent_channels
        self.scaling_factor = scaling_factor  # diffusers' latent scale; the tasks use the LDM's own

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def get_last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.conv.weight if isinstance(self.decoder.conv_out, UpBlock) else self.decoder.conv_out.weight


def zero_init_residuals(model: nn.Module) -> None:
    """Make every ResBlock the identity (zero norm scale and bias), so training starts from the
    shortcut path and each block learns a correction, which keeps early steps stable."""
    for module in model.modules():
        if isinstance(module, ResBlock):
            nn.init.zeros_(module.norm.weight)
            nn.init.zeros_(module.norm.bias)

