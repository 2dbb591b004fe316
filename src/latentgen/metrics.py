"""Image quality numbers: PSNR, SSIM (Wang et al. 2004) and gradient energy.

Inputs are image tensors [B, C, H, W] (or [C, H, W]) in `value_range`, [-1, 1] by default.
PSNR and SSIM map them to [0, 1] first and, with `quantize` (the default), round to the 256
levels an 8-bit PNG stores: the numbers are then those of the saved uint8 files computed with
peak 255, as the LDM paper and the super-resolution literature report them. Batches give the
mean of the per-image values.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

# ITU-R BT.601 luma of [0, 1] RGB, as MATLAB's rgb2ycbcr (the SR literature's "Y channel").
Y_WEIGHTS = (65.481 / 255, 128.553 / 255, 24.966 / 255)
Y_OFFSET = 16 / 255


def _unit(x: torch.Tensor, value_range: tuple[float, float], quantize: bool, y_channel: bool) -> torch.Tensor:
    """[B, C, H, W] float64 in [0, 1]: rescaled, optionally 8-bit quantised, optionally reduced to Y."""
    x = x.detach().to(torch.float64).cpu()
    if x.dim() == 3:
        x = x[None]
    low, high = value_range
    x = ((x - low) / (high - low)).clamp(0, 1)
    if quantize:
        x = (x * 255).round() / 255
    if y_channel:
        weights = torch.tensor(Y_WEIGHTS, dtype=x.dtype).view(1, 3, 1, 1)
        x = (x * weights).sum(dim=1, keepdim=True) + Y_OFFSET
    return x


def _pair(a, b, value_range, quantize, y_channel):
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return _unit(a, value_range, quantize, y_channel), _unit(b, value_range, quantize, y_channel)


def psnr(a: torch.Tensor, b: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0),
         quantize: bool = True, y_channel: bool = False) -> float:
    """Peak signal-to-noise ratio in dB, 10 log10(1 / MSE) on [0, 1] images (inf when identical)."""
    x, y = _pair(a, b, value_range, quantize, y_channel)
    mse = ((x - y) ** 2).flatten(1).mean(dim=1)
    values = [math.inf if m == 0 else -10 * math.log10(m) for m in mse.tolist()]
    return sum(values) / len(values)


def _gaussian_window(radius: int, sigma: float) -> torch.Tensor:
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    window = torch.exp(-(taps**2) / (2 * sigma**2))
    return window / window.sum()


def ssim_map(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-pixel, per-channel SSIM (Wang et al. 2004) of [0, 1] images over the Gaussian windows
    that fit inside the image; differentiable, in the inputs' dtype (training uses it as a loss).
    Images smaller than the 11x11 window use the largest window that fits."""
    radius = min(int(3.5 * sigma + 0.5), (min(x.shape[-2:]) - 1) // 2)
    window = _gaussian_window(radius, sigma).to(x)
    channels = x.shape[1]
    rows = window.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    cols = window.view(1, 1, 1, -1).expand(channels, 1, 1, -1)

    def local_mean(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, rows, groups=channels), cols, groups=channels)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = k1**2, k2**2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


def ssim(a: torch.Tensor, b: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0),
         quantize: bool = True, y_channel: bool = False, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean structural similarity with an 11x11 Gaussian window, sigma 1.5, in float64.

    Matches scikit-image's structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1, channel_axis=...) on the [0, 1] images: local
    statistics over windows that fit inside the image, averaged over pixels and channels."""
    x, y = _pair(a, b, value_range, quantize, y_channel)
    return float(ssim_map(x, y, sigma, k1, k2).flatten(1).mean(dim=1).mean())


def gradient_energy(x: torch.Tensor) -> float:
    """Mean squared forward-difference gradient, |dx|^2 + |dy|^2 averaged over pixels and channels.

    A sharpness measure: its ratio between two renderings of the same content (e.g. a
    super-resolved image over its bicubic upsampling) says which has more high-frequency detail."""
    x = x.detach().to(torch.float64)
    return float(x.diff(dim=-1).square().mean() + x.diff(dim=-2).square().mean())


# ---- colour: hue kept ------------------------------------------------------------------------

# sRGB (D65) linear RGB -> XYZ, and the D65 white point.
_RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375), (0.2126729, 0.7151522, 0.0721750), (0.0193339, 0.1191920, 0.9503041))
_D65 = (0.95047, 1.0, 1.08883)


def srgb_to_lab(x: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """CIELAB (D65) of [B, 3, H, W] sRGB images, float64: L* in [0, 100], a*/b* roughly [-128, 127]."""
    rgb = _unit(x, value_range, quantize=True, y_channel=False)
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = torch.einsum("ij,bjhw->bihw", torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype), linear)
    xyz = xyz / torch.tensor(_D65, dtype=rgb.dtype).view(1, 3, 1, 1)
    delta = 6 / 29
    f = torch.where(xyz > delta**3, xyz.clamp_min(1e-12) ** (1 / 3), xyz / (3 * delta**2) + 4 / 29)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


def chroma_error(a: torch.Tensor, b: torch.Tensor, block: int = 8,
                 value_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    """Mean CIELAB a*b* distance, sqrt(da*^2 + db*^2), between the `block` x `block` means of two
    images: the hue and colourfulness of regions, blind to lost detail and to lightness. Under
    about 2-3 a colour shift is hard to see; green turned grey scores 10 or more."""
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    means = [F.avg_pool2d(srgb_to_lab(t, value_range)[:, 1:], block) for t in (a, b)]
    return float((means[0] - means[1]).square().sum(1).sqrt().mean())


def green_share(x: torch.Tensor, margin: float = 8 / 255, value_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    """Share of pixels whose green exceeds both red and blue by `margin` (8-bit levels / 255):
    what a round trip that loses the green-magenta axis takes to zero."""
    rgb = _unit(x, value_range, quantize=True, y_channel=False)
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    return float(((g - r > margin) & (g - b > margin)).double().mean())


HUE_RANGES = {"red": (345, 15), "orange": (15, 40), "yellow": (40, 70), "green": (70, 165), "cyan": (165, 195),
              "blue": (195, 255), "purple": (255, 300), "pink": (300, 345)}
"""Named hue ranges in degrees, [start, end), wrapping through 0 for red."""


def colourful_hues(image: torch.Tensor, min_saturation: float = 0.35, min_value: float = 0.25) -> torch.Tensor:
    """Hues in degrees of the colourful pixels of one [1, 3, H, W] image in [-1, 1] (white
    backgrounds, greys and shadows left out)."""
    rgb = ((image[0].clamp(-1, 1) + 1) / 2).flatten(1)
    value, low = rgb.max(0).values, rgb.min(0).values
    chroma = value - low
    colourful = (value >= min_value) & (chroma >= min_saturation * value.clamp_min(1e-6))
    r, g, b = rgb[:, colourful]
    c, v = chroma[colourful], value[colourful]
    return torch.where(v == r, ((g - b) / c) % 6, torch.where(v == g, (b - r) / c + 2, (r - g) / c + 4)) * 60


def hue_counts(hues: torch.Tensor) -> dict[str, int]:
    """How many of `hues` fall in each named range of HUE_RANGES."""
    return {name: int(((hues >= start) & (hues < end)).sum() if start < end else ((hues >= start) | (hues < end)).sum())
            for name, (start, end) in HUE_RANGES.items()}


def dominant_colour(image: torch.Tensor) -> Optional[str]:
    """The named hue range holding most of the image's colourful pixels; None for an image without colour."""
    counts = hue_counts(colourful_hues(image))
    return max(counts, key=counts.get) if any(counts.values()) else None
