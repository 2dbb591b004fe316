"""Training objectives of both stages.

Stage 1 (autoencoder): pixel L1 + a structural term (SSIM) + a frequency term (L1 between FFT
magnitudes) stand in for LPIPS, whose pretrained VGG cannot be downloaded here; the KL or VQ
regulariser; and a pix2pix PatchGAN with the hinge loss, switched on after a warm-up and
weighted adaptively as in taming-transformers (Esser et al. 2021), as the LDM paper's stage 1.
Stage 2 (LDM): the eps-prediction MSE on noised latents of the frozen first stage.
"""


import torch
import torch.nn.functional as F
from torch import nn

from latentgen import metrics


# ---- reconstruction terms -------------------------------------------------------------------


def ssim_map(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Differentiable SSIM of [-1, 1] images mapped to [0, 1], per valid pixel and channel."""
    return metrics.ssim_map((x + 1) / 2, (y + 1) / 2, sigma)


def fft_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between the 2-D spectra's magnitudes: punishes the missing high frequencies
    (blur) that pixel losses tolerate."""
    return (torch.fft.rfft2(x.float(), norm="ortho").abs() - torch.fft.rfft2(y.float(), norm="ortho").abs()).abs().mean()


def reconstruction_loss(x: torch.Tensor, xrec: torch.Tensor, ssim_weight: float = 0.2,
                        fft_weight: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 + ssim_weight * (1 - SSIM) + fft_weight * FFT-magnitude L1; the total and its parts."""
    l1 = (x - xrec).abs().mean()
    structural = 1 - ssim_map(x, xrec).mean()
    frequency = fft_loss(x, xrec)
    total = l1 + ssim_weight * structural + fft_weight * frequency
    parts = {"l1": l1.item(), "ssim": 1 - structural.item(), "fft": frequency.item()}
    return total, parts


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over the latent and averaged over the batch (CompVis)."""
    return 0.5 * (mean.square() + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()


# ---- adversarial terms (taming-transformers) --------------------------------------------------


class NLayerDiscriminator(nn.Module):
    """pix2pix PatchGAN: a logit per overlapping patch (70x70 receptive field with 3 layers)."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            previous, mult = mult, min(2**n, 8)
            layers += [nn.Conv2d(ndf * previous, ndf * mult, 4, stride=2 if n < n_layers else 1, padding=1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(module: nn.Module) -> None:
    """pix2pix initialisation: N(0, 0.02) convolutions, N(1, 0.02) batch-norm scales."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))) / 2."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float = 0.5, max_weight: float = 1e4) -> torch.Tensor:
    """taming's `calculate_adaptive_weight`: balance the two gradients at the decoder's last layer,
    ||grad rec|| / (||grad GAN|| + 1e-4), clamped to [0, max_weight], times `disc_weight`, detached."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach() * disc_weight


def gan_factor(step: int, start: int) -> float:
    """taming's `adopt_weight`: 0 during the warm-up, then 1."""
    return 1.0 if step >= start else 0.0


# ---- stage 2 ----------------------------------------------------------------------------------


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, with the same float64 alphas_cumprod as inference."""
    alpha = alphas_cumprod.to(x0.device)[t].view(-1, *[1] * (x0.dim() - 1))
    return (alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise).to(x0.dtype)


def v_target(x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The velocity sqrt(a) eps - sqrt(1 - a) x0 that a v-prediction model learns (Salimans & Ho 2022)."""
    return alpha.sqrt() * noise - (1 - alpha).sqrt() * x0


def min_snr_weights(alpha: torch.Tensor, gamma: float, parameterization: str, plus_one: bool = False) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) over SNR for eps targets,
    over SNR + 1 for v targets (whose plain loss already weighs each step by SNR + 1).

    `plus_one` (v targets only) clamps SNR + 1 instead, min(SNR + 1, gamma) / (SNR + 1): the plain
    v-loss where SNR + 1 <= gamma, capped only at low noise. min(SNR, gamma) / (SNR + 1) falls to 0
    as the noise takes over (0 at t = T on a zero-terminal-SNR schedule), so the steps where the
    text alone must set the layout and colour, and from which trailing samplers start, are hardly
    trained (the question raised in Min-SNR-Diffusion-Training issue #5)."""
    snr = alpha / (1 - alpha)
    clamped = (snr + 1 if plus_one else snr).clamp(max=gamma)
    return clamped / (snr + 1 if parameterization == "v" else snr)


def diffusion_loss(output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L_LDM: per-sample mean squared error to the target (the noise, or v), weighted, averaged over
    the batch; with unit weights and eps targets the simple DDPM loss."""
    per_sample = (output.float() - target.float()).square().flatten(1).mean(1)
    return (weights.float().flatten() * per_sample).mean()
