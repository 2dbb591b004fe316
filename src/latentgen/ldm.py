"""LatentDiffusion: the parts of a loaded model and the facts needed to sample with them."""

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn


@dataclass(frozen=True)
class NoiseAugmentation:
    """How a noise-augmented upscaler (SD 2 x4, CompVis `ImageConcatWithNoiseAugmentation`) degrades
    its low-res input before concatenating it: forward diffusion to `noise_level` on a schedule of
    its own, the level then telling the UNet (as class label y) how much noise to expect."""

    alphas_cumprod: torch.Tensor
    max_noise_level: int

    def __call__(self, image: torch.Tensor, noise_level: int, noise: torch.Tensor) -> torch.Tensor:
        """q_sample: sqrt(a) image + sqrt(1 - a) noise, with a = alphas_cumprod[noise_level]."""
        alpha = self.alphas_cumprod[noise_level]
        return float(alpha.sqrt()) * image + float((1 - alpha).sqrt()) * noise


@dataclass
class LatentDiffusion:
    """A loaded checkpoint: the three networks plus how they were trained to work together.

    `unet` and `cond_stage` are None for a standalone autoencoder; `cond_stage` is None for
    unconditional and pure concat-conditioned models; `noise_augmentation` is set for the SD 2 x4
    upscaler only. `config` has the structure of an official
    YAML's `model.params` (unet_config, first_stage_config, cond_stage_config, schedule, ...).
    """

    unet: Optional[nn.Module]
    first_stage: nn.Module
    cond_stage: Optional[nn.Module]
    scale_factor: float
    parameterization: str
    alphas_cumprod: torch.Tensor
    conditioning_key: Optional[str]
    family: str
    config: dict = field(default_factory=dict)
    name: str = ""
    sha256: str = ""
    noise_augmentation: Optional[NoiseAugmentation] = None

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.unet, self.first_stage, self.cond_stage) if m is not None]

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "LatentDiffusion":
        """Move every network. `alphas_cumprod` stays a float64 CPU tensor (MPS has no float64);
        samplers derive their per-step constants from it and move those."""
        for module in self.modules():
            module.to(device=device, dtype=dtype)
        return self

    def eval(self) -> "LatentDiffusion":
        for module in self.modules():
            module.eval()
        return self
