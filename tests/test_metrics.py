"""PSNR / SSIM against hand computations and scikit-image; gradient energy on known signals."""

import math

import numpy as np
import pytest
import torch

from latentgen.metrics import gradient_energy, psnr, ssim


def _images(seed: int, shape=(1, 3, 40, 33), noise=0.2):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g) * 2 - 1
    b = (a + noise * torch.randn(shape, generator=g)).clamp(-1, 1)
    return a, b


def _uint8(x: torch.Tensor) -> np.ndarray:
    return ((x[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)


def test_psnr_of_a_known_mse():
    a = torch.full((1, 3, 8, 8), -1.0)
    b = a.clone()
    b[..., ::2, :] += 2 * 10 / 255  # half the pixels off by 10 levels: MSE = 50 / 255^2
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 50), abs=1e-9)
    assert psnr(a, a) == math.inf


def test_psnr_is_the_uint8_psnr_with_peak_255():
    a, b = _images(0)
    mse = np.mean((_uint8(a).astype(np.float64) - _uint8(b)) ** 2)
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / mse), abs=1e-9)
    assert psnr(torch.from_numpy(_uint8(a)).permute(2, 0, 1).double(), torch.from_numpy(_uint8(b)).permute(2, 0, 1).double(),
                value_range=(0, 255)) == pytest.approx(psnr(a, b), abs=1e-9)


def test_psnr_without_quantisation_uses_the_float_values():
    a = torch.zeros(1, 1, 4, 4)
    b = a + 0.002  # in [-1, 1]: 0.001 in [0, 1], far below one 8-bit level
    assert psnr(a, b, quantize=False) == pytest.approx(60.0, abs=1e-6)
    assert psnr(a, b) == math.inf


def test_psnr_of_a_batch_is_the_mean_of_per_image_values():
    (a0, b0), (a1, b1) = _images(1, shape=(1, 3, 16, 16)), _images(2, shape=(1, 3, 16, 16), noise=0.05)
    a, b = torch.cat([a0, a1]), torch.cat([b0, b1])
    per_image = [psnr(a[i], b[i]) for i in range(2)]
    assert abs(per_image[0] - per_image[1]) > 5
    assert psnr(a, b) == pytest.approx(sum(per_image) / 2, abs=1e-9)


def test_psnr_y_channel_uses_bt601_luma():
    a, b = _images(3)
    ya = 16 + (_uint8(a).astype(np.float64) @ np.array([65.481, 128.553, 24.966])) / 255
    yb = 16 + (_uint8(b).astype(np.float64) @ np.array([65.481, 128.553, 24.966])) / 255
    expected = 10 * math.log10(255**2 / np.mean((ya - yb) ** 2))
    assert psnr(a, b, y_channel=True) == pytest.approx(expected, abs=1e-9)


def test_ssim_identities():
    a, b = _images(4)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, b) == pytest.approx(ssim(b, a), abs=1e-12)
    assert 0 < ssim(a, b) < 1
    assert ssim(a, _images(4, noise=0.05)[1]) > ssim(a, b)


def test_ssim_of_constant_images_is_the_luminance_term():
    # Zero variance: the structure term is C2 / C2 = 1, only the luminance term remains.
    x, y = 0.25, 0.75
    c1 = 0.01**2
    a = torch.full((1, 3, 12, 12), x * 2 - 1)
    b = torch.full((1, 3, 12, 12), y * 2 - 1)
    expected = (2 * x * y + c1) / (x * x + y * y + c1)
    assert ssim(a, b, quantize=False) == pytest.approx(expected, abs=1e-12)
    assert ssim(a[..., :1, :1], b[..., :1, :1], quantize=False) == pytest.approx(expected, abs=1e-12)


def test_ssim_by_hand_on_one_window():
    # An 11x11 image has exactly one full window: compute Wang et al.'s formula directly.
    g = np.random.default_rng(5)
    x, y = g.random((11, 11)), g.random((11, 11))
    taps = np.exp(-np.arange(-5, 6) ** 2 / (2 * 1.5**2))
    w = np.outer(taps, taps) / np.outer(taps, taps).sum()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * x * x).sum() - mx**2, (w * y * y).sum() - my**2
    cxy = (w * x * y).sum() - mx * my
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    to_tensor = lambda v: torch.from_numpy(v)[None, None]
    assert ssim(to_tensor(x), to_tensor(y), value_range=(0, 1), quantize=False) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("shape", [(1, 3, 40, 33), (1, 3, 11, 11), (1, 1, 64, 20)])
def test_ssim_matches_scikit_image(shape):
    metrics = pytest.importorskip("skimage.metrics")
    a, b = _images(6, shape=shape)
    expected = metrics.structural_similarity(_uint8(a), _uint8(b), gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=False, data_range=255, channel_axis=2)
    assert ssim(a, b) == pytest.approx(expected, abs=1e-12)
    assert psnr(a, b) == pytest.approx(metrics.peak_signal_noise_ratio(_uint8(a), _uint8(b), data_range=255), abs=1e-9)


def test_ssim_matches_scikit_image_on_float_data():
    metrics = pytest.importorskip("skimage.metrics")
    a, b = _images(7)
    unit = lambda t: ((t[0].permute(1, 2, 0).double().numpy() + 1) / 2)
    expected = metrics.structural_similarity(unit(a), unit(b), gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=False, data_range=1.0, channel_axis=2)
    assert ssim(a, b, quantize=False) == pytest.approx(expected, abs=1e-12)


def test_metrics_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        psnr(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))
    with pytest.raises(ValueError, match="shape"):
        ssim(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 5, 4))


def test_gradient_energy_of_a_ramp_and_of_a_blur():
    ramp = (torch.arange(16, dtype=torch.float64) * 0.1).expand(1, 3, 8, 16)
    assert gradient_energy(ramp) == pytest.approx(0.01, abs=1e-12)  # dx = 0.1 everywhere, dy = 0
    assert gradient_energy(torch.ones(1, 3, 5, 5)) == 0
    sharp = (torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(8)) > 0.5).float() * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(sharp, 3, stride=1, padding=1, count_include_pad=False)
    assert gradient_energy(sharp) / gradient_energy(blurred) > 3
