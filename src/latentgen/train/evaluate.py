"""Held-out evaluation on photos-eval (Set5, Set14, BSD68, never trained on): the numbers in the
bundled models' cards, reproducible with `latentgen train evaluate MODEL`.

Each task is scored against the simplest honest baseline, so a number says what the model adds:
autoencoders by PSNR/SSIM of the round trip against storing the image f times smaller (bicubic
down and up, a similar number of values as the latent); super-resolution of a clean bicubic x4 downsample
against bicubic upsampling, with each output's gradient energy relative to the ground truth's (1 is
as sharp as the original, bicubic falls well below); inpainting of seeded LaMa-style masks, PSNR
inside the hole, against OpenCV's Telea inpainting (opencv-python-headless, `pip install
latentgen[eval]`: an evaluation-only dependency). Text-to-image models are scored on colour
prompts instead: how often the generated image's dominant hue is the colour the prompt names.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from latentgen import metrics, tasks
from latentgen.errors import LatentgenError
from latentgen.images import load_image, to_uint8
from latentgen.ldm import LatentDiffusion

from .data import downsample, emoji_at, random_mask, to_tensor

DATASETS = ("set5", "set14", "bsd68")


@dataclass
class Score:
    dataset: str
    image: str
    psnr: float
    ssim: float
    baseline_psnr: Optional[float] = None
    baseline_ssim: Optional[float] = None
    gradient_ratio: Optional[float] = None
    baseline_gradient_ratio: Optional[float] = None
    chroma_error: Optional[float] = None
    baseline_chroma_error: Optional[float] = None
    green: Optional[float] = None
    baseline_green: Optional[float] = None
    original_green: Optional[float] = None


def task_of(model: LatentDiffusion) -> str:
    """What a model is evaluated on: its family says whether it reconstructs, upscales, inpaints or
    draws from text."""
    if model.unet is None:
        return "autoencoder"
    if model.family in ("ldm-sr", "sd2-x4-upscaler"):
        return "sr"
    if model.family.endswith("inpaint"):
        return "inpaint"
    if model.family in ("ldm-txt2img", "sd1", "sd2"):
        return "txt2img"
    raise LatentgenError(f"no held-out evaluation for a {model.family} model "
                         "(autoencoders, SR, inpainting and text-to-image)")


def center_crop(image: torch.Tensor, size: int, multiple: int) -> torch.Tensor:
    """The central square of side min(size, shorter side), or with `size` 0 the whole image, each
    side rounded down to `multiple` (SR needs the high-res sides divisible by its factor; the
    tasks pad everything else themselves)."""
    height, width = ((side if size <= 0 else min(size, *image.shape[-2:])) // multiple * multiple
                     for side in image.shape[-2:])
    top, left = (image.shape[-2] - height) // 2, (image.shape[-1] - width) // 2
    return image[..., top:top + height, left:left + width]


def telea_inpaint(image: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """OpenCV's Telea fast-marching inpainting (radius 3) of the 8-bit image, the classic baseline."""
    try:
        import cv2
    except ImportError as error:
        raise LatentgenError("inpainting evaluation compares with OpenCV's Telea: "
                             "pip install opencv-python-headless (or latentgen[eval])") from error
    mask = (hole[0, 0] > 0.5).byte().mul(255).numpy()
    return to_tensor(cv2.inpaint(to_uint8(image), mask, 3, cv2.INPAINT_TELEA)[None])


def hole_psnr(a: torch.Tensor, b: torch.Tensor, hole: torch.Tensor) -> float:
    """PSNR over the pixels where `hole` is 1, on 8-bit quantised [0, 1] images."""
    x, y = ((t.clamp(-1, 1) + 1).mul(127.5).round() / 255 for t in (a, b))
    mse = float(((x - y) ** 2 * hole).sum() / (hole.sum() * x.shape[1]))
    return math.inf if mse == 0 else -10 * math.log10(mse)


def bicubic_round_trip(image: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(low-res, its bicubic upsampling): a clean antialiased x`factor` downsample and back."""
    low = downsample(image, factor)
    return low, F.interpolate(low, scale_factor=factor, mode="bicubic").clamp(-1, 1)


def score_autoencoder(model: LatentDiffusion, image: torch.Tensor, index: int, options: tasks.Sampling) -> tuple:
    result = tasks.reconstruct(model, image)
    bicubic = bicubic_round_trip(image, model.spec.factor)[1]
    output = result.image.float().cpu()
    return (result.psnr, result.ssim, metrics.psnr(bicubic, image), metrics.ssim(bicubic, image), None, None,
            metrics.chroma_error(output, image), metrics.chroma_error(bicubic, image),
            metrics.green_share(output), metrics.green_share(bicubic), metrics.green_share(image))


def score_sr(model: LatentDiffusion, image: torch.Tensor, index: int, options: tasks.Sampling,
             strength: Optional[float] = None) -> tuple:
    low, bicubic = bicubic_round_trip(image, model.spec.factor)
    high = tasks.upscale(model, low, options, tile=max(16, *low.shape[-2:]), strength=strength)  # one tile: no seams
    truth = metrics.gradient_energy(image)
    return (metrics.psnr(high, image), metrics.ssim(high, image), metrics.psnr(bicubic, image),
            metrics.ssim(bicubic, image), metrics.gradient_energy(high) / truth, metrics.gradient_energy(bicubic) / truth,
            metrics.chroma_error(high, image), metrics.chroma_error(bicubic, image),
            metrics.green_share(high), metrics.green_share(bicubic), metrics.green_share(image))


def score_inpaint(model: LatentDiffusion, image: torch.Tensor, index: int, options: tasks.Sampling,
                  strength: Optional[float] = None) -> tuple:
    hole = random_mask(*image.shape[-2:], torch.Generator().manual_seed(options.seed + index))[None]
    filled = tasks.inpaint(model, image, hole, options=options, feather=0, strength=strength)
    baseline = telea_inpaint(image, hole)
    return (hole_psnr(filled, image, hole), metrics.ssim(filled, image),
            hole_psnr(baseline, image, hole), metrics.ssim(baseline, image))


SCORERS: dict[str, Callable] = {"autoencoder": score_autoencoder, "sr": score_sr, "inpaint": score_inpaint}


def evaluate(model: LatentDiffusion, folder: Path, datasets: tuple[str, ...] = DATASETS, crop: int = 128,
             options: tasks.Sampling = tasks.Sampling(),
             progress: Optional[Callable[[int, int], None]] = None, strength: Optional[float] = None) -> list[Score]:
    """Scores of every image of `datasets` under `folder` (its central `crop` square); SR with
    `strength` (tasks.upscale's and tasks.inpaint's)."""
    task = task_of(model)
    paths = [(name, path) for name in datasets for path in sorted((folder / name).glob("*.png"))]
    if not paths:
        raise LatentgenError(f"no PNG images under {folder} for {', '.join(datasets)}")
    scores = []
    for index, (dataset, path) in enumerate(paths):
        image = center_crop(load_image(path), crop, model.spec.factor)
        with torch.no_grad():
            extra = {"strength": strength} if task in ("sr", "inpaint") else {}
            values = SCORERS[task](model, image, index, options, **extra)
        scores.append(Score(dataset, path.name, *values))
        if progress is not None:
            progress(index + 1, len(paths))
    return scores


@dataclass
class EmojiRoundTrip:
    """Colour fidelity of an autoencoder on saturated flat-colour images (emoji on white)."""

    images: int
    psnr: float
    colour_error: float
    saturation: float
    original_saturation: float


def emoji_round_trip(model: LatentDiffusion, images: np.ndarray, count: int = 48, size: int = 128,
                     seed: int = 0) -> EmojiRoundTrip:
    """Round trip of `count` seeded emoji resized to `size` px: mean PSNR, and over each image's
    coloured (not near-white) pixels the error of the mean colour and the saturation (mean distance
    of a colour's channels from their grey) kept, against the originals'. A decoder that washes
    colours out shows it here, before any diffusion model drawn through it does."""
    chosen = np.random.default_rng(seed).choice(len(images), min(count, len(images)), replace=False)
    originals = emoji_at(images[np.sort(chosen)], size)
    psnrs, errors, saturations, original_saturations = [], [], [], []
    for x in originals.split(1):
        result = tasks.reconstruct(model, x)
        inked = (x.mean(1, keepdim=True) < 0.9).float()
        mean_colour = [(image * inked).sum((2, 3)) / inked.sum().clamp_min(1) for image in (x, result.image.float())]
        psnrs.append(result.psnr)
        errors.append((mean_colour[0] - mean_colour[1]).abs().mean().item())
        original_saturations.append((mean_colour[0] - mean_colour[0].mean()).abs().mean().item())
        saturations.append((mean_colour[1] - mean_colour[1].mean()).abs().mean().item())
    return EmojiRoundTrip(len(psnrs), *(sum(v) / len(v) for v in (psnrs, errors, saturations, original_saturations)))


def summarize(scores: list[Score]) -> dict[str, dict[str, float]]:
    """Mean of each number per dataset (and over all images, as "all")."""
    groups: dict[str, list[Score]] = {}
    for score in scores:
        groups.setdefault(score.dataset, []).append(score)
    groups["all"] = scores
    fields = ("psnr", "ssim", "baseline_psnr", "baseline_ssim", "gradient_ratio", "baseline_gradient_ratio",
              "chroma_error", "baseline_chroma_error", "green", "baseline_green", "original_green")
    return {name: {"images": len(group), **{field: sum(getattr(s, field) for s in group) / len(group)
                                            for field in fields if getattr(group[0], field) is not None}}
            for name, group in groups.items()}


# ---- text-to-image: colour prompts -----------------------------------------------------------

COLOUR_PROMPTS = {"a red heart": "red", "a blue heart": "blue", "a green heart": "green",
                  "a yellow heart": "yellow", "a purple heart": "purple", "an orange heart": "orange",
                  "a red apple": "red", "a green apple": "green"}


@dataclass
class ColourScore:
    prompt: str
    seed: int
    expected: str
    found: Optional[str]


def colour_prompt_scores(model: LatentDiffusion, seeds: int = 10, options: tasks.Sampling = tasks.Sampling(),
                         prompts: dict[str, str] = COLOUR_PROMPTS,
                         progress: Optional[Callable[[int, int], None]] = None) -> list[ColourScore]:
    """Each colour prompt with `seeds` seeds from options.seed: the colour asked for and the dominant one made."""
    scores = []
    for prompt, expected in prompts.items():
        batch = tasks.txt2img(model, [prompt] * seeds, options=options)  # image i: seed options.seed + i
        scores += [ColourScore(prompt, options.seed + i, expected, metrics.dominant_colour(image[None]))
                   for i, image in enumerate(batch)]
        if progress is not None:
            progress(len(scores), len(prompts) * seeds)
    return scores
