"""Cheap pictures of a latent while it is being sampled: a linear latent-to-RGB projection fitted
to each first stage (what stable-diffusion.cpp calls `proj`), or a TAESD decoder.

The projection is fitted by least squares, from the latents of seeded smooth colour images to those
images averaged over f x f blocks. The bundled models store theirs in config.json
(`preview_projection`, written by training's export and `latentgen train fit-preview`); any other
model's is fitted on first use and kept in `cache_dir()/previews.json` by the model's hash.
"""

import json
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LatentgenError
from .files import atomic_write
from .ldm import LatentDiffusion
from .loader import cache_dir, load_state_dict

PROBES, PROBE_SIZE = 16, 64


def _probe_images(generator: torch.Generator) -> torch.Tensor:
    """Smooth random colour fields in [-1, 1]: every hue and brightness, no texture."""
    coarse = torch.rand(PROBES, 3, 4, 4, generator=generator) * 2 - 1
    return F.interpolate(coarse, size=(PROBE_SIZE, PROBE_SIZE), mode="bicubic", align_corners=False).clamp(-1, 1)


def fit_projection(first_stage: nn.Module, scale_factor: float, factor: int) -> torch.Tensor:
    """[C + 1, 3]: RGB in [-1, 1] ~ [z, 1] @ P for a diffusion model's latents z (first-stage latents
    times `scale_factor`)."""
    images = _probe_images(torch.Generator().manual_seed(0))
    reference = next(first_stage.parameters())
    with torch.no_grad():
        z = (first_stage.encode(images.to(reference)) * scale_factor).float().cpu()
    target = F.avg_pool2d(images, factor)
    inputs = torch.cat([z, torch.ones_like(z[:, :1])], 1).permute(0, 2, 3, 1).reshape(-1, z.shape[1] + 1)
    return torch.linalg.lstsq(inputs.double(), target.permute(0, 2, 3, 1).reshape(-1, 3).double()).solution.float()


def projection(model: LatentDiffusion) -> torch.Tensor:
    """The model's stored projection, or one fitted to its first stage (from the cache when it has one)."""
    if model.spec.preview_projection is not None:
        return torch.tensor(model.spec.preview_projection)
    file = cache_dir() / "previews.json"
    try:
        cache = json.loads(file.read_text())
    except (OSError, ValueError):
        cache = {}
    key = f"{model.sha256}:{model.spec.scale_factor}"
    if key in cache:
        return torch.tensor(cache[key])
    result = fit_projection(model.first_stage, model.spec.scale_factor, model.spec.factor)
    cache[key] = result.tolist()
    try:
        atomic_write(file, json.dumps(cache))
    except OSError:
        pass
    return result


def project(z: torch.Tensor, matrix: torch.Tensor, factor: int) -> torch.Tensor:
    """Latents [B, C, h, w] -> preview images [B, 3, h * f, w * f] in [-1, 1]."""
    z = z.float().cpu()
    rgb = torch.einsum("bchw,cd->bdhw", z, matrix[:-1]) + matrix[-1][None, :, None, None]
    return F.interpolate(rgb, scale_factor=factor, mode="nearest").clamp(-1, 1)


# ---- TAESD (madebyollin's tiny autoencoder), decoder only --------------------------------------


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def taesd_decoder(latent_channels: int = 4, width: int = 64) -> nn.Sequential:
    """TAESD's decoder in its file's layout (an nn.Sequential, keys "1.weight", "3.conv.0.weight" ...):
    diffusion latents -> RGB in [0, 1] at 8x."""
    layers: list[nn.Module] = [Clamp(), nn.Conv2d(latent_channels, width, 3, padding=1), nn.ReLU()]
    for _ in range(3):
        layers += [Block(width), Block(width), Block(width), nn.Upsample(scale_factor=2),
                   nn.Conv2d(width, width, 3, padding=1, bias=False)]
    layers += [Block(width), nn.Conv2d(width, 3, 3, padding=1)]
    return nn.Sequential(*layers)


def load_taesd(path, latent_channels: int) -> nn.Sequential:
    """A TAESD decoder file (.pth through the safe unpickler, or .safetensors), strictly matched."""
    state = {k.removeprefix("decoder.layers."): v for k, v in load_state_dict(path).items()}
    decoder = taesd_decoder(latent_channels)
    try:
        decoder.load_state_dict(state)
    except RuntimeError as error:
        raise LatentgenError(f"{path} is not a TAESD decoder for {latent_channels}-channel latents: "
                             f"{str(error).splitlines()[0]}") from None
    return decoder.eval().requires_grad_(False)


# ---- the writer a sampling loop calls ----------------------------------------------------------

PreviewWriter = Callable[[int, int, torch.Tensor], None]


def preview_writer(model: LatentDiffusion, path, every: int, taesd: Optional[nn.Module] = None) -> PreviewWriter:
    """`writer(done, total, x0)`: every `every` steps and after the last, the first image of the x0
    estimate to `path` (atomically)."""
    from .images import save_image

    if every < 1:
        raise LatentgenError(f"previews need a positive step interval, got {every}")
    if taesd is not None and model.spec.factor != 8:
        raise LatentgenError(f"TAESD decodes f=8 latents; {model.name} has f={model.spec.factor}")
    matrix = None if taesd is not None else projection(model)

    def write(done: int, total: int, x0: torch.Tensor) -> None:
        if done % every and done != total:
            return
        with torch.no_grad():
            if taesd is not None:
                image = taesd(x0[:1].float().cpu()) * 2 - 1
            else:
                image = project(x0[:1], matrix, model.spec.factor)
        save_image(image.clamp(-1, 1), path, overwrite=True)

    return write
