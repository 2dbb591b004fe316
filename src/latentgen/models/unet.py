"""The CompVis diffusion UNet: `ldm.modules.diffusionmodules.openaimodel.UNetModel` with the
`ldm.modules.attention` transformer, as used by latent-diffusion, Stable Diffusion 1.x and 2.x.

Module and attribute names are the checkpoint format: `UNetModel(**unet_config)` loads the official
`model.diffusion_model.*` weights (prefix removed) unchanged. Attention runs through
`scaled_dot_product_attention`; the caller picks device and dtype.
"""

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from latentgen.errors import LatentgenError

from .attention import multi_head_attention


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of (possibly fractional) timesteps [N]: cosines first, then sines."""
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps[:, None].float() * torch.exp(-math.log(max_period) * exponents)[None]
    return F.pad(torch.cat([torch.cos(args), torch.sin(args)], dim=-1), (0, dim % 2))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the activations' (or its own) dtype, as CompVis does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return out.type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a residual branch's last layer, so that a fresh block starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format `x` is laid out in: channels_last for an NHWC-strided map, else NCHW."""
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


# ---- the transformer of ldm/modules/attention.py ---------------------------------------------

class CrossAttention(nn.Module):
    """Attention from x to `context` (to x itself when there is none)."""

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = x if context is None else context
        return self.to_out(multi_head_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class GEGLU(nn.Module):
    """A linear layer into twice the width, one half gating the other through GELU."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """The gated feed-forward of every official transformer block (CompVis `glu=True`, `mult=4`)."""

    def __init__(self, dim: int, dropout: float = 0.0, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention (cross-attention when `disable_self_attn`), cross-attention, feed-forward; pre-norm."""

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: Optional[int] = None,
                 disable_self_attn: bool = False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer blocks over the pixels of a feature map, with 1x1-conv (SD 1.x, LDM) or linear (SD 2.x)
    projections in and out."""

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: Optional[int] = None, disable_self_attn: bool = False, use_linear: bool = False):
        super().__init__()
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = nn.Linear(in_channels, inner_dim) if use_linear else nn.Conv2d(in_channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout, context_dim, disable_self_attn)
            for _ in range(depth))
        self.proj_out = zero_module(nn.Linear(inner_dim, in_channels) if use_linear
                                    else nn.Conv2d(inner_dim, in_channels, 1))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        # Back in x's memory format: a channels-last-strided map meeting NCHW weights makes the
        # following convolutions copy their weights on every call on CPU (2x slower SD 1.5 steps);
        # a channels-last model keeps the transposed map as it is.
        h = h.transpose(1, 2).reshape(b, -1, height, width).contiguous(memory_format=memory_format(x))
        if not self.use_linear:
            h = self.proj_out(h)
        return h + x


# ---- the convolutional parts of openaimodel.py ---------------------------------------------------

class AttentionBlock(nn.Module):
    """Self-attention over pixels with a fused qkv 1x1 conv, in the models without a transformer.

    The legacy order splits the qkv channels into heads first, then q/k/v; the new order the reverse."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_new_attention_order: bool = False):
        super().__init__()
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.use_new_attention_order = use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        if self.use_new_attention_order:
            qkv = qkv.reshape(b, 3, self.num_heads, c // self.num_heads, -1).transpose(1, 2)
        else:
            qkv = qkv.reshape(b, self.num_heads, 3, c // self.num_heads, -1)
        q, k, v = (t.contiguous() for t in qkv.transpose(-1, -2).unbind(2))  # fused SDPA path, as in AttnBlock
        h = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, -1)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv if `use_conv`."""

    def __init__(self, channels: int, use_conv: bool, out_channels: Optional[int] = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1) if use_conv else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 conv if `use_conv`, else by average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: Optional[int] = None):
        super().__init__()
        self.op = (nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1) if use_conv
                   else nn.AvgPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding (added, or FiLM with `use_scale_shift_norm`);
    with `up`/`down` it also resamples, between its first norm and first conv."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: Optional[int] = None,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers[-1](self.h_upd(self.in_layers[:-1](x)))
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(self.x_upd(x)) + h


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers, each given what it takes: ResBlocks the timestep embedding, transformers
    the context."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def attention_heads(channels: int, num_heads: int, num_head_channels: int, legacy: bool,
                    use_spatial_transformer: bool) -> tuple[int, int]:
    """(heads, channels per head) handed to an attention layer of `channels` channels, counted as CompVis
    does; a channels-per-head of -1 tells an AttentionBlock to take the head count as given."""
    if num_head_channels == -1:
        heads, dim_head = num_heads, channels // num_heads
    else:
        heads, dim_head = channels // num_head_channels, num_head_channels
    if legacy:
        dim_head = channels // heads if use_spatial_transformer else num_head_channels
    return heads, dim_head


def label_embedding(num_classes: Union[int, str], time_embed_dim: int, adm_in_channels: Optional[int]) -> nn.Module:
    """Class ids (`num_classes` an int) or an adm vector (`"sequential"`, SD 2.x unCLIP) to the time embedding."""
    if isinstance(num_classes, int):
        return nn.Embedding(num_classes, time_embed_dim)
    if num_classes == "sequential" and adm_in_channels:
        return nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, time_embed_dim), nn.SiLU(),
                                           nn.Linear(time_embed_dim, time_embed_dim)))
    raise LatentgenError(f"unsupported UNet num_classes={num_classes!r} (an int, or 'sequential' with adm_in_channels)")


class UNetModel(nn.Module):
    """The CompVis UNet; constructor parameters as in the official YAMLs' `unet_config.params`.

    `use_checkpoint`, `use_fp16` and `use_bf16` are accepted for compatibility and ignored: there is no
    gradient checkpointing, and the dtype is the caller's (`.to(dtype)`). Only `dims=2` exists here.
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: Union[int, Sequence[int]], attention_resolutions: Sequence[int], dropout: float = 0.0,
                 channel_mult: Sequence[int] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 num_classes: Union[int, str, None] = None, use_checkpoint: bool = False, use_fp16: bool = False,
                 use_bf16: bool = False, num_heads: int = -1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False, use_spatial_transformer: bool = False,
                 transformer_depth: int = 1, context_dim: Optional[int] = None, n_embed: Optional[int] = None,
                 legacy: bool = True, disable_self_attentions: Optional[Sequence[bool]] = None,
                 num_attention_blocks: Optional[Sequence[int]] = None, disable_middle_self_attn: bool = False,
                 use_linear_in_transformer: bool = False, adm_in_channels: Optional[int] = None):
        super().__init__()
        levels = len(channel_mult)
        blocks = [num_res_blocks] * levels if isinstance(num_res_blocks, int) else list(num_res_blocks)
        if dims != 2:
            raise LatentgenError(f"only 2-D UNets are supported, not dims={dims}")
        if num_heads == -1 and num_head_channels == -1:
            raise LatentgenError("the UNet config needs num_heads or num_head_channels")
        if use_spatial_transformer != (context_dim is not None):
            raise LatentgenError("the UNet config needs context_dim exactly when use_spatial_transformer is set")
        if any(len(x) != levels for x in (blocks, disable_self_attentions or blocks, num_attention_blocks or blocks)):
            raise LatentgenError("num_res_blocks, disable_self_attentions and num_attention_blocks need one entry "
                                 "per channel_mult level")
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.predict_codebook_ids = n_embed is not None
        num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        time_embed_dim = model_channels * 4

        def res_block(ch: int, out_ch: Optional[int] = None, **updown: bool) -> ResBlock:
            return ResBlock(ch, time_embed_dim, dropout, out_ch, use_scale_shift_norm, **updown)

        def attention(ch: int, disable_self_attn: bool, upsampling: bool = False) -> nn.Module:
            heads, dim_head = attention_heads(ch, num_heads, num_head_channels, legacy, use_spatial_transformer)
            if use_spatial_transformer:
                return SpatialTransformer(ch, heads, dim_head, transformer_depth, dropout, context_dim,
                                          disable_self_attn, use_linear_in_transformer)
            return AttentionBlock(ch, num_heads_upsample if upsampling else heads, dim_head, use_new_attention_order)

        def has_attention(ds: int, level: int, index: int) -> bool:
            return ds in attention_resolutions and (num_attention_blocks is None or index < num_attention_blocks[level])

        no_self_attn = list(disable_self_attentions or [False] * levels)
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))
        if num_classes is not None:
            self.label_emb = label_embedding(num_classes, time_embed_dim, adm_in_channels)

        stem = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(stem)])
        skip_channels, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for index in range(blocks[level]):
                layers = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if has_attention(ds, level, index):
                    layers.append(attention(ch, no_self_attn[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                down = res_block(ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res_block(ch), attention(ch, disable_middle_self_attn),
                                                    res_block(ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for index in range(blocks[level] + 1):
                layers = [res_block(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if has_attention(ds, level, index):
                    layers.append(attention(ch, no_self_attn[level], upsampling=True))
                if level and index == blocks[level]:
                    layers.append(res_block(ch, up=True) if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1)))
        if n_embed is not None:
            self.id_predictor = nn.Sequential(normalization(ch), nn.Conv2d(model_channels, n_embed, 1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor] = None,
                y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The model output (eps, v or x0; codebook logits for `n_embed` models) for x [N, C, H, W] at
        timesteps [N] (or one for all), cross-attention `context` [N, L, D] and labels / adm vectors `y` [N, ...]."""
        if (y is None) != (self.num_classes is None):
            raise ValueError("class labels y are needed exactly when the UNet is class-conditional")
        timesteps = timesteps.reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.id_predictor(h) if self.predict_codebook_ids else self.out(h)
