"""The user tasks over a loaded LatentDiffusion: txt2img, inpaint, upscale, reconstruct.

No files, no PIL, no CLI: images cross in and out as float tensors in [-1, 1], NCHW, and every
fact about the model comes from its `spec`. Only this module applies `scale_factor` between the
autoencoder's latents and the diffusion model's (`encode`, `decode`).
"""

from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from . import metrics
from . import prompts as prompt_syntax
from .devices import pick_device, pick_dtype, pick_memory_format
from .errors import LatentgenError
from .guidance import Conditioning, guided_model
from .images import crop_padding, fill_hole, pad_to_multiple
from .ldm import LOW_RES_IMAGE, MASK_THEN_MASKED_IMAGE, MASKED_IMAGE_THEN_MASK, LatentDiffusion, ModelSpec
from .models.text import ClassEmbedder
from .samplers import SAMPLERS, Generators, normal, resolve_sampler, sample, seeded_generator
from .tiling import map_tiled

DEFAULT_STEPS = 50
MAX_SIDE = 8192
Progress = Optional[Callable[[int, int], None]]
"""progress(done, total): steps of the image being sampled (tiles for upscale)."""
Preview = Optional[Callable[[int, int, torch.Tensor], None]]
"""preview(done, total, x0): after each step, the sampler's estimate of the final (scaled) latents."""


@dataclass(frozen=True)
class Sampling:
    """How to sample: sampler, steps, guidance `scale` and `seed` (the first image's; image i uses
    seed + i). The sampler may be named as AUTOMATIC1111 or stable-diffusion.cpp name it
    ("DPM++ 2M Karras", "dpm++2m"); it is stored under our name, Karras in `karras`."""

    sampler: str = "ddim"
    steps: int = DEFAULT_STEPS
    eta: float = 0.0
    karras: bool = False
    scale: float = 1.0
    seed: int = 0
    on_device_noise: bool = False

    def __post_init__(self) -> None:
        name, karras = resolve_sampler(self.sampler)
        object.__setattr__(self, "sampler", name)
        object.__setattr__(self, "karras", self.karras or karras)


@dataclass(frozen=True)
class Hires:
    """AUTOMATIC1111's hires fix: sample at the requested size, enlarge by `scale` (the latent
    bilinearly, "latent", or the decoded image bicubically and encoded again, "image"), then refine
    with img2img at `strength` over `steps` steps (0: the first pass's count)."""

    scale: float = 2.0
    strength: float = 0.5
    steps: int = 0
    upscaler: str = "latent"


UPSCALERS = ("latent", "image")


def prepare(model: LatentDiffusion, device: str = "auto", dtype: str = "auto") -> LatentDiffusion:
    """Move the model to the chosen device, dtype and the memory format measured fastest for them,
    once, and switch to inference mode."""
    target = pick_device(device)
    channels = model.spec.unet.model_channels if model.spec.unet else None
    precision = pick_dtype(dtype, target, channels)
    return model.to(target, precision, pick_memory_format(target, precision)).eval()


def _params(module: torch.nn.Module) -> torch.Tensor:
    return next(module.parameters())


def _like_params(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """`x` on the module's device, in its dtype and memory format (`prepare`): a map in another
    layout than the weights is reordered by oneDNN at every convolution."""
    ref = _params(module)
    return x.to(ref).contiguous(memory_format=pick_memory_format(ref.device, ref.dtype))


def _diffusion(model: LatentDiffusion, task: str) -> ModelSpec:
    if model.unet is None:
        raise LatentgenError(f"{model.name} is an autoencoder, not a diffusion model: {task} needs one "
                             "(an autoencoder serves reconstruct)")
    return model.spec


def check_size(model: LatentDiffusion, height: Optional[int], width: Optional[int]) -> tuple[int, int]:
    """The requested size, or the model's native one; larger than native is allowed (convolutional sampling)."""
    spec = model.spec
    step = spec.size_multiple
    height, width = height or spec.native_size, width or spec.native_size
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % step or value > MAX_SIDE:
            raise LatentgenError(f"{name} {value} must be a positive multiple of {step} up to {MAX_SIDE} for {model.name}")
    return height, width


def default_scale(model: LatentDiffusion) -> float:
    """Guidance only helps models trained with condition dropout: text models and class models
    that have an unconditional class."""
    spec = model.spec
    if spec.conditioning == "class":
        return 1.0 if getattr(model.cond_stage, "unconditional_class", None) is None else 3.0
    return 7.5 if spec.conditioning == "text" else 1.0


# ---- conditioning ---------------------------------------------------------------------------


def check_inputs(model: LatentDiffusion, prompt: str = "", negative: str = "",
                 labels: Optional[Sequence[int]] = None) -> None:
    """Refuse what the model cannot use, instead of recording it as if it had been used."""
    spec = model.spec
    if spec.conditioning != "text" and (prompt or negative):
        raise LatentgenError(f"{model.name} is not text-conditional ({spec.family}): it cannot use a prompt "
                             "or negative prompt")
    if spec.conditioning == "class" and not labels:
        raise LatentgenError(f"{model.name} is class-conditional: give class ids")
    if spec.conditioning != "class" and labels:
        raise LatentgenError(f"{model.name} is not class-conditional ({spec.family}): it cannot use class ids")


def _windows(model: LatentDiffusion, texts: Sequence[str]) -> int:
    """How many 75-token windows the longest of `texts` needs (prompts.py), so that conditional and
    unconditional contexts, batched together for guidance, have one length."""
    stage = model.cond_stage
    if model.spec.conditioning != "text" or not prompt_syntax.supports(stage):
        return 1
    return max(prompt_syntax.window_count(stage, text) for text in texts)


def _condition(model: LatentDiffusion, texts: list[str], labels: Optional[list[int]], concat=None,
               windows: int = 1) -> Conditioning:
    stage = model.cond_stage
    if model.spec.conditioning == "class":
        ids = torch.tensor(labels, device=_params(model.unet).device)
        if isinstance(stage, ClassEmbedder):
            return Conditioning(context=stage(ids), concat=concat)
        return Conditioning(y=ids, concat=concat)
    if stage is None:
        return Conditioning(concat=concat)
    with torch.no_grad():
        context = prompt_syntax.encode(stage, texts, windows) if prompt_syntax.supports(stage) else stage(texts)
    return Conditioning(context=context, concat=concat)


def _unconditional(model: LatentDiffusion, negative: str, batch: int, concat=None, windows: int = 1) -> Conditioning:
    if model.spec.conditioning == "class":
        empty = getattr(model.cond_stage, "unconditional_class", None)
        if empty is None:
            raise LatentgenError(f"{model.name} has no unconditional class: guidance needs scale 1")
        return _condition(model, [], [empty] * batch, concat)
    return _condition(model, [negative] * batch, None, concat, windows)


def _sample(model: LatentDiffusion, cond: Conditioning, uncond: Optional[Conditioning], options: Sampling,
            x_T: torch.Tensor, generators: Generators, progress: Progress, preview: Preview = None,
            **masking) -> torch.Tensor:
    denoiser = guided_model(model.unet, cond, uncond if options.scale != 1 else None, options.scale)

    def callback(i: int, n: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        if progress is not None:
            progress(i + 1, n)
        if preview is not None:
            preview(i + 1, n, x0)

    # A zero-terminal-SNR model starts from pure noise at T - 1: DDIM/PLMS count their steps down from there.
    trailing = model.spec.schedule.zero_terminal_snr and SAMPLERS[options.sampler].spacing
    return sample(
        options.sampler, denoiser, x_T, model.alphas_cumprod, model.spec.parameterization, options.steps,
        eta=options.eta, karras=options.karras, spacing="trailing" if trailing else "uniform", callback=callback,
        generator=generators, **masking,
    )


def _noise(model: LatentDiffusion, seeds: Sequence[int], latent_size: tuple[int, int],
           options: Sampling) -> tuple[torch.Tensor, list[torch.Generator]]:
    """(x_T, generators): each image's starting noise from its own seed's generator, which then goes
    on to draw that image's per-step noise, so a seed gives the same image in any batch."""
    ref = _params(model.unet)
    generators = [seeded_generator(seed, ref.device, options.on_device_noise) for seed in seeds]
    shape = (1, model.spec.latent_channels, *latent_size)
    return _like_params(torch.cat([normal(shape, g, ref.device, ref.dtype) for g in generators]), model.unet), generators


def inpainting_concat(layout: Optional[str], masked_latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The extra UNet input of an inpainting model in its channel `layout` (ModelSpec.concat), as it
    was trained: `mask` at latent size (1 = fill), `masked_latent` the scaled latent of the image
    with the hole blanked."""
    if layout == MASK_THEN_MASKED_IMAGE:
        return torch.cat([mask, masked_latent], 1)
    if layout == MASKED_IMAGE_THEN_MASK:
        return torch.cat([masked_latent, mask], 1)
    raise LatentgenError(f"a model with concat layout {layout!r} takes no masked image")


# ---- first stage -----------------------------------------------------------------------------


def encode(model: LatentDiffusion, image: torch.Tensor) -> torch.Tensor:
    """Image in [-1, 1] -> the diffusion model's (scaled) latent."""
    with torch.no_grad():
        return model.first_stage.encode(_like_params(image, model.first_stage)) * model.spec.scale_factor


def _decode_in_float32(first_stage: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """A decode in float32 of a half-precision first stage, which is restored to its dtype even on error."""
    dtype = _params(first_stage).dtype
    try:
        return first_stage.float().decode(z.float())
    finally:
        first_stage.to(dtype)


def decode(model: LatentDiffusion, z: torch.Tensor) -> torch.Tensor:
    """Scaled latent -> image in [-1, 1], float32 on the CPU.

    Half-precision decoders overflow on some latents (black or NaN images): such a decode is
    retried in float32. With `model.vae_tiling`, or out of GPU memory, the latent is decoded in
    overlapping tiles of 64 latent pixels blended without seams.
    """
    first_stage = model.first_stage
    z = _like_params(z / model.spec.scale_factor, first_stage)

    def tiled() -> torch.Tensor:
        return map_tiled(first_stage.decode, z, tile=64, overlap=8, factor=model.spec.factor)

    with torch.no_grad():
        try:
            image = tiled() if model.vae_tiling else first_stage.decode(z)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            image = tiled()
        if not torch.isfinite(image).all() and _params(first_stage).dtype != torch.float32:
            image = _decode_in_float32(first_stage, z)
    if not torch.isfinite(image).all():
        raise LatentgenError("the decoded image contains NaN or inf even in float32; the latent is broken")
    return image.float().clamp(-1, 1).cpu()


# ---- txt2img --------------------------------------------------------------------------------


def hires_size(model: LatentDiffusion, size: tuple[int, int], hires: Hires) -> tuple[int, int]:
    """The final size of a hires-fixed image: `size` times the scale, checked like any size."""
    if hires.upscaler not in UPSCALERS:
        raise LatentgenError(f"unknown hires upscaler {hires.upscaler!r}; choose {' or '.join(UPSCALERS)}")
    if not 0 < hires.strength <= 1 or hires.scale <= 1:
        raise LatentgenError(f"hires fix needs a scale above 1 and a strength in (0, 1], got {hires.scale}, "
                             f"{hires.strength}")
    return check_size(model, round(size[0] * hires.scale), round(size[1] * hires.scale))


def _enlarge(model: LatentDiffusion, z: torch.Tensor, size: tuple[int, int], upscaler: str) -> torch.Tensor:
    f = model.spec.factor
    if upscaler == "latent":
        return F.interpolate(z, size=(size[0] // f, size[1] // f), mode="bilinear")
    image = F.interpolate(decode(model, z), size=size, mode="bicubic", antialias=True).clamp(-1, 1)
    return encode(model, image).to(z)


def _txt2img_batch(model: LatentDiffusion, texts: list[str], labels: Optional[list[int]], seeds: list[int],
                   negative: str, options: Sampling, size: tuple[int, int], progress: Progress,
                   preview: Preview, hires: Optional[Hires]) -> torch.Tensor:
    windows = _windows(model, [*texts, negative])
    cond = _condition(model, texts, labels, windows=windows)
    uncond = _unconditional(model, negative, len(seeds), windows=windows) if options.scale != 1 else None
    f = model.spec.factor
    x_T, generators = _noise(model, seeds, (size[0] // f, size[1] // f), options)
    with torch.no_grad():
        z = _sample(model, cond, uncond, options, x_T, generators, progress, preview)
        if hires is not None:
            large = hires_size(model, size, hires)
            noise = torch.cat([normal((1, *z.shape[1:2], large[0] // f, large[1] // f), g, z.device, z.dtype)
                               for g in generators])
            second = replace(options, steps=hires.steps or options.steps)
            z = _sample(model, cond, uncond, second, noise, generators, progress, preview,
                        x0=_enlarge(model, z, large, hires.upscaler), strength=hires.strength)
    return decode(model, z)


def txt2img(model: LatentDiffusion, prompts: Sequence[str] = ("",), negative: str = "", options: Sampling = Sampling(),
            size: Optional[tuple[int, int]] = None, labels: Optional[Sequence[int]] = None,
            seeds: Optional[Sequence[int]] = None, progress: Progress = None, preview: Preview = None,
            hires: Optional[Hires] = None) -> torch.Tensor:
    """One image per prompt (or per class label), as a [N, 3, H, W] tensor in [-1, 1].

    `seeds` default to options.seed, options.seed + 1, ...; `size` (H, W) to the model's native
    size (with `hires`, the first pass's). Out of device memory, the batch is retried as two
    halves (the same images)."""
    _diffusion(model, "txt2img")
    count = len(labels) if labels else len(prompts)
    prompts = list(prompts) if not labels else [""] * count
    for prompt in set(prompts):
        check_inputs(model, prompt, negative, labels)
    size = check_size(model, *(size or (None, None)))
    seeds = list(seeds) if seeds is not None else [options.seed + i for i in range(count)]
    if len(seeds) != count:
        raise LatentgenError(f"{len(seeds)} seeds for {count} images")
    try:
        return _txt2img_batch(model, prompts, list(labels) if labels else None, seeds, negative, options, size,
                              progress, preview, hires)
    except torch.OutOfMemoryError:
        if count == 1:
            raise LatentgenError("out of device memory even at batch size 1: lower the size, "
                                 "use dtype fp16 or the CPU") from None
    # Retried only here, after the except block: its traceback held the failed batch's tensors.
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    half = count // 2
    parts = [slice(0, half), slice(half, count)]
    return torch.cat([txt2img(model, prompts[part], negative, options, size, labels[part] if labels else None,
                              seeds[part], progress, preview, hires) for part in parts])


# ---- img2img --------------------------------------------------------------------------------


def img2img(model: LatentDiffusion, image: torch.Tensor, prompt: str = "", negative: str = "",
            options: Sampling = Sampling(), strength: float = 0.75, mask: Optional[torch.Tensor] = None,
            progress: Progress = None, preview: Preview = None) -> torch.Tensor:
    """SDEdit (Meng et al. 2022) as CompVis `scripts/img2img.py`: the image's latent noised to the
    step that `strength` selects, then denoised from there with any sampler. Strength 0 returns
    the first-stage round trip, 1 starts from pure noise. With `mask` (1 = change) the rest is
    kept by masked sampling and pasted back exactly. Any size: padded to the model's multiple,
    cropped back."""
    spec = _diffusion(model, "img2img")
    if spec.concat is not None:
        raise LatentgenError(f"{model.name} concatenates an image of its own ({spec.concat}): "
                             "use inpaint or upscale with it")
    if not 0 <= strength <= 1:
        raise LatentgenError(f"strength must be between 0 and 1, got {strength}")
    check_inputs(model, prompt, negative)
    if mask is not None:
        check_mask(mask)
    if strength == 0:
        return reconstruct(model, image).image
    padded, pad = pad_to_multiple(image, spec.size_multiple)
    x0 = encode(model, padded)
    x_T, generators = _noise(model, [options.seed], tuple(x0.shape[-2:]), options)
    windows = _windows(model, [prompt, negative])
    masking = {}
    if mask is not None:
        small = F.interpolate(pad_to_multiple(mask, spec.size_multiple)[0], size=x0.shape[-2:], mode="nearest")
        masking["mask"] = 1 - small.to(x0)
    with torch.no_grad():
        cond = _condition(model, [prompt], None, windows=windows)
        uncond = _unconditional(model, negative, 1, windows=windows) if options.scale != 1 else None
        z = _sample(model, cond, uncond, options, x_T, generators, progress, preview, x0=x0, strength=strength,
                    **masking)
        result = crop_padding(decode(model, z), pad)
    return result if mask is None else fill_hole(image, result, mask, 0)


def refine_strength(model: LatentDiffusion, strength: Optional[float]) -> float:
    """The strength an upscale or inpaint refines the model's regression estimate from (and its PNG
    parameters record): 0 is the estimate itself, 1 samples from pure noise (the estimate unused);
    models without an estimator always use 1."""
    if model.estimator is None:
        if strength is not None and strength != 1:
            raise LatentgenError(f"{model.name} has no regression estimator to start from: its strength is 1")
        return 1.0
    strength = model.spec.default_strength if strength is None else strength
    strength = 1.0 if strength is None else strength
    if not 0 <= strength <= 1:
        raise LatentgenError(f"strength must be between 0 and 1, got {strength}")
    return strength


# ---- inpaint --------------------------------------------------------------------------------


def check_mask(mask: torch.Tensor) -> None:
    covered = float(mask.mean())
    if covered == 0:
        raise LatentgenError("the mask is all black: nothing to inpaint (white marks the region to fill)")
    if covered == 1:
        raise LatentgenError("the mask is all white: everything would be replaced; use txt2img instead")


def inpaint(model: LatentDiffusion, image: torch.Tensor, mask: torch.Tensor, prompt: str = "", negative: str = "",
            options: Sampling = Sampling(), feather: int = 4, progress: Progress = None,
            strength: Optional[float] = None) -> torch.Tensor:
    """Fill mask == 1 in `image`. Dedicated inpainting models get the masked image and mask
    concatenated (LDM: 7 channels, SD: 9); any other model inpaints by masked sampling. A model
    with a regression estimator starts from the estimate's latent noised to `strength` (SDEdit;
    its config's default_strength unless given) and returns the estimate at 0.
    Pixels outside the mask come back exactly as they went in (the seam is blended inside the hole)."""
    spec = _diffusion(model, "inpaint")
    if spec.concat == LOW_RES_IMAGE:
        raise LatentgenError(f"{model.name} is a super-resolution model: use upscale")
    strength = refine_strength(model, strength)
    check_inputs(model, prompt, negative)
    check_mask(mask)
    padded, pad = pad_to_multiple(image, spec.size_multiple)
    padded_mask, _ = pad_to_multiple(mask, spec.size_multiple)
    ref = _params(model.unet)
    padded, padded_mask = padded.to(ref), padded_mask.to(ref)
    hole = (padded_mask >= 0.5).to(ref)
    refine = {}
    if strength < 1:
        with torch.no_grad():
            estimate = model.estimator(torch.cat([padded * (1 - hole), hole], 1)).float().clamp(-1, 1)
        if strength == 0:
            return fill_hole(image, crop_padding(estimate.cpu(), pad), mask, feather)
        refine = {"x0": encode(model, estimate), "strength": strength}
    latent_size = (padded.shape[-2] // spec.factor, padded.shape[-1] // spec.factor)
    small_mask = F.interpolate(padded_mask, size=latent_size, mode="nearest")
    x_T, generators = _noise(model, [options.seed], latent_size, options)
    windows = _windows(model, [prompt, negative])
    with torch.no_grad():
        if spec.concat in (MASK_THEN_MASKED_IMAGE, MASKED_IMAGE_THEN_MASK):
            concat = inpainting_concat(spec.concat, encode(model, padded * (1 - hole)), small_mask)
            cond = _condition(model, [prompt], None, concat, windows)
            uncond = _unconditional(model, negative, 1, concat, windows) if options.scale != 1 else None
            z = _sample(model, cond, uncond, options, x_T, generators, progress, **refine)
        else:
            cond = _condition(model, [prompt], None, windows=windows)
            uncond = _unconditional(model, negative, 1, windows=windows) if options.scale != 1 else None
            z = _sample(model, cond, uncond, options, x_T, generators, progress, mask=1 - small_mask,
                        x0=encode(model, padded))
        generated = crop_padding(decode(model, z), pad)
    return fill_hole(image, generated, mask, feather)


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
            raise LatentgenError(f"a noise level applies to noise-augmented upscalers (SD 2 x4) only, not {model.name}")
        return 0
    level = DEFAULT_NOISE_LEVEL if noise_level is None else noise_level
    if not 0 <= level <= augmentation.max_noise_level:
        raise LatentgenError(f"the noise level must be between 0 and {augmentation.max_noise_level}, got {level}")
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
    x_T = normal((1, model.spec.latent_channels, *low.shape[-2:]), generator, ref.device, ref.dtype)
    concat = model.noise_augmentation(low.to(noise), level, noise).to(ref)
    y = torch.full((1,), level, dtype=torch.long, device=ref.device)
    cond = Conditioning(context=text.context, y=y, concat=concat)
    return x_T, generator, cond, None if negative is None else Conditioning(context=negative.context, y=y, concat=concat)


def upscale(model: LatentDiffusion, image: torch.Tensor, options: Sampling = Sampling(), factor: Optional[int] = None,
            tile: int = 128, prompt: str = "", progress: Progress = None, negative: str = "",
            noise_level: Optional[int] = None, strength: Optional[float] = None) -> torch.Tensor:
    """Super-resolve with a low-res-concatenating model: the low-res image is concatenated to the
    latent, so the latent has the low-res image's size and the output factor is f. LDM-SR takes the
    image as it is, unguided; the SD 2 x4 upscaler takes it noised to `noise_level` (default 20), is
    told that level, and follows the prompt with guidance `options.scale` against `negative`. A
    smaller output `factor` resizes the result. Large images go through overlapping tiles blended
    without seams. A model with a regression estimator starts from the estimate's latent noised to
    `strength` (SDEdit; its config's default_strength unless given) and returns the estimate at 0."""
    spec = _diffusion(model, "upscale")
    if spec.concat != LOW_RES_IMAGE:
        raise LatentgenError(f"{model.name} is not a super-resolution model (it must concatenate a low-res image)")
    native = spec.factor
    factor = factor or native
    if factor < 1 or factor > native:
        raise LatentgenError(f"the output factor must be between 1 and this model's {native}, got {factor}")
    if tile < 16:
        raise LatentgenError(f"the tile must be at least 16 pixels, got {tile}")
    level = upscale_noise_level(model, noise_level)
    strength = refine_strength(model, strength)
    augmented = model.noise_augmentation is not None
    check_inputs(model, prompt, negative)
    if not augmented and options.scale != 1:
        raise LatentgenError(f"{model.name} is not text-conditional: guidance applies to the SD 2 x4 upscaler only")
    guided = augmented and options.scale != 1
    windows = _windows(model, [prompt, negative])
    text = _condition(model, [prompt], None, windows=windows) if augmented else None
    negative_text = _condition(model, [negative], None, windows=windows) if guided else None
    tile_options = options if guided else replace(options, scale=1.0)
    ref = _params(model.unet)
    multiple = spec.size_multiple // native
    tiles_done = [0]

    def sample_tile(padded: torch.Tensor, refine: dict) -> torch.Tensor:
        if augmented:
            x_T, generators, cond, uncond = _augmented_conditioning(model, padded, text, negative_text, level, options)
        else:
            x_T, generators = _noise(model, [options.seed], tuple(padded.shape[-2:]), options)
            cond, uncond = _condition(model, [prompt], None, padded.to(ref)), None
        return decode(model, _sample(model, cond, uncond, tile_options, x_T, generators, None, **refine))

    def super_resolve(low: torch.Tensor) -> torch.Tensor:
        padded, pad = pad_to_multiple(low, multiple)
        with torch.no_grad():
            if strength == 1:
                high = sample_tile(padded, {})
            else:
                estimate = model.estimator(padded.to(ref)).float().clamp(-1, 1)
                high = estimate.cpu() if strength == 0 else sample_tile(
                    padded, {"x0": encode(model, estimate), "strength": strength})
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
    padded, pad = pad_to_multiple(image, model.spec.factor)
    latent = encode(model, padded)
    recon = crop_padding(decode(model, latent), pad)
    latent_shape = tuple(latent.shape[1:])
    compression = image[0].numel() / latent[0].numel()
    return Reconstruction(recon, metrics.psnr(image, recon), metrics.ssim(image, recon), latent_shape, compression)
