"""Samplers: each a short loop over a model callable and a `Schedule`, in the style of k-diffusion,
followed by its `SAMPLERS` entry, the one place that says what `sample` may pass it. Adding a
sampler is writing the two.

The model is any `model(x, t) -> output`: `x` a latent as the model was trained on (variance
preserving), `t` a float Tensor[B] of DDPM timesteps in [0, T - 1] (fractional for the k-diffusion
samplers), `output` the predicted noise ("eps") or velocity ("v"). Conditioning, guidance and the
UNet itself are bound into it (see guidance.py).

Randomness: `make_noise` and the samplers' per-step noise draw float32 normals on the CPU from a
torch.Generator by default, so a seed gives the same image on every device; a generator created
on the device (`on_device=True`) draws there instead, faster but device-dependent. A list of
generators, one per batch row, makes each image's noise independent of the batch it is in.
"""

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .errors import LatentgenError
from .schedules import Schedule, ddim_schedule, ddpm_schedule, dpm_schedule, euler_schedule, lcm_schedule

Model = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, int, Tensor, Tensor], None]
"""callback(step_index, total_steps, x_after_step, x0_prediction), called after every step."""
Blend = Callable[[Tensor, int], Tensor]
"""blend(x, step_index) -> x with its known region reset (masked sampling); identity otherwise."""
Generators = Optional[Union[torch.Generator, Sequence[torch.Generator]]]
"""One generator for the whole batch, or one per batch row."""


@dataclass(frozen=True)
class Sampler:
    """What `sample` knows of one sampler. Where a flag is set `sample` passes the option on, where
    it is not the option is an error, so a sampler function takes only what it uses.

    - `run(model, x, schedule, parameterization, *, callback, blend)`, plus `generator=` when
      `stochastic` (it draws fresh noise every step; DDIM only when eta > 0) and `eta=` when `eta`;
    - `schedule(alphas_cumprod, steps)` the levels it walks, plus `spacing=` ("uniform" | "quad")
      when `spacing` and `karras=` (Karras sigmas) when `karras`.
    """

    run: Callable[..., Tensor]
    schedule: Callable[..., Schedule]
    title: str
    """The name AUTOMATIC1111 shows and writes in its PNG parameters ("DPM++ 2M")."""
    stochastic: bool = False
    eta: bool = False
    spacing: bool = False
    karras: bool = False


SAMPLERS: dict[str, Sampler] = {}
"""Sampler name -> its entry, in the order the CLI lists them; each entry stands below its function."""

PARAMETERIZATIONS = ("eps", "v")


def make_noise(shape: tuple, seed: int, device="cpu", dtype: torch.dtype = torch.float32,
               on_device: bool = False) -> Tensor:
    """Standard normal noise for a seed: drawn in float32 on the CPU (the same numbers on every
    device and dtype), or with a generator on `device` itself when `on_device`."""
    return normal(shape, seeded_generator(seed, device, on_device), device, dtype)


def seeded_generator(seed: int, device="cpu", on_device: bool = False) -> torch.Generator:
    """A generator on the CPU, or on `device` itself when `on_device`."""
    return torch.Generator(torch.device(device) if on_device else torch.device("cpu")).manual_seed(seed)


def normal(shape: tuple, generator: Optional[torch.Generator], device="cpu",
           dtype: torch.dtype = torch.float32) -> Tensor:
    """float32 standard normals drawn on the generator's device (the CPU without one), then moved."""
    where = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=where, dtype=torch.float32).to(device, dtype)


def _randn_like(x: Tensor, generator: Generators) -> Tensor:
    """Per-step noise, drawn like `make_noise`; row by row from a list of generators."""
    if isinstance(generator, Sequence):
        if len(generator) != len(x):
            raise ValueError(f"{len(generator)} generators for a batch of {len(x)}")
        return torch.cat([normal((1, *x.shape[1:]), g, x.device, x.dtype) for g in generator])
    return normal(x.shape, generator, x.device, x.dtype)


def _call(model: Model, x: Tensor, t: float) -> Tensor:
    return model(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32))


def _eps_and_x0(output: Tensor, x: Tensor, alpha: float, parameterization: str) -> tuple[Tensor, Tensor]:
    """A model output at the variance-preserving latent x (alphas_cumprod = alpha) as (eps, x0)."""
    if parameterization == "v":
        return alpha**0.5 * output + (1 - alpha) ** 0.5 * x, alpha**0.5 * x - (1 - alpha) ** 0.5 * output
    return output, (x - (1 - alpha) ** 0.5 * output) / alpha**0.5


def _denoise(model: Model, x: Tensor, sigma: float, t: float, parameterization: str) -> Tensor:
    """x0 predicted from the k-diffusion latent x = x0 + sigma eps (k-diffusion's
    DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser): the model sees x / sqrt(sigma^2 + 1)."""
    c_in = (sigma**2 + 1) ** -0.5
    output = _call(model, x * c_in, t)
    if parameterization == "v":
        return x * c_in**2 - output * sigma * c_in
    return x - output * sigma


def _unchanged(x: Tensor, i: int) -> Tensor:
    return x


def _silent(i: int, total: int, x: Tensor, x0: Tensor) -> None:
    return None


# ---- CompVis samplers, on variance-preserving latents ------------------------------------------


def sample_ddpm(model: Model, x: Tensor, schedule: Schedule, parameterization: str = "eps", *,
                generator: Generators = None, callback: Callback = _silent,
                blend: Blend = _unchanged) -> Tensor:
    """Ancestral sampling from the DDPM posterior q(x_prev | x_t, x0) (Ho et al. 2020), with the betas
    of the respaced chain, 1 - alpha_t / alpha_prev, when the schedule skips timesteps."""
    alphas = schedule.alphas_cumprod
    for i, t in enumerate(schedule.timesteps):
        x = blend(x, i)
        a, a_prev = alphas[i], alphas[i + 1]
        beta = 1 - a / a_prev
        _, x0 = _eps_and_x0(_call(model, x, t), x, a, parameterization)
        mean = beta * a_prev**0.5 / (1 - a) * x0 + (1 - a_prev) * (1 - beta) ** 0.5 / (1 - a) * x
        std = (beta * (1 - a_prev) / (1 - a)) ** 0.5
        x = mean + std * _randn_like(x, generator) if std > 0 else mean
        callback(i, len(schedule), x, x0)
    return x


SAMPLERS["ddpm"] = Sampler(run=sample_ddpm, schedule=ddpm_schedule, title="DDPM", stochastic=True)


def sample_ddim(model: Model, x: Tensor, schedule: Schedule, parameterization: str = "eps", *,
                eta: float = 0.0, generator: Generators = None,
                callback: Callback = _silent, blend: Blend = _unchanged) -> Tensor:
    """DDIM (Song et al. 2021) as CompVis `p_sample_ddim`; eta 0 is deterministic, eta 1 ancestral."""
    alphas = schedule.alphas_cumprod
    for i, t in enumerate(schedule.timesteps):
        x = blend(x, i)
        a, a_prev = alphas[i], alphas[i + 1]
        eps, x0 = _eps_and_x0(_call(model, x, t), x, a, parameterization)
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        x = a_prev**0.5 * x0 + (1 - a_prev - sigma**2) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * _randn_like(x, generator)
        callback(i, len(schedule), x, x0)
    return x


SAMPLERS["ddim"] = Sampler(run=sample_ddim, schedule=ddim_schedule, title="DDIM", stochastic=True, eta=True, spacing=True)


def sample_plms(model: Model, x: Tensor, schedule: Schedule, parameterization: str = "eps", *,
                callback: Callback = _silent, blend: Blend = _unchanged) -> Tensor:
    """Pseudo linear multistep (Liu et al. 2022) as CompVis `plms.py`: Adams-Bashforth over the last
    four eps predictions, the first step a pseudo improved Euler step (two model calls).

    v outputs become eps where they were predicted, so v models take the same steps as eps models
    (diffusers' PNDMScheduler instead combines raw v outputs, a cruder extrapolation)."""
    alphas, timesteps = schedule.alphas_cumprod, schedule.timesteps
    history: list[Tensor] = []

    def eps_at(x: Tensor, j: int) -> Tensor:
        return _eps_and_x0(_call(model, x, timesteps[j]), x, alphas[j], parameterization)[0]

    def ddim_step(eps: Tensor, x: Tensor, i: int) -> tuple[Tensor, Tensor]:
        x0 = (x - (1 - alphas[i]) ** 0.5 * eps) / alphas[i] ** 0.5
        return alphas[i + 1] ** 0.5 * x0 + (1 - alphas[i + 1]) ** 0.5 * eps, x0

    for i in range(len(schedule)):
        x = blend(x, i)
        eps = eps_at(x, i)
        if not history:
            x_next, _ = ddim_step(eps, x, i)
            combined = (eps + eps_at(x_next, min(i + 1, len(schedule) - 1))) / 2
        elif len(history) == 1:
            combined = (3 * eps - history[-1]) / 2
        elif len(history) == 2:
            combined = (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            combined = (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        history = (history + [eps])[-3:]
        x, x0 = ddim_step(combined, x, i)
        callback(i, len(schedule), x, x0)
    return x


SAMPLERS["plms"] = Sampler(run=sample_plms, schedule=ddim_schedule, title="PLMS", spacing=True)


# ---- k-diffusion samplers, on x0 + sigma eps -------------------------------------------------


def sample_dpmpp_2m(model: Model, x: Tensor, schedule: Schedule, parameterization: str = "eps", *,
                    callback: Callback = _silent, blend: Blend = _unchanged) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in log-SNR on the x0 predictions;
    first order for the first step and for the last one, which lands on sigma 0."""
    sigmas = schedule.sigmas
    previous: Optional[tuple[Tensor, float]] = None
    for i, t in enumerate(schedule.timesteps):
        x = blend(x, i)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = _denoise(model, x, sigma, t, parameterization)
        if sigma_next == 0:
            x = x0
        else:
            h = math.log(sigma / sigma_next)
            estimate = x0
            if previous is not None:
                old_x0, h_last = previous
                r = h_last / h
                estimate = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * old_x0
            x = sigma_next / sigma * x - math.expm1(-h) * estimate
            previous = (x0, h)
        callback(i, len(schedule), x, x0)
    return x


SAMPLERS["dpmpp_2m"] = Sampler(run=sample_dpmpp_2m, schedule=dpm_schedule, title="DPM++ 2M", karras=True)


def sample_euler(model: Model, x: Tensor, schedule: Schedule, parameterization: str = "eps", *,
                 callback: Callback = _silent, blend: Blend = _unchanged) -> Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0) / sigma (Karras et al. 2022)."""
    sigmas = schedule.sigmas
    for i, t in enumerate(schedule.timesteps):
        x = blend(x, i)
        x0 = _denoise(model, x, sigmas[i], t, parameterization)
        x = x + (x - x0) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        callback(i, len(schedule), x, x0)
    return x


SAMPLERS["euler"] = Sampler(run=sample_euler, schedule=euler_schedule, title="Euler", karras=True)


def sample_euler_ancestral(model: Model, x: Tensor, schedule: Schedule, parameterization: str = "eps", *,
                           generator: Generators = None,
                           callback: Callback = _silent, blend: Blend = _unchanged) -> Tensor:
    """Euler down to sigma_down, then fresh noise up to the next level (k-diffusion, eta 1)."""
    sigmas = schedule.sigmas
    for i, t in enumerate(schedule.timesteps):
        x = blend(x, i)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = _denoise(model, x, sigma, t, parameterization)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x = x + (x - x0) / sigma * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + sigma_up * _randn_like(x, generator)
        callback(i, len(schedule), x, x0)
    return x


SAMPLERS["euler_a"] = Sampler(run=sample_euler_ancestral, schedule=euler_schedule, title="Euler a", stochastic=True, karras=True)


LCM_SIGMA_DATA, LCM_TIMESTEP_SCALING = 0.5, 10.0


def sample_lcm(model: Model, x: Tensor, schedule: Schedule, parameterization: str = "eps", *,
               generator: Generators = None, callback: Callback = _silent, blend: Blend = _unchanged) -> Tensor:
    """Latent Consistency Model sampling (Luo et al. 2023), for LCM-distilled models and LCM-LoRA:
    each step maps x_t to the consistency function's x0 (the boundary-conditioned mix of the model's
    x0 and x_t), then, but after the last, noises it afresh to the next level."""
    alphas = schedule.alphas_cumprod
    for i, t in enumerate(schedule.timesteps):
        x = blend(x, i)
        _, x0 = _eps_and_x0(_call(model, x, t), x, alphas[i], parameterization)
        scaled = t * LCM_TIMESTEP_SCALING
        c_skip = LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + LCM_SIGMA_DATA**2) ** 0.5
        denoised = c_out * x0 + c_skip * x
        a_next = alphas[i + 1]
        x = denoised if i == len(schedule) - 1 else a_next**0.5 * denoised + (1 - a_next) ** 0.5 * _randn_like(x, generator)
        callback(i, len(schedule), x, denoised)
    return x


SAMPLERS["lcm"] = Sampler(run=sample_lcm, schedule=lcm_schedule, title="LCM", stochastic=True)


def _plain(name: str) -> str:
    return name.lower().replace("++", "pp").replace(" ", "").replace("_", "").replace("-", "")


def resolve_sampler(name: str) -> tuple[str, bool]:
    """(our sampler name, Karras sigmas) for a name as latentgen ("dpmpp_2m"), AUTOMATIC1111
    ("DPM++ 2M Karras", "Euler a") or stable-diffusion.cpp ("dpm++2m", "euler_a") spell it."""
    plain = _plain(name)
    karras = plain.endswith("karras") and plain != "karras"
    plain = plain.removesuffix("karras") if karras else plain
    for key, entry in SAMPLERS.items():
        if plain in (_plain(key), _plain(entry.title)):
            return key, karras
    raise LatentgenError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)} "
                         f"(or AUTOMATIC1111's {', '.join(repr(e.title) for e in SAMPLERS.values())})")


def schedule_for(name: str, alphas_cumprod: Tensor, steps: int, spacing: str = "uniform",
                 karras: bool = False) -> Schedule:
    """The levels sampler `name` walks for `steps` steps."""
    entry = SAMPLERS[name]
    options: dict[str, Any] = {}
    if entry.spacing:
        options["spacing"] = spacing
    if entry.karras:
        options["karras"] = karras
    return entry.schedule(alphas_cumprod, steps, **options)


def noised(x0: Tensor, noise: Tensor, sigma: float, variance_preserving: bool) -> Tensor:
    """x0 brought to noise level sigma, in the latent convention of the schedule."""
    x = x0 + sigma * noise
    return x / (1 + sigma**2) ** 0.5 if variance_preserving else x


def _taking(option: str) -> str:
    """The samplers whose entry takes `option`, for the error that refuses it elsewhere."""
    return ", ".join(name for name, entry in SAMPLERS.items() if getattr(entry, option))


def _check(name: str, x_T: Tensor, alphas_cumprod: Tensor, parameterization: str, steps: int, eta: float,
           spacing: str, karras: bool, x0: Optional[Tensor], mask: Optional[Tensor], strength: float) -> None:
    if name not in SAMPLERS:
        raise LatentgenError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    entry = SAMPLERS[name]
    if parameterization not in PARAMETERIZATIONS:
        raise LatentgenError(f"unknown parameterization {parameterization!r}; choose eps or v")
    if not 1 <= steps <= len(alphas_cumprod):
        raise LatentgenError(f"steps must be between 1 and {len(alphas_cumprod)}, got {steps}")
    if not 0 <= eta <= 1:
        raise LatentgenError(f"eta must be between 0 and 1, got {eta}")
    if eta != 0 and not entry.eta:
        raise LatentgenError(f"eta applies to {_taking('eta')} only, not {name}")
    if spacing != "uniform" and not entry.spacing:
        raise LatentgenError(f"timestep spacing {spacing!r} applies to {_taking('spacing')} only, not {name}")
    if karras and not entry.karras:
        raise LatentgenError(f"karras applies to {_taking('karras')} only, not {name}")
    if not 0 < strength <= 1:
        raise LatentgenError(f"strength must be in (0, 1], got {strength}")
    if x0 is None and (mask is not None or strength < 1):
        raise LatentgenError("masked sampling and strength < 1 need the original latent x0")
    if x0 is not None and x0.shape != x_T.shape:
        raise LatentgenError(f"x0 has shape {tuple(x0.shape)}, the noise {tuple(x_T.shape)}")
    if mask is not None and not _broadcasts_to(mask.shape, x_T.shape):
        raise LatentgenError(f"mask of shape {tuple(mask.shape)} does not fit latents {tuple(x_T.shape)}")


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    return len(shape) <= len(target) and all(n in (1, m) for n, m in zip(reversed(shape), reversed(target)))


def _computing_in(model: Model, model_dtype: torch.dtype, dtype: torch.dtype) -> Model:
    """The model sees latents in its own (half) precision; the sampler keeps its state in `dtype`,
    as a half-precision latent would drift over many small updates."""
    return lambda x, t: model(x.to(model_dtype), t).to(dtype)


def _keep_known(x0: Tensor, mask: Tensor, schedule: Schedule, generator: Generators) -> Blend:
    """Where mask == 1, replace the latent by x0 noised afresh to the step's level (CompVis)."""
    def blend(x: Tensor, i: int) -> Tensor:
        known = noised(x0, _randn_like(x0, generator), schedule.sigmas[i], schedule.variance_preserving)
        return mask * known + (1 - mask) * x

    return blend


def sample(name: str, model: Model, x_T: Tensor, alphas_cumprod: Tensor, parameterization: str = "eps",
           steps: int = 50, *, eta: float = 0.0, spacing: str = "uniform", karras: bool = False,
           x0: Optional[Tensor] = None, mask: Optional[Tensor] = None, strength: float = 1.0,
           generator: Generators = None, callback: Optional[Callback] = None) -> Tensor:
    """Run sampler `name` from the unit-variance noise `x_T` and return the final latent.

    - `alphas_cumprod`: the model's training schedule (float64, from schedules.py); `steps` the
      requested count (DDIM/PLMS "uniform" spacing follows CompVis and may run one more, see
      `ddim_timesteps`). `eta`, `spacing` ("uniform" | "quad") and `karras` (Karras sigmas) are
      errors for a sampler whose `SAMPLERS` entry does not take them.
    - `generator` draws the stochastic samplers' per-step noise and the masking noise, on its device
      (give a CPU generator for device-independent results).
    - img2img: with `strength` < 1 only the last int(strength * n) of the schedule's n steps run,
      starting from `x0` noised by `x_T` to that step's level; strength 1 ignores `x0` and starts
      from pure noise, as txt2img.
    - Masked sampling: `mask` == 1 marks the region to KEEP (CompVis convention; inpainting passes
      1 - the region to fill). Before every step that region becomes `x0` noised to the step's level
      and at the end it equals `x0` exactly. `mask` broadcasts against the latent, values in [0, 1];
      `x0` and `mask` are moved to `x_T`'s device.
    - The model gets latents in `x_T`'s dtype, the samplers compute in at least float32, and the
      result comes back in `x_T`'s dtype.
    - `callback(i, total, x, x0_pred)` follows every step.
    """
    _check(name, x_T, alphas_cumprod, parameterization, steps, eta, spacing, karras, x0, mask, strength)
    entry = SAMPLERS[name]
    model_dtype, dtype = x_T.dtype, torch.promote_types(x_T.dtype, torch.float32)
    if model_dtype != dtype:
        model = _computing_in(model, model_dtype, dtype)
    x_T, x0, mask = (None if v is None else v.to(x_T.device, dtype) for v in (x_T, x0, mask))
    schedule = schedule_for(name, alphas_cumprod, steps, spacing, karras)
    if strength < 1:
        remaining = int(strength * len(schedule))
        if remaining < 1:
            raise LatentgenError(f"strength {strength} leaves no step to run out of {len(schedule)}")
        schedule = schedule.last(remaining)
        x = noised(x0, x_T, schedule.sigmas[0], schedule.variance_preserving)
    else:
        x = x_T if schedule.variance_preserving else x_T * schedule.sigmas[0]
    options: dict[str, Any] = {"callback": callback or _silent,
                               "blend": _unchanged if mask is None else _keep_known(x0, mask, schedule, generator)}
    if entry.stochastic:
        options["generator"] = generator
    if entry.eta:
        options["eta"] = eta
    x = entry.run(model, x, schedule, parameterization, **options)
    return (x if mask is None else mask * x0 + (1 - mask) * x).to(model_dtype)
