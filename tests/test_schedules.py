import numpy as np
import pytest
import torch

from latentgen.errors import LatentgenError
from latentgen.schedules import (
    ddim_schedule, ddim_timesteps, ddpm_schedule, dpm_schedule, euler_schedule, interpolate_sigma, karras_sigmas,
    make_alphas_cumprod, make_betas, sigma_to_t, sigmas_of,
)


def test_linear_is_linear_in_sqrt_beta():
    betas = make_betas("linear", 1000, 0.00085, 0.012)
    assert betas.dtype == torch.float64
    assert torch.isclose(betas[0], torch.tensor(0.00085, dtype=torch.float64))
    assert torch.isclose(betas[-1], torch.tensor(0.012, dtype=torch.float64))
    root = betas.sqrt()
    assert torch.allclose(root[1:] - root[:-1], (root[1] - root[0]).expand(999), atol=1e-12)


def test_cosine_is_decreasing_and_bounded():
    ac = make_alphas_cumprod("cosine", 1000, 1e-4, 2e-2)
    assert (ac[1:] < ac[:-1]).all() and ac[0] < 1 and ac[-1] >= 0


# ---- sampling schedules ------------------------------------------------------------------------

SD = make_alphas_cumprod("linear", 1000, 0.00085, 0.012)


def compvis_ddim_timesteps(steps, spacing):
    """CompVis `make_ddim_timesteps`, as written there (numpy)."""
    if spacing == "uniform":
        return np.asarray(list(range(0, 1000, 1000 // steps))) + 1
    return ((np.linspace(0, np.sqrt(1000 * 0.8), steps)) ** 2).astype(int) + 1


@pytest.mark.parametrize("steps", [10, 20, 25, 30, 50, 100, 200, 250])
@pytest.mark.parametrize("spacing", ["uniform", "quad"])
def test_ddim_timesteps_are_compvis(steps, spacing):
    assert ddim_timesteps(steps, 1000, spacing) == compvis_ddim_timesteps(steps, spacing).tolist()


def test_ddim_uniform_spacing_quirks():
    assert len(ddim_timesteps(30)) == 31  # as CompVis: ceil(1000 / 33) steps
    assert ddim_timesteps(9) == [1 + 111 * k for k in range(9)]  # CompVis would index alphas_cumprod[1000]
    assert ddim_timesteps(1000) == list(range(1, 1000))
    with pytest.raises(LatentgenError):
        ddim_timesteps(0)


def test_ddim_schedule_ends_at_alphas_cumprod_0():
    schedule = ddim_schedule(SD, 50)
    assert schedule.timesteps[0] == 981 and schedule.timesteps[-1] == 1 and len(schedule) == 50
    assert schedule.alphas_cumprod[-1] == pytest.approx(float(SD[0]), rel=1e-12)
    assert schedule.alphas_cumprod[0] == pytest.approx(float(SD[981]), rel=1e-12)
    tail = schedule.last(10)
    assert tail.timesteps == schedule.timesteps[-10:] and tail.sigmas == schedule.sigmas[-11:]


def test_ddpm_schedule_full_and_respaced():
    full = ddpm_schedule(SD, 1000)
    assert full.timesteps == tuple(float(t) for t in range(999, -1, -1)) and full.sigmas[-1] == 0
    respaced = ddpm_schedule(SD, 4)
    assert respaced.timesteps == (999.0, 666.0, 333.0, 0.0)


def test_sigma_interpolation_and_inverse():
    table = sigmas_of(SD)
    t = torch.tensor([0.0, 1.0, 500.0, 999.0], dtype=torch.float64)
    assert torch.equal(interpolate_sigma(t, SD), table[[0, 1, 500, 999]])
    assert interpolate_sigma(torch.tensor([10.25], dtype=torch.float64), SD) == pytest.approx(
        float(0.75 * table[10] + 0.25 * table[11]), rel=1e-12)
    assert torch.allclose(sigma_to_t(table[[0, 7, 500, 999]], SD), t.new_tensor([0, 7, 500, 999]), atol=1e-9)
    midway = (table[7].log() + table[8].log()).div(2).exp()
    assert sigma_to_t(midway[None], SD).item() == pytest.approx(7.5, abs=1e-9)


def test_karras_sigmas():
    sigmas = karras_sigmas(0.03, 14.6, 10)
    assert sigmas[0] == pytest.approx(14.6) and sigmas[-1] == pytest.approx(0.03)
    assert (sigmas[1:] < sigmas[:-1]).all()
    roots = sigmas ** (1 / 7)
    assert torch.allclose(roots[1:] - roots[:-1], (roots[1] - roots[0]).expand(9), atol=1e-12)


@pytest.mark.parametrize("karras", [False, True])
def test_k_diffusion_schedules_match_diffusers(karras):
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    betas = make_betas("linear", 1000, 0.00085, 0.012).numpy()
    euler = EulerDiscreteScheduler(trained_betas=betas, use_karras_sigmas=karras)
    euler.set_timesteps(15)
    ours = euler_schedule(SD, 15, karras)
    # diffusers' alphas_cumprod is a float32 product: sigma(0) differs by 1.3e-5 relative.
    assert np.allclose(ours.timesteps, euler.timesteps.numpy(), rtol=0, atol=2e-3)
    assert np.allclose(ours.sigmas, euler.sigmas.numpy(), rtol=3e-5)
    dpm = DPMSolverMultistepScheduler(trained_betas=betas, use_karras_sigmas=karras)
    dpm.set_timesteps(15)
    ours = dpm_schedule(SD, 15, karras)
    assert np.allclose(ours.sigmas, dpm.sigmas.numpy(), rtol=3e-5)
    # diffusers rounds DPM-Solver's Karras timesteps; we keep them where the sigmas are.
    assert np.allclose(np.round(ours.timesteps), dpm.timesteps.numpy())


def test_zero_terminal_snr_matches_diffusers_rescale_and_trailing_spacing():
    """Lin et al. 2023 as diffusers implements it: the same alphas_cumprod (ours floors the last,
    0, at 2^-24 so that sigmas stay finite) and the same trailing DDIM timesteps."""
    from diffusers import DDIMScheduler
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    betas = make_betas("linear", 1000, 0.00085, 0.012)
    theirs = torch.cumprod(1 - rescale_zero_terminal_snr(betas), 0)
    ours = make_alphas_cumprod("linear", 1000, 0.00085, 0.012, zero_terminal_snr=True)
    torch.testing.assert_close(ours[:-1], theirs[:-1], rtol=0, atol=1e-12)
    assert theirs[-1] == 0 and ours[-1] == 2.0**-24 and ours[0] == make_alphas_cumprod("linear", 1000, 0.00085, 0.012)[0]
    for steps in (4, 10, 25):
        scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  timestep_spacing="trailing")
        scheduler.set_timesteps(steps)
        assert ddim_timesteps(steps, 1000, "trailing")[::-1] == scheduler.timesteps.tolist()
