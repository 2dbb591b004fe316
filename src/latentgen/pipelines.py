"""The four user tasks over a loaded LatentDiffusion: no model code, no PIL, no CLI.

Images cross in and out as float tensors in [-1, 1], NCHW. Only this module applies
`scale_factor` between the autoencoder's latents and the diffusion model's.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from . import detect, metrics
from .errors import LatentgenError
from .guidance import Conditioning, guided_model
from .images import composite, crop_padding, format_parameters, pad_to_multiple
from .ldm import LatentDiffusion
from .loader import file_sha256, read_params
from .models.text import ClassEmbedder
from .samplers import Generators, normal, sample, seeded_generator
from .tiling import map_tiled

DEFAULT_STEPS = 50
Progress = Optional[Callable[[int, int], None]]


@dataclass
class Sampling:
    """How to sample, as the user asked; `seed` is the first image's seed."""

    sampler: str = "ddim"
    steps: int = DEFAULT_STEPS
    eta: float = 0.0
    karras: bool = False
    scale: float = 1.0
    seed: int = 0
    on_device_noise: bool = False


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LatentgenError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LatentgenError("--device cuda asked for, but torch sees no CUDA GPU")
    return device


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if name not in DTYPES:
        raise LatentgenError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def prepare(model: LatentDiffusion, device: str = "auto", dtype: str = "auto") -> LatentDiffusion:
    """Move the model to the chosen device and dtype, once, and switch to inference mode."""
    target = pick_device(device)
    return model.to(target, pick_dtype(dtype, target)).eval()


def _params(module: torch.nn.Module) -> torch.Tensor:
    return next(module.parameters())


def latent_factor(model: LatentDiffusion) -> int:
    """Downsampling factor f of the first stage: 2 ** (number of resolution levels - 1)."""
    return 2 ** (len(model.first_stage.encoder.down) - 1)


def size_multiple(model: LatentDiffusion) -> int:
    """Pixel sizes must divide by f times the UNet's total downsampling."""
    levels = len(model.config["unet_config"]["params"]["channel_mult"]) if model.unet is not None else 1
    return latent_factor(model) * 2 ** (levels - 1)


def native_size(model: LatentDiffusion) -> int:
    return int(model.config["unet_config"]["params"]["image_size"]) * latent_factor(model)


def check_size(model: LatentDiffusion, height: Optional[int], width: Optional[int]) -> tuple[int, int]:
    """The requested size, or the model's native one; larger than native is allowed (convolutional sampling)."""
    step = size_multiple(model)
    height, width = height or native_size(model), width or native_size(model)
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % step or value > 8192:
            raise LatentgenError(f"--{name} {value} must be a positive multiple of {step} (8 x f) up to 8192")
    return height, width


def default_scale(model: LatentDiffusion) -> float:
    """Guidance only helps models trained with condition dropout: text models and class models
    that have an unconditional class."""
    stage = model.cond_stage
    if stage is None or model.conditioning_key == "concat":
        return 1.0
    if isinstance(stage, ClassEmbedder):
        return 1.0 if stage.unconditional_class is None else 3.0
    return 7.5


# ---- conditioning ---------------------------------------------------------------------------


def _condition(model: LatentDiffusion, texts: list[str], labels: Optional[list[int]], concat=None) -> Conditioning:
    stage = model.cond_stage
    if model.conditioning_key == "adm" or isinstance(stage, ClassEmbedder):
        if labels is None:
            raise LatentgenError("this model is class-conditional: pass --class ID")
        ids = torch.tensor(labels, device=_params(model.unet).device)
        if stage is None:
            return Conditioning(y=ids, concat=concat)
        return Conditioning(context=stage(ids), concat=concat)
    if stage is None:
        return Conditioning(concat=concat)
    with torch.no_grad():
        return Conditioning(context=stage(texts), concat=concat)


def _unconditional(model: LatentDiffusion, negative: str, batch: int, concat=None) -> Conditioning:
    stage = model.cond_stage
    if isinstance(stage, ClassEmbedder) or model.conditioning_key == "adm":
        empty = getattr(stage, "unconditional_class", None)
        if empty is None:
            raise LatentgenError("this class-conditional model has no unconditional class: use --scale 1")
        return _condition(model, [], [empty] * batch, concat)
    return _condition(model, [negative] * batch, None, concat)


def denoiser(model: LatentDiffusion, cond: Conditioning, uncond: Optional[Conditioning], scale: float):
    return guided_model(model.unet, cond, uncond if scale != 1 else None, scale)


def _sample(model, cond, uncond, options: Sampling, x_T, generators: Generators, progress: Progress,
            **masking) -> torch.Tensor:
    callback = None if progress is None else (lambda i, n, x, x0: progress(i + 1, n))
    return sample(
        options.sampler, denoiser(model, cond, uncond, options.scale), x_T, model.alphas_cumprod,
        model.parameterization, options.steps, eta=options.eta, karras=options.karras, callback=callback,
        generator=generators, **masking,
    )


def _noise(model: LatentDiffusion, seeds: list[int], latent_shape: tuple,
           options: Sampling) -> tuple[torch.Tensor, list[torch.Generator]]:
    """(x_T, generators): each image's starting noise from its own seed's generator, which then goes
    on to draw that image's per-step noise, so a seed gives the same image in any batch."""
    ref = _params(model.unet)
    generators = [seeded_generator(seed, ref.device, options.on_device_noise) for seed in seeds]
    return torch.cat([normal((1, *latent_shape), g, ref.device, ref.dtype) for g in generators]), generators


# ---- first stage -----------------------------------------------------------------------------


def encode(model: LatentDiffusion, image: torch.Tensor) -> torch.Tensor:
    """Image in [-1, 1] -> the diffusion model's (scaled) latent."""
    ref = _params(model.first_stage)
    with torch.no_grad():
        return model.first_stage.encode(image.to(ref)) * model.scale_factor


def decode(model: LatentDiffusion, z: torch.Tensor) -> torch.Tensor:
    """Latent -> image in [-1, 1], float32 on the CPU.

    Half-precision decoders overflow on some latents (black or NaN images): such a decode is
    retried in float32. Out of GPU memory, the latent is decoded in overlapping tiles.
    """
    first_stage = model.first_stage
    z = z / model.scale_factor
    with torch.no_grad():
        try:
            image = first_stage.decode(z.to(_params(first_stage)))
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            image = map_tiled(first_stage.decode, z.to(_params(first_stage)), tile=64, overlap=8,
                              factor=latent_factor(model))
        if not torch.isfinite(image).all() and _params(first_stage).dtype != torch.float32:
            dtype = _params(first_stage).dtype
            image = first_stage.float().decode(z.float())
            first_stage.to(dtype)
    if not torch.isfinite(image).all():
        raise LatentgenError("the decoded image contains NaN or inf even in float32; the latent is broken")
    return image.float().clamp(-1, 1).cpu()


# ---- txt2img --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One image to make: its place in the run, prompt or class, and seed."""

    index: int
    prompt: str
    seed: int
    label: Optional[int] = None

    @property
    def key(self) -> str:
        return f"{self.index}:{self.seed}:{self.label}:{self.prompt}"


def plan_jobs(prompt, prompts_file: Optional[Path], labels, num: int, seed: int) -> list[Job]:
    """Expand a prompt, a prompts file or class ids into one Job per image; seeds count up from `seed`."""
    if num < 1 or num > 10000:
        raise LatentgenError(f"--num must be between 1 and 10000, got {num}")
    if not 0 <= seed < 2**63:
        raise LatentgenError(f"--seed must be between 0 and 2**63 - 1, got {seed}")
    if prompts_file is not None:
        if prompt is not None:
            raise LatentgenError("give either a prompt or --prompts, not both")
        try:
            lines = prompts_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise LatentgenError(f"cannot read prompts file {prompts_file}: {error}") from None
        texts = [line.strip() for line in lines if line.strip()]
        if not texts:
            raise LatentgenError(f"{prompts_file} has no prompts")
    else:
        texts = [prompt or ""]
    items = [(text, None) for text in texts] if not labels else [("", label) for label in labels]
    jobs = []
    for text, label in items:
        for _ in range(num):
            jobs.append(Job(len(jobs), text, seed + len(jobs), label))
    return jobs


def batched(jobs: list[Job], batch_size: int) -> Iterator[list[Job]]:
    if batch_size < 1:
        raise LatentgenError(f"--batch-size must be at least 1, got {batch_size}")
    for start in range(0, len(jobs), batch_size):
        yield jobs[start : start + batch_size]


def _txt2img_batch(model: LatentDiffusion, jobs: list[Job], negative: str, options: Sampling,
                   size: tuple[int, int], progress: Progress) -> torch.Tensor:
    labels = [job.label for job in jobs] if jobs[0].label is not None else None
    cond = _condition(model, [job.prompt for job in jobs], labels)
    uncond = _unconditional(model, negative, len(jobs)) if options.scale != 1 else None
    f = latent_factor(model)
    x_T, generators = _noise(model, [job.seed for job in jobs], (model.first_stage.embed_dim, size[0] // f, size[1] // f), options)
    with torch.no_grad():
        z = _sample(model, cond, uncond, options, x_T, generators, progress)
    return decode(model, z)


def txt2img_jobs(model: LatentDiffusion, jobs: list[Job], negative: str, options: Sampling,
                 size: tuple[int, int], progress: Progress = None) -> torch.Tensor:
    """Sample one batch of jobs; out of device memory, retry as two half batches."""
    if model.unet is None:
        raise LatentgenError(f"{model.name} is an autoencoder, not a diffusion model: use `latentgen reconstruct`")
    try:
        return _txt2img_batch(model, jobs, negative, options, size, progress)
    except torch.OutOfMemoryError:
        if len(jobs) == 1:
            raise LatentgenError("out of device memory even at batch size 1: "
                                 "lower --height/--width, use --dtype fp16 or --device cpu") from None
    # Retried only here, after the except block: its traceback held the failed batch's tensors.
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    half = len(jobs) // 2
    return torch.cat([txt2img_jobs(model, part, negative, options, size, progress) for part in (jobs[:half], jobs[half:])])


def txt2img(model: LatentDiffusion, prompts: list[str], negative: str = "", options: Sampling = Sampling(),
            size: Optional[tuple[int, int]] = None, labels: Optional[list[int]] = None) -> torch.Tensor:
    """Python API: one image per prompt (or class label), seeds counting up from options.seed."""
    size = check_size(model, *(size or (None, None)))
    items = labels if labels else prompts
    jobs = [Job(i, "" if labels else p, options.seed + i, p if labels else None) for i, p in enumerate(items)]
    return txt2img_jobs(model, jobs, negative, options, size)


class Manifest:
    """A run's record of finished images, so `--resume` redoes nothing and loses nothing."""

    NAME = "latentgen-manifest.json"

    def __init__(self, path: Path, done: dict[str, str]):
        self.path, self.entries = path, done

    @classmethod
    def open(cls, folder: Optional[Path], resume: bool) -> "Manifest":
        """Resuming also removes the temporary files a killed run left behind (atomic writes'
        hidden `.NAME.*.tmp` and the manifest's own); the caller then writes the unfinished
        images over their own names, replacing any placeholder or unrecorded file."""
        path = (folder or Path("outputs")) / cls.NAME
        entries = {}
        if resume and path.is_file():
            try:
                entries = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                raise LatentgenError(f"cannot read {path}: {error}") from None
            for stale in [*path.parent.glob(".*.tmp"), path.with_suffix(".tmp")]:
                stale.unlink(missing_ok=True)
        elif resume:
            raise LatentgenError(f"--resume: no manifest at {path}")
        manifest = cls(path, entries)
        manifest.save()  # before any image is reserved, so a run killed at once can be resumed
        return manifest

    def done(self, job: Job) -> bool:
        file = self.entries.get(job.key)
        return file is not None and Path(file).is_file()

    def record(self, job: Job, file: Path) -> None:
        self.entries[job.key] = str(file)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.entries, indent=1))
        os.replace(temporary, self.path)


# ---- inpaint --------------------------------------------------------------------------------


def check_mask(mask: torch.Tensor) -> None:
    covered = float(mask.mean())
    if covered == 0:
        raise LatentgenError("the mask is all black: nothing to inpaint (white marks the region to fill)")
    if covered == 1:
        raise LatentgenError("the mask is all white: everything would be replaced; use txt2img instead")


def inpaint(model: LatentDiffusion, image: torch.Tensor, mask: torch.Tensor, prompt: str = "", negative: str = "",
            options: Sampling = Sampling(), feather: int = 4, progress: Progress = None) -> torch.Tensor:
    """Fill mask == 1 in `image`. Dedicated inpainting models get the masked image and mask
    concatenated (LDM: 7 channels, SD: 9); any other model inpaints by masked sampling.
    Pixels outside the mask come back exactly as they went in: the feathered edge runs inward,
    blending over the mask's outer `feather` pixels."""
    if model.unet is None:
        raise LatentgenError(f"{model.name} is an autoencoder, not a diffusion model")
    padded, pad = pad_to_multiple(image, size_multiple(model))
    padded_mask, _ = pad_to_multiple(mask, size_multiple(model))
    ref = _params(model.unet)
    padded, padded_mask = padded.to(ref), padded_mask.to(ref)
    f = latent_factor(model)
    latent_size = (padded.shape[-2] // f, padded.shape[-1] // f)
    small_mask = F.interpolate(padded_mask, size=latent_size, mode="nearest")
    x_T, generators = _noise(model, [options.seed], (model.first_stage.embed_dim, *latent_size), options)
    extra = model.config["unet_config"]["params"]["in_channels"] - model.first_stage.embed_dim
    with torch.no_grad():
        if extra > 0:
            masked = encode(model, padded * (padded_mask < 0.5))
            concat = torch.cat([small_mask, masked], 1) if extra == masked.shape[1] + 1 and model.conditioning_key == "hybrid" \
                else torch.cat([masked, small_mask], 1)
            cond = _condition(model, [prompt], None, concat)
            uncond = _unconditional(model, negative, 1, concat) if options.scale != 1 else None
            z = _sample(model, cond, uncond, options, x_T, generators, progress)
        else:
            cond = _condition(model, [prompt], None)
            uncond = _unconditional(model, negative, 1) if options.scale != 1 else None
            z = _sample(model, cond, uncond, options, x_T, generators, progress, mask=1 - small_mask, x0=encode(model, padded))
        generated = crop_padding(decode(model, z), pad)
    return composite(generated, image, 1 - mask, feather)


# ---- upscale --------------------------------------------------------------------------------

DEFAULT_NOISE_LEVEL = 20  # as diffusers' StableDiffusionUpscalePipeline
UPSCALER_GUIDANCE = 9.0  # ditto


def upscale_guidance(model: LatentDiffusion) -> float:
    """Default guidance for `upscale`: text-guided for noise-augmented upscalers, off for LDM-SR."""
    return UPSCALER_GUIDANCE if model.noise_augmentation is not None else 1.0


def upscale_noise_level(model: LatentDiffusion, noise_level: Optional[int]) -> int:
    """The noise level an upscale uses (and its PNG parameters record): the request checked against
    the model's range, the default for noise-augmented upscalers, 0 for LDM-SR."""
    augmentation = model.noise_augmentation
    if augmentation is None:
        if noise_level is not None:
            raise LatentgenError(f"--noise-level applies to noise-augmented upscalers (SD 2 x4) only, not {model.name}")
        return 0
    level = DEFAULT_NOISE_LEVEL if noise_level is None else noise_level
    if not 0 <= level <= augmentation.max_noise_level:
        raise LatentgenError(f"--noise-level must be between 0 and {augmentation.max_noise_level}, got {level}")
    return level


def _augmented_conditioning(model: LatentDiffusion, low: torch.Tensor, text: Conditioning, negative: Optional[Conditioning],
                            level: int, options: Sampling
                            ) -> tuple[torch.Tensor, torch.Generator, Conditioning, Optional[Conditioning]]:
    """(x_T, generator, cond, uncond) of one low-res tile for a noise-augmented upscaler: the tile
    noised to `level` and concatenated, the level as class label y, the text contexts kept. The
    augmentation noise, x_T and then the per-step noise come from one generator, in the order
    diffusers' upscale pipeline draws them."""
    ref = _params(model.unet)
    generator = seeded_generator(options.seed, ref.device, options.on_device_noise)
    noise = normal(low.shape, generator, generator.device)
    x_T = normal((1, model.first_stage.embed_dim, *low.shape[-2:]), generator, ref.device, ref.dtype)
    concat = model.noise_augmentation(low.to(noise), level, noise).to(ref)
    y = torch.full((1,), level, dtype=torch.long, device=ref.device)
    cond = Conditioning(context=text.context, y=y, concat=concat)
    return x_T, generator, cond, None if negative is None else Conditioning(context=negative.context, y=y, concat=concat)


def upscale(model: LatentDiffusion, image: torch.Tensor, options: Sampling = Sampling(), factor: Optional[int] = None,
            tile: int = 128, prompt: str = "", progress: Progress = None, negative: str = "",
            noise_level: Optional[int] = None) -> torch.Tensor:
    """Super-resolve with a low-res-concatenating model: the low-res image is concatenated to the
    latent, so the latent has the low-res image's size and f = model factor. LDM-SR takes the image
    as it is, unguided; the SD 2 x4 upscaler takes it noised to `noise_level` (default 20), is told
    that level, and follows the prompt with guidance `options.scale` against `negative`.
    Large images go through overlapping tiles blended without seams."""
    if model.unet is None or model.conditioning_key not in ("concat", "hybrid", "hybrid-adm"):
        raise LatentgenError(f"{model.name} is not a super-resolution model (it must concatenate a low-res image)")
    native = latent_factor(model)
    factor = factor or native
    if factor < 1 or factor > native:
        raise LatentgenError(f"--scale must be between 1 and this model's factor {native}, got {factor}")
    if tile < 16:
        raise LatentgenError(f"--tile must be at least 16, got {tile}")
    level = upscale_noise_level(model, noise_level)
    augmented = model.noise_augmentation is not None
    if not augmented and (options.scale != 1 or prompt or negative):
        raise LatentgenError(f"{model.name} is not text-conditional: --prompt, --negative and --guidance "
                             "apply to the SD 2 x4 upscaler only")
    guided = augmented and options.scale != 1
    text = _condition(model, [prompt], None) if augmented else None
    negative_text = _condition(model, [negative], None) if guided else None
    tile_options = options if guided else Sampling(**{**options.__dict__, "scale": 1.0})
    ref = _params(model.unet)
    multiple = size_multiple(model) // native
    tiles_done = [0]

    def super_resolve(low: torch.Tensor) -> torch.Tensor:
        padded, pad = pad_to_multiple(low, multiple)
        if augmented:
            x_T, generators, cond, uncond = _augmented_conditioning(model, padded, text, negative_text, level, options)
        else:
            x_T, generators = _noise(model, [options.seed], (model.first_stage.embed_dim, *padded.shape[-2:]), options)
            cond, uncond = _condition(model, [prompt], None, padded.to(ref)), None
        with torch.no_grad():
            z = _sample(model, cond, uncond, tile_options, x_T, generators, None)
        high = decode(model, z)
        tiles_done[0] += 1
        if progress is not None:
            progress(tiles_done[0], tiles_done[0])
        return crop_padding(high, tuple(p * native for p in pad))

    overlap = max(tile // 8, 4)
    result = map_tiled(super_resolve, image, tile=tile, overlap=overlap, factor=native)
    if factor != native:
        result = F.interpolate(result, size=(image.shape[-2] * factor, image.shape[-1] * factor), mode="bicubic",
                               antialias=True).clamp(-1, 1)
    return result


# ---- reconstruct ----------------------------------------------------------------------------


@dataclass
class Reconstruction:
    image: torch.Tensor
    psnr: float
    ssim: float
    latent_shape: tuple
    compression: float


def reconstruct(model: LatentDiffusion, image: torch.Tensor) -> Reconstruction:
    """Autoencoder round trip; images whose size is no multiple of f are padded, then cropped back."""
    f = latent_factor(model)
    padded, pad = pad_to_multiple(image, f)
    with torch.no_grad():
        latent = model.first_stage.encode(padded.to(_params(model.first_stage)))
    recon = crop_padding(decode(model, latent * model.scale_factor), pad)
    latent_shape = tuple(latent.shape[1:])
    compression = image[0].numel() / latent[0].numel()
    return Reconstruction(recon, metrics.psnr(image, recon), metrics.ssim(image, recon), latent_shape, compression)


# ---- reporting ------------------------------------------------------------------------------


def parameters_text(model: LatentDiffusion, options: Sampling, prompt: str, negative: str,
                    size: tuple[int, int], seed: int, label: Optional[int] = None,
                    extra: Optional[dict] = None) -> str:
    """Generation parameters in the AUTOMATIC1111 / stable-diffusion.cpp `parameters` format;
    `extra` adds command-specific fields (an upscaler's noise level)."""
    fields = {
        "Steps": options.steps, "Sampler": options.sampler + (" Karras" if options.karras else ""),
        "CFG scale": options.scale, "Seed": seed, "Size": f"{size[1]}x{size[0]}",
        "Model hash": model.sha256[:10], "Model": model.name,
    }
    if options.eta:
        fields["Eta"] = options.eta
    if label is not None:
        fields["Class"] = label
    fields.update(extra or {})
    return format_parameters(prompt, negative, fields)


def describe(path: Path) -> dict:
    """One row of `latentgen models`: family, factor, size and hash, without building the model
    (safetensors: from the header alone, so listing multi-GB files stays instant)."""
    params, weights = read_params(path)
    return {"name": path.name if path.is_dir() else path.stem, "family": detect.family_of(params),
            "f": detect.latent_factor(params), "size_mb": weights.stat().st_size / 2**20,
            "hash": file_sha256(weights)[:10], "path": str(path)}
