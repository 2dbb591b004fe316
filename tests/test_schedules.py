import torch

from latentgen.schedules import make_alphas_cumprod, make_betas


def test_linear_is_linear_in_sqrt_beta():
    betas = make_betas("linear", 1000, 0.00085, 0.012)
    assert betas.dtype == torch.float64
    assert torch.isclose(betas[0], torch.tensor(0.00085, dtype=torch.float64))
    assert torch.isclose(betas[-1], torch.tensor(0.012, dtype=torch.float64))
    root = betas.sqrt()
    assert torch.allclose(root[1:] - root[:-1], (root[1] - root[0]).expand(999), atol=1e-12)


def test_cosine_is_decreasing_and_bounded():
    ac = make_alphas_cumprod("cosine", 1000)
    assert (ac[1:] < ac[:-1]).all() and ac[0] < 1 and ac[-1] >= 0
