"""Conditioning and classifier-free guidance (Ho & Salimans 2022) as model callables for the samplers.

A LDM UNet is called as `unet(x, timesteps, context=None, y=None)`; what it is conditioned on
travels in one `Conditioning`. `guided_model` binds a UNet, its conditional and unconditional
conditioning and the guidance scale into the `model(x, t)` a sampler takes, so samplers never see
conditioning.
"""

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch import Tensor

from .errors import LatentgenError
from .samplers import Model


@dataclass(frozen=True)
class Conditioning:
    """What a LDM UNet is conditioned on; each part may be None.

    - `context`: cross-attention tokens [B, L, D] (text, or an embedded class for LDM cin256);
    - `y`: class labels [B] (or ADM vectors) added to the time embedding;
    - `concat`: [B, C, H, W] latents concatenated to x along channels before the UNet: the masked
      image latent and mask of inpainting models, the low-resolution image of super-resolution.
    """

    context: Optional[Tensor] = None
    y: Optional[Tensor] = None
    concat: Optional[Tensor] = None


ConditionalModel = Callable[[Tensor, Tensor, Conditioning], Tensor]


def unet_model(unet: Callable[..., Tensor]) -> ConditionalModel:
    """The UNet as `model(x, t, Conditioning)`: concat conditioning joins x, the rest goes by keyword."""

    def model(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        if cond.concat is not None:
            x = torch.cat([x, cond.concat], dim=1)
        return unet(x, t, context=cond.context, y=cond.y)

    return model


def _join(first: Optional[Tensor], second: Optional[Tensor], part: str) -> Optional[Tensor]:
    if (first is None) != (second is None):
        raise ValueError(f"conditional and unconditional conditioning must both carry {part} or neither")
    return None if first is None else torch.cat([first, second])


def _batched(uncond: Conditioning, cond: Conditioning) -> Conditioning:
    """Both conditionings as one batch: unconditional first, then conditional."""
    return Conditioning(*(_join(getattr(uncond, part), getattr(cond, part), part) for part in ("context", "y", "concat")))


def classifier_free_guidance(model: ConditionalModel, cond: Conditioning, uncond: Optional[Conditioning],
                             scale: float, batched: bool = True) -> Model:
    """`model(x, t)` -> uncond_out + scale * (cond_out - uncond_out).

    Both passes run as ONE forward on a doubled batch by default; `batched=False` runs them one after
    the other (half the peak activation memory). Scale 1, or no `uncond`, skips the unconditional
    pass. The unconditional half shares the conditional `concat` when it has none of its own.
    """
    if uncond is not None and uncond.concat is None:
        uncond = replace(uncond, concat=cond.concat)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        if scale == 1 or uncond is None:
            return model(x, t, cond)
        if batched:
            out_uncond, out_cond = model(torch.cat([x, x]), torch.cat([t, t]), _batched(uncond, cond)).chunk(2)
        else:
            out_uncond, out_cond = model(x, t, uncond), model(x, t, cond)
        return out_uncond + scale * (out_cond - out_uncond)

    return guided


def guided_model(unet: Callable[..., Tensor], cond: Conditioning, uncond: Optional[Conditioning] = None,
                 scale: float = 1.0, batched: bool = True) -> Model:
    """The sampler's `model(x, t)`: a UNet with its conditioning bound and guidance applied.
    `uncond` holds the empty or negative prompt."""
    if not scale >= 0:
        raise LatentgenError(f"guidance scale must be 0 or more, got {scale}")
    if scale != 1 and uncond is None:
        raise LatentgenError(f"guidance scale {scale} needs unconditional conditioning (a negative prompt)")
    return classifier_free_guidance(unet_model(unet), cond, uncond, scale, batched)
