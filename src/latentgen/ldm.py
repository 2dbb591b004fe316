"""LatentDiffusion: the parts of a loaded model, and `ModelSpec`, the facts needed to use them.

The loader computes a `ModelSpec` once from the checkpoint's (detected or given) configuration;
tasks, the memory estimate and training read the spec, never the configuration dict.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .schedules import TrainingSchedule

# How a concat-conditioned UNet's extra input channels are laid out after the noisy latent.
MASKED_IMAGE_THEN_MASK = "masked-image+mask"  # CompVis LDM inpainting (inpainting_big): [z_masked, mask]
MASK_THEN_MASKED_IMAGE = "mask+masked-image"  # SD inpainting (runwayml, SD 2): [mask, z_masked]
LOW_RES_IMAGE = "low-res-image"  # super-resolution: the low-res RGB image itself
CONCAT_LAYOUTS = (MASKED_IMAGE_THEN_MASK, MASK_THEN_MASKED_IMAGE, LOW_RES_IMAGE)


@dataclass(frozen=True)
class UNetLayout:
    """What the memory estimate needs of a UNet's architecture."""

    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_levels: frozenset[int]
    spatial_transformer: bool


@dataclass(frozen=True)
class ModelSpec:
    """Facts about a model, computed once by the loader.

    - `factor` f and `latent_channels`: the first stage maps H x W x 3 to H/f x W/f x channels;
      `decoder_width` is the channel count of its decoder at full resolution (memory estimate).
    - `scale_factor`: diffusion latents are first-stage latents times this (the paper's 1/std).
    - `conditioning`: what the user gives besides the image: "text", "class" or "none";
      `concat`: the layout of concatenated image conditioning (one of CONCAT_LAYOUTS) or None.
    - `native_latent`: the latent side the UNet was trained at; None for a lone autoencoder.
    - `default_steps`: the sampling steps the CLI uses without --steps (a config's `default_steps`,
      where its card measured them best); None: tasks.DEFAULT_STEPS.
    - `default_strength`: a model with a regression estimator (`LatentDiffusion.estimator`): the
      noise level, as img2img strength, that `upscale` or `inpaint` refines the estimate from (a
      config's `default_strength`); None: 1, sampling from pure noise as the paper's models.
    """

    family: str
    factor: int
    latent_channels: int
    decoder_width: int
    scale_factor: float = 1.0
    parameterization: str = "eps"
    conditioning: str = "none"
    concat: Optional[str] = None
    native_latent: Optional[int] = None
    unet: Optional[UNetLayout] = None
    schedule: TrainingSchedule = TrainingSchedule()
    default_steps: Optional[int] = None
    default_strength: Optional[float] = None
    preview_projection: Optional[tuple[tuple[float, float, float], ...]] = None
    """[C + 1] x 3 latent-to-RGB map for cheap previews, where the model's config stores one (previews.py)."""

    @property
    def is_diffusion(self) -> bool:
        return self.unet is not None

    @property
    def native_size(self) -> int:
        """Pixel side the model was trained at (a lone autoencoder: 256, CompVis' training size)."""
        return (self.native_latent or 256 // self.factor) * self.factor

    @property
    def size_multiple(self) -> int:
        """Pixel sizes must divide by f times the UNet's total downsampling."""
        levels = len(self.unet.channel_mult) if self.unet is not None else 1
        return self.factor * 2 ** (levels - 1)

    @property
    def estimator_kind(self) -> Optional[str]:
        """The regression estimator (models/estimator.py) a model of this concat layout refines, if any."""
        if self.concat == LOW_RES_IMAGE:
            return "ResidualUpscaler"
        return "ResidualInpainter" if self.concat else None


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
    """A loaded checkpoint: the three networks and their `spec`.

    `unet` and `cond_stage` are None for a standalone autoencoder; `cond_stage` is None for
    unconditional and pure concat-conditioned models; `noise_augmentation` is set for the SD 2 x4
    upscaler only; `estimator` (a regression upscaler or inpainter, models/estimator.py) for LDM-SR
    and inpainting models whose config has an `estimator_config`. `params` is the official-YAML `model.params` the networks were built from,
    kept to export or convert the architecture (reference.py, training); facts come from `spec`.
    """

    unet: Optional[nn.Module]
    first_stage: nn.Module
    cond_stage: Optional[nn.Module]
    spec: ModelSpec
    alphas_cumprod: torch.Tensor
    params: dict = field(default_factory=dict)
    name: str = ""
    sha256: str = ""
    noise_augmentation: Optional[NoiseAugmentation] = None
    estimator: Optional[nn.Module] = None
    infotext: dict = field(default_factory=dict)
    """AUTOMATIC1111 fields of what was added after loading (LoRA hashes, VAE, clip skip; addons.py)."""
    vae_tiling: bool = False
    """Decode in overlapping tiles (tasks.decode), so large images fit in bounded memory."""

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def scale_factor(self) -> float:
        return self.spec.scale_factor

    @property
    def parameterization(self) -> str:
        return self.spec.parameterization

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.unet, self.first_stage, self.cond_stage, self.estimator) if m is not None]

    def to(self, device=None, dtype: Optional[torch.dtype] = None,
           memory_format: torch.memory_format = torch.preserve_format) -> "LatentDiffusion":
        """Move every network (its 4-D weights into `memory_format`). `alphas_cumprod` stays a
        float64 CPU tensor (MPS has no float64); samplers derive their per-step constants from it
        and move those."""
        for module in self.modules():
            module.to(device=device, dtype=dtype, memory_format=memory_format)
        return self

    def eval(self) -> "LatentDiffusion":
        for module in self.modules():
            module.eval()
        return self
