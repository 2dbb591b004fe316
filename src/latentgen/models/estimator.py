"""A regression super-resolver (ESPCN / EDSR style): the starting estimate an LDM-SR model refines.

Why a regression network beside the diffusion model: a diffusion sample is a draw from the
posterior over high-res images, and a draw is about 3 dB further from the truth in PSNR than the
posterior mean (twice its squared error), which an MSE-trained network estimates directly and
cheaply. `upscale` encodes this estimate and lets the LDM add detail to it from a chosen noise
level (SDEdit), instead of sampling from pure noise.

All convolutions run at the low resolution (where a CPU can afford them); the output is the bicubic
upsampling plus a learned residual, pixel-shuffled up by `factor`. The residual path starts at zero,
so the untrained network is bicubic upsampling.
"""

import torch
import torch.nn.functional as F
from torch import nn

ESTIMATOR_TARGET = "latentgen.models.estimator.ResidualUpscaler"


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


def zero_init_residuals(model: ResidualUpscaler) -> None:
    """Every residual branch and the output conv at zero: training starts from bicubic upsampling."""
    for module in [*(block.conv2 for block in model.blocks), model.conv_out]:
        nn.init.zeros_(module.weight)
        nn.init.zeros_(module.bias)
