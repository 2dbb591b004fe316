"""Noise schedules of the training process, as CompVis `make_beta_schedule` defines them."""

import math

import torch

from .errors import LatentgenError

SCHEDULES = ("linear", "scaled_linear", "sqrt_linear", "sqrt", "cosine")


def make_betas(
    schedule: str = "linear",
    timesteps: int = 1000,
    linear_start: float = 0.00085,
    linear_end: float = 0.012,
    cosine_s: float = 8e-3,
) -> torch.Tensor:
    """Betas in float64. CompVis "linear" is linear in sqrt(beta) (diffusers' "scaled_linear")."""
    if schedule in ("linear", "scaled_linear"):
        return torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
    if schedule == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    if schedule == "sqrt":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64) ** 0.5
    if schedule == "cosine":
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        alphas = alphas / alphas[0]
        return (1 - alphas[1:] / alphas[:-1]).clamp(0, 0.999)
    raise LatentgenError(f"unknown beta schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def make_alphas_cumprod(
    schedule: str = "linear",
    timesteps: int = 1000,
    linear_start: float = 0.00085,
    linear_end: float = 0.012,
    cosine_s: float = 8e-3,
) -> torch.Tensor:
    """Cumulative product of (1 - beta), float64, shape [timesteps]."""
    betas = make_betas(schedule, timesteps, linear_start, linear_end, cosine_s)
    return torch.cumprod(1 - betas, dim=0)
