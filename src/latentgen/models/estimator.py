"""Regression estimators: the starting estimates an LDM-SR or inpainting model refines.

Why a regression network beside the diffusion model: a diffusion sample is a draw from the
posterior over images, and a draw is about 3 dB further from the truth in PSNR than the posterior
mean (twice its squared error), which an MSE-trained network estimates directly and cheaply.
`upscale` and `inpaint` encode the estimate and let the LDM add detail to it from a chosen noise
level (SDEdit), instead of sampling from pure noise.

Both run all their convolutions at a quarter of the output resolution or less (where a CPU can
afford them) and add a pixel-shuffled residual to a parameter-free baseline: bicubic upsampling for
the upscaler, a push-pull fill of the hole for the inpainter. The residual paths start at zero, so
an untrained estimator is its baseline.
"""

import torch
import torch.nn.functional as F
from torch import nn

UPSCALER_TARGET = "latentgen.models.estimator.ResidualUpscaler"
INPAINTER_TARGET = "latentgen.models.estimator.ResidualInpainter"


class ResBlock(nn.Module):
    """x + conv2(relu(conv1(x)))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class ResidualUpscaler(nn.Module):
    """[B, 3, h, w] in [-1, 1] -> [B, 3, h * factor, w * factor]: bicubic + pixel_shuffle(residual)."""

    def __init__(self, factor: int = 4, channels: int = 32, blocks: int = 6):
        super().__init__()
        self.factor = factor
        self.conv_in = nn.Conv2d(3, channels, 3, 1, 1)
        self.blocks = nn.Sequential(*[ResBlock(channels) for _ in range(blocks)])
        self.conv_out = nn.Conv2d(channels, 3 * factor**2, 3, 1, 1)

    def forward(self, low: torch.Tensor) -> torch.Tensor:
        base = F.interpolate(low, scale_factor=self.factor, mode="bicubic")
        h = self.conv_in(low)
        return base + F.pixel_shuffle(self.conv_out(h + self.blocks(h)), self.factor)


def push_pull_fill(image: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Fill where `known` is 0 from a pyramid of known-weighted means (push), each level's holes
    filled from the coarser one enlarged (pull): smooth, parameter-free, known pixels exact."""
    if bool(known.min() > 0) or min(image.shape[-2:]) == 1:
        return image * known
    total = F.avg_pool2d(image * known, 2, ceil_mode=True)
    weight = F.avg_pool2d(known, 2, ceil_mode=True)
    coarse = push_pull_fill(total / weight.clamp_min(1e-6), (weight > 0).to(known))
    enlarged = F.interpolate(coarse, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return image * known + enlarged * (1 - known)


class ResidualInpainter(nn.Module):
    """[B, 4, H, W] (the image with the hole zeroed, then the mask: 1 = fill; H, W multiples of 8)
    -> [B, 3, H, W]: the known pixels exactly, the hole as push-pull fill + pixel_shuffle(residual).

    A two-level U-Net: `channels` wide at 1/4 resolution, twice that through `blocks` ResBlocks at
    1/8, whose receptive field (about 150 px) spans the holes a 128 px crop is trained with."""

    def __init__(self, channels: int = 32, blocks: int = 4):
        super().__init__()
        self.conv_in = nn.Conv2d(4 * 16, channels, 3, 1, 1)
        self.encoder = ResBlock(channels)
        self.down = nn.Conv2d(channels, 2 * channels, 2, 2)
        self.blocks = nn.Sequential(*[ResBlock(2 * channels) for _ in range(blocks)])
        self.up = nn.Conv2d(2 * channels, 4 * channels, 1)
        self.decoder = ResBlock(channels)
        self.conv_out = nn.Conv2d(channels, 3 * 16, 3, 1, 1)

    def forward(self, masked: torch.Tensor) -> torch.Tensor:
        image, hole = masked[:, :3], (masked[:, 3:] > 0.5).to(masked)
        base = push_pull_fill(image, 1 - hole)
        h = self.encoder(self.conv_in(F.pixel_unshuffle(torch.cat([base, hole], 1), 4)))
        h = h + F.pixel_shuffle(self.up(self.blocks(self.down(h))), 2)
        residual = F.pixel_shuffle(self.conv_out(self.decoder(h)), 4)
        return image * (1 - hole) + (base + residual) * hole


ESTIMATORS = {"ResidualUpscaler": ResidualUpscaler, "ResidualInpainter": ResidualInpainter}


def zero_init_residuals(model: nn.Module) -> None:
    """Every residual branch and the output conv at zero: training starts from the baseline."""
    for module in [*(block.conv2 for block in model.modules() if isinstance(block, ResBlock)), model.conv_out]:
        nn.init.zeros_(module.weight)
        nn.init.zeros_(module.bias)
