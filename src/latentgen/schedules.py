"""Noise schedules: the training process's (CompVis `make_beta_schedule`) and the levels each
sampler steps through (timestep spacing, sigmas, Karras)."""

import math
from dataclasses import dataclass, replace

import torch

from .errors import LatentgenError

SCHEDULES = ("linear", "scaled_linear", "sqrt_linear", "sqrt", "cosine")


def make_betas(schedule: str, timesteps: int, linear_start: float, linear_end: float,
               cosine_s: float = 8e-3) -> torch.Tensor:
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


ZERO_SNR_FLOOR = 2.0**-24  # alpha_bar_T of a zero-terminal-SNR schedule as samplers see it (diffusers' floor)


def make_alphas_cumprod(schedule: str, timesteps: int, linear_start: float, linear_end: float,
                        cosine_s: float = 8e-3, zero_terminal_snr: bool = False) -> torch.Tensor:
    """Cumulative product of (1 - beta), float64, shape [timesteps]; with `zero_terminal_snr`
    rescaled as Lin et al. (2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed")
    so that the last step is pure noise: sqrt(alpha_bar) shifted to end at 0 and scaled to keep its
    start. The last value is then floored at 2^-24, so every sampler's sigma stays finite."""
    alphas_cumprod = torch.cumprod(1 - make_betas(schedule, timesteps, linear_start, linear_end, cosine_s), dim=0)
    if not zero_terminal_snr:
        return alphas_cumprod
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    rescaled = root**2
    rescaled[-1] = ZERO_SNR_FLOOR
    return rescaled


@dataclass(frozen=True)
class TrainingSchedule:
    """The forward process a model was trained with; the defaults are CompVis DDPM's, which an
    official YAML relies on when it leaves a key out."""

    beta_schedule: str = "linear"
    timesteps: int = 1000
    linear_start: float = 1e-4
    linear_end: float = 2e-2
    cosine_s: float = 8e-3
    zero_terminal_snr: bool = False

    def alphas_cumprod(self) -> torch.Tensor:
        return make_alphas_cumprod(self.beta_schedule, self.timesteps, self.linear_start, self.linear_end, self.cosine_s,
                                   self.zero_terminal_snr)


# ---- the noise levels a sampler walks through ------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """The noise levels of one sampling run, from noisiest to cleanest.

    Step i calls the model at `timesteps[i]` on a latent at noise level `sigmas[i]` and leaves it
    at `sigmas[i + 1]`; `sigmas[-1]` is the level of the result (0 for the k-diffusion samplers,
    alphas_cumprod[0]'s for CompVis DDIM and PLMS). Sigma is the variance-exploding noise level
    sqrt((1 - alpha_cumprod) / alpha_cumprod). With `variance_preserving` the latents are CompVis's
    sqrt(alpha) x0 + sqrt(1 - alpha) eps, otherwise k-diffusion's x0 + sigma eps.
    """

    timesteps: tuple[float, ...]
    sigmas: tuple[float, ...]
    variance_preserving: bool

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def alphas_cumprod(self) -> tuple[float, ...]:
        return tuple(1 / (1 + s * s) for s in self.sigmas)

    def last(self, steps: int) -> "Schedule":
        """The final `steps` steps only (img2img: start part-way down)."""
        return replace(self, timesteps=self.timesteps[-steps:], sigmas=self.sigmas[-steps - 1:])


def sigmas_of(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Variance-exploding noise level of every training timestep, float64."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def ddim_timesteps(steps: int, timesteps: int = 1000, spacing: str = "uniform") -> list[int]:
    """CompVis `make_ddim_timesteps`, ascending: every (T // steps)-th timestep ("uniform") or a
    quadratic ramp up to 0.8 T ("quad"), shifted by +1 so that the last step lands on alphas_cumprod[0];
    or, "trailing" (Lin et al. 2023, diffusers' `timestep_spacing="trailing"`), `steps` timesteps
    counted down from T - 1, so that sampling starts where a zero-terminal-SNR model begins.

    As in CompVis, "uniform" runs ceil(T / (T // steps)) steps, e.g. 31 for 30 steps. Where CompVis would
    then index past T - 1 (T // steps dividing T - 1, e.g. 9 steps) that timestep is dropped.
    """
    if not 1 <= steps <= timesteps:
        raise LatentgenError(f"--steps must be between 1 and {timesteps}, got {steps}")
    if spacing == "uniform":
        ts = range(1, timesteps + 1, timesteps // steps)
    elif spacing == "quad":
        ts = (torch.linspace(0, (timesteps * 0.8) ** 0.5, steps, dtype=torch.float64) ** 2).long() + 1
    elif spacing == "trailing":
        ts = sorted({round(timesteps - i * timesteps / steps) - 1 for i in range(steps)})
    else:
        raise LatentgenError(f"unknown timestep spacing {spacing!r}; choose uniform, quad or trailing")
    return [int(t) for t in ts if t < timesteps]


def ddim_schedule(alphas_cumprod: torch.Tensor, steps: int, spacing: str = "uniform") -> Schedule:
    """DDIM / PLMS levels: the CompVis timesteps, ending at alphas_cumprod[0] (not at 1)."""
    ts = ddim_timesteps(steps, len(alphas_cumprod), spacing)[::-1]
    sigmas = sigmas_of(alphas_cumprod)
    return Schedule(tuple(map(float, ts)), tuple(sigmas[ts + [0]].tolist()), variance_preserving=True)


def ddpm_schedule(alphas_cumprod: torch.Tensor, steps: int) -> Schedule:
    """Ancestral DDPM levels: all T timesteps, or `steps` of them evenly spaced (improved-diffusion's
    respacing, always keeping 0 and T - 1), ending noise-free."""
    ts = torch.linspace(len(alphas_cumprod) - 1, 0, steps, dtype=torch.float64).round().long()
    sigmas = sigmas_of(alphas_cumprod)[ts].tolist() + [0.0]
    return Schedule(tuple(map(float, ts.tolist())), tuple(sigmas), variance_preserving=True)


def lcm_schedule(alphas_cumprod: torch.Tensor, steps: int, original_steps: int = 50) -> Schedule:
    """Latent Consistency Model levels (Luo et al. 2023; diffusers' LCMScheduler): `steps` of the
    distillation's `original_steps` timesteps (19, 39, ..., 999 for 50 of 1000), evenly picked from
    the noisiest, ending noise-free."""
    if not 1 <= steps <= original_steps:
        raise LatentgenError(f"LCM takes 1 to {original_steps} steps, got {steps}")
    k = len(alphas_cumprod) // original_steps
    origin = list(range(original_steps * k - 1, -1, -k))
    ts = [origin[i * original_steps // steps] for i in range(steps)]
    sigmas = sigmas_of(alphas_cumprod)[ts].tolist() + [0.0]
    return Schedule(tuple(map(float, ts)), tuple(sigmas), variance_preserving=True)


def interpolate_sigma(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Sigma at fractional timesteps, linear between training timesteps (diffusers' np.interp)."""
    table = sigmas_of(alphas_cumprod)
    low = t.floor().long().clamp(0, len(table) - 2)
    w = t - low
    return table[low] * (1 - w) + table[low + 1] * w


def sigma_to_t(sigma: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Fractional timestep of a noise level, linear in log sigma (k-diffusion's DiscreteSchedule)."""
    log_sigmas = sigmas_of(alphas_cumprod).log()
    log_sigma = sigma.clamp(min=1e-10).log()
    low = ((log_sigma[:, None] >= log_sigmas).sum(1) - 1).clamp(0, len(log_sigmas) - 2)
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    return low + w


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) levels: uniform in sigma^(1/rho), float64, noisiest first."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _karras_schedule(alphas_cumprod: torch.Tensor, steps: int) -> Schedule:
    table = sigmas_of(alphas_cumprod)
    sigmas = karras_sigmas(float(table[0]), float(table[-1]), steps)
    ts = sigma_to_t(sigmas, alphas_cumprod)
    return Schedule(tuple(ts.tolist()), tuple(sigmas.tolist()) + (0.0,), variance_preserving=False)


def euler_schedule(alphas_cumprod: torch.Tensor, steps: int, karras: bool = False) -> Schedule:
    """k-diffusion levels for Euler: `steps` timesteps evenly from T - 1 down to 0 (fractional),
    then sigma 0; or Karras sigmas between the model's extremes (diffusers' EulerDiscreteScheduler)."""
    if karras:
        return _karras_schedule(alphas_cumprod, steps)
    ts = torch.linspace(len(alphas_cumprod) - 1, 0, steps, dtype=torch.float64)
    sigmas = interpolate_sigma(ts, alphas_cumprod)
    return Schedule(tuple(ts.tolist()), tuple(sigmas.tolist()) + (0.0,), variance_preserving=False)


def dpm_schedule(alphas_cumprod: torch.Tensor, steps: int, karras: bool = False) -> Schedule:
    """DPM-Solver levels: `steps + 1` integer timesteps evenly from T - 1 to 0 with the last one
    replaced by sigma 0 (diffusers' DPMSolverMultistepScheduler), or Karras sigmas (with fractional
    timesteps, where diffusers rounds them)."""
    if karras:
        return _karras_schedule(alphas_cumprod, steps)
    ts = torch.linspace(0, len(alphas_cumprod) - 1, steps + 1, dtype=torch.float64).round().long().flip(0)[:-1]
    sigmas = sigmas_of(alphas_cumprod)[ts]
    return Schedule(tuple(map(float, ts.tolist())), tuple(sigmas.tolist()) + (0.0,), variance_preserving=False)
