"""`latentgen train ...`: prepare the data once, then train stage 1 (autoencoder) and stage 2 (LDM).

Every command is reproducible from its arguments (seeded), and the training commands resume from
their run folder's checkpoint when run again.
"""

import gc
import json
from collections import Counter
from pathlib import Path
from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from latentgen import distributed
from latentgen.errors import LatentgenError
from latentgen.files import write_new

from . import data as datasets
from .evaluate import DATASETS

REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "data"
PHOTOS = REPO.parent / "shared" / "data" / "photos-train"
EVAL_PHOTOS = REPO.parent / "shared" / "data" / "photos-eval"

train_app = typer.Typer(help="Prepare data and train the autoencoders and latent diffusion models.",
                        no_args_is_help=True, add_completion=False)
console = Console(stderr=True)


def _numbers(text: str, kind=int) -> tuple:
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise LatentgenError(f"expected comma-separated numbers, got {text!r}") from None


@train_app.command("prepare-photos")
def prepare_photos(
    src: Path = typer.Option(PHOTOS, help="training photos (never photos-eval)"),
    out: Path = typer.Option(DATA, help="output folder"),
    size: int = typer.Option(128, help="crop size in pixels"),
    count: int = typer.Option(6000, help="number of crops (1300 at 128 px fit a 64 MiB device upload)"),
    scales: str = typer.Option("0.35,0.5,0.75,1.0", help="scales a crop is taken at (1 = native pixels)"),
    seed: int = typer.Option(0),
) -> None:
    """Seeded multi-scale random crops of the training photos as one uint8 array."""
    path = datasets.prepare_photos(src, out, size, count, _numbers(scales, float), seed)
    console.print(f"wrote {count} crops of {size} px to {path}")


@train_app.command("prepare-emoji")
def prepare_emoji(
    out: Path = typer.Option(DATA, help="output folder"),
    version: str = typer.Option(datasets.EMOJI_VERSION, help="emoji-datasource version of the current drawings "
                                 "and of the table naming all"),
    size: int = typer.Option(64, help="image size (emoji-datasource draws 64 px, Fluent 256 px)"),
    captions: int = typer.Option(2, help="captions per image"),
    hue_variants: int = typer.Option(2, help="hue-rotated copies of each one-hue emoji (not faces or people), "
                                             "their colour words rewritten to the new hue"),
    skin_tones: int = typer.Option(1, help="skin-tone variants kept per emoji, picked at random (-1: all); "
                                           "they differ in colour alone"),
    contexts: bool = typer.Option(True, help="precompute the MiniLM contexts of all captions (fp16)"),
    sets: str = typer.Option(",".join(datasets.EMOJI_SETS), help="emoji drawings to include (google: Noto, "
                             "twitter: Twemoji, blob: Noto of 2017, fluent: Microsoft's Fluent 3D, "
                             "fluent-flat and fluent-modern: Fluent flat and with gradients, SVG, need the "
                             "train extra, emojione: EmojiOne 2, CC-BY 4.0)"),
    seed: int = typer.Option(0),
) -> None:
    """The emoji sets (npm), their captions and, optionally, the captions' text contexts."""
    encoder = None
    if contexts:
        from latentgen.models.text import MiniLMEmbedder

        encoder = MiniLMEmbedder()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("text contexts", total=None)
        path = datasets.prepare_emoji(out, version, size, captions, seed, hue_variants, encoder,
                                      progress=lambda done, total: progress.update(task, completed=done, total=total),
                                      skin_tones=None if skin_tones < 0 else skin_tones,
                                      sets=[name.strip() for name in sets.split(",")])
    console.print(f"wrote {path}")


@train_app.command("autoencoder")
def autoencoder(
    run: Path = typer.Option(..., "--run", "--run-dir", help="run folder: checkpoint.pt, samples/, export/ "
                             "(--run-dir under torchrun, whose own --run-path takes --run)"),
    kind: str = typer.Option("kl", help="kl, vq, or dc (residual DC-AE, diffusers AutoencoderDC layout; MSE recipe)"),
    ch: int = typer.Option(32, help="base channel count"),
    ch_mult: str = typer.Option("1,2,4,4", help="channel multipliers; f = 2^(levels - 1)"),
    num_res_blocks: int = typer.Option(1),
    z_channels: int = typer.Option(4, help="latent channels"),
    n_embed: int = typer.Option(8192, help="VQ codebook size"),
    photos: Path = typer.Option(DATA / "photos-128.npy", help="prepared photo crops"),
    crop: int = typer.Option(128, help="training crop size"),
    batch: int = typer.Option(8),
    lr: float = typer.Option(4e-4),
    steps: int = typer.Option(20000),
    kl_weight: float = typer.Option(1e-6),
    disc_start: int = typer.Option(10000, help="step at which the PatchGAN loss starts"),
    disc_weight: float = typer.Option(0.5),
    init_from: Optional[Path] = typer.Option(None, help="start from this trained autoencoder (same architecture) "
                                                        "when the run has no checkpoint"),
    decoder_only: bool = typer.Option(False, help="fine-tune the decoder of --init-from, encoder frozen: the latent "
                                                  "space, and every LDM trained on it, stay valid"),
    emoji_fraction: float = typer.Option(0.0, help="share of each batch drawn from the prepared emoji"),
    emoji_size: int = typer.Option(128, help="size the emoji are resized to before cropping (the txt2img size)"),
    data: Path = typer.Option(DATA, help="folder with the prepared emoji.npz (for --emoji-fraction)"),
    seed: int = typer.Option(0),
    checkpoint_every: int = typer.Option(500),
    sample_every: int = typer.Option(0, help="save input/reconstruction grids every N steps (0: never)"),
    max_minutes: float = typer.Option(0.0, help="stop (checkpointed and exported) after this wall time; 0: no limit"),
    device: str = typer.Option("auto"),
    resume: bool = typer.Option(True, help="continue from the run folder's checkpoint"),
    export_to: Optional[Path] = typer.Option(None, help="export folder (default RUN/export)"),
    ssim_weight: Optional[float] = typer.Option(None, help="weight of 1 - SSIM (default: 0.2 for kl/vq, 0 for dc)"),
    fft_weight: Optional[float] = typer.Option(None, help="weight of the FFT-magnitude L1 (default: 0.1 for kl/vq, 0 for dc)"),
    widths: str = typer.Option("32,32,128", help="dc: width of each stage; f = 2^(stages - 1)"),
    encoder_layers: str = typer.Option("0,1,3", help="dc: encoder ResBlocks per stage (0 in stage 1: no full-resolution blocks)"),
    decoder_layers: str = typer.Option("0,1,3", help="dc: decoder ResBlocks per stage"),
    warmup: int = typer.Option(200, help="dc: linear learning-rate warm-up steps, then cosine decay to --steps"),
    min_lr: float = typer.Option(0.02, help="dc: final learning rate as a fraction of --lr"),
    grad_clip: float = typer.Option(1.0, help="dc: gradient-norm clip (0: off)"),
    weight_decay: float = typer.Option(0.0, help="dc: AdamW weight decay of the conv weights"),
    precision: str = typer.Option("fp32", help="dc: fp32, or bf16 autocast (fp32 master weights; also on CPU, where it "
                                               "needs avx512_bf16 to pay off)"),
    channels_last: bool = typer.Option(False, help="dc: channels-last memory format"),
) -> None:
    """Stage 1: a KL or VQ autoencoder on photo crops (L1 + SSIM + FFT + KL/VQ + PatchGAN), or a
    residual DC-AE (kind dc: MSE, warm-up + cosine LR, gradient clipping)."""
    from latentgen.loader import load_model

    from .autoencoder import AutoencoderConfig, load_emoji_crops, load_photos, train_autoencoder

    config = AutoencoderConfig(
        kind=kind, ch=ch, ch_mult=_numbers(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels,
        n_embed=n_embed, crop=crop, batch=batch, lr=lr, steps=steps, kl_weight=kl_weight, disc_start=disc_start,
        disc_weight=disc_weight, decoder_only=decoder_only, emoji_fraction=emoji_fraction, seed=seed,
        checkpoint_every=checkpoint_every, sample_every=sample_every, max_minutes=max_minutes, device=device,
        widths=_numbers(widths), encoder_layers=_numbers(encoder_layers), decoder_layers=_numbers(decoder_layers),
        warmup=warmup, min_lr=min_lr, grad_clip=grad_clip, weight_decay=weight_decay, precision=precision,
        channels_last=channels_last,
        ssim_weight=(0.0 if kind == "dc" else 0.2) if ssim_weight is None else ssim_weight,
        fft_weight=(0.0 if kind == "dc" else 0.1) if fft_weight is None else fft_weight,
    )
    _check_precision(precision)
    rank = _join(config)
    emoji = load_emoji_crops(data, emoji_size, crop) if emoji_fraction > 0 else None
    start = load_model(init_from).first_stage if init_from else None
    with _flushed_denormals() if kind == "dc" else nullcontext():
        step = train_autoencoder(config, load_photos(photos, crop), run, resume, export_dir=export_to, emoji=emoji,
                                 init_from=start, rank=rank).step
    _finish(rank, step, export_to or run / "export")


@contextmanager
def _flushed_denormals() -> Iterator[None]:
    """Denormals flushed to zero while a command trains (near-zero residual weights early on cost 5x
    on CPU), then IEEE behaviour again for whatever runs next in the process."""
    import torch

    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _check_precision(precision: str) -> None:
    if precision not in ("fp32", "bf16"):
        raise LatentgenError(f"--precision {precision!r}: choose fp32 or bf16")


def _join(config) -> distributed.Rank:
    """Under torchrun: this process's rank, its device (`auto`: cuda:LOCAL_RANK or the CPU) set in
    `config`, and the job's process group joined."""
    rank = distributed.current()
    if rank.world > 1:
        config.device = rank.device(config.device)
        distributed.start(rank, config.device)
    return rank


def _finish(rank: distributed.Rank, step: int, export: Path) -> None:
    """Leave the process group together, once rank 0 has exported (a rank leaving while another still
    works can abort in gloo's teardown). Called with the trainer already dropped: its
    DistributedDataParallel holds the process group, which must be freed now, not while the
    interpreter shuts down (where gloo's threads can abort the process after a finished run)."""
    gc.collect()
    distributed.wait_for_all(rank)
    distributed.finish(rank)
    if rank.main:
        console.print(f"step {step}: exported to {export}")


@train_app.command("ldm")
def ldm(
    run: Path = typer.Option(..., "--run", "--run-dir", help="run folder: checkpoint.pt, samples/, export/ "
                             "(--run-dir under torchrun, whose own --run-path takes --run)"),
    first_stage: Path = typer.Option(..., help="frozen autoencoder (a model folder or checkpoint); a bundled one "
                                               "(dc-f8 or weights/dc-f8) is named by the export, not copied"),
    task: str = typer.Option("txt2img", help="txt2img, inpaint, sr or uncond"),
    data: Path = typer.Option(DATA, help="folder with the prepared emoji.npz / photos-<size>.npy"),
    photos: str = typer.Option("photos-128.npy", help="photo crops file inside --data"),
    image_size: int = typer.Option(128, help="training size in pixels"),
    model_channels: int = typer.Option(64),
    channel_mult: str = typer.Option("1,2,2"),
    num_res_blocks: int = typer.Option(1, help="ResBlocks per level (more than --init-from's: the new ones start "
                                               "as the identity)"),
    attention_resolutions: str = typer.Option("2", help="downsampling factors with attention ('' for none)"),
    num_head_channels: int = typer.Option(32),
    transformer_depth: int = typer.Option(1, help="txt2img: transformer blocks per SpatialTransformer (deeper than "
                                                  "--init-from's: the new blocks start as the identity)"),
    batch: int = typer.Option(16),
    lr: float = typer.Option(2e-4),
    steps: int = typer.Option(20000),
    warmup: int = typer.Option(0, help="linear learning-rate warm-up steps"),
    min_lr: float = typer.Option(1.0, help="final learning rate as a fraction of --lr, reached by a cosine at --steps "
                                           "(1: constant)"),
    channels_last: bool = typer.Option(False, help="channels-last memory format of the UNet"),
    mirror: bool = typer.Option(False, help="txt2img: show emoji without a side (not flags, symbols, arrows, "
                                            "clocks) mirrored half of the time"),
    augment: int = typer.Option(0, help="txt2img: random views of every emoji (scaled, turned, shifted; mirrored as "
                                        "--mirror allows), encoded once, drawn for half of each batch"),
    category_power: float = typer.Option(1.0, help="txt2img: draw a CLDR category of n emoji in proportion to "
                                                   "n ** this (1: every image alike; 0: every category alike)"),
    cond_drop: float = typer.Option(0.1, help="text dropout for classifier-free guidance"),
    prediction: str = typer.Option("eps", help="eps or v (velocity) targets"),
    zero_terminal_snr: bool = typer.Option(False, help="rescale the schedule to pure noise at T (Lin et al. 2023; needs v)"),
    min_snr_gamma: float = typer.Option(0.0, help="Min-SNR-gamma loss weighting (Hang et al. 2023; 5 is theirs; 0: off)"),
    min_snr_plus_one: bool = typer.Option(False, help="v: clamp SNR + 1 rather than SNR, so that high-noise steps keep "
                                                      "the plain v-loss weight (not ~0 near pure noise)"),
    precision: str = typer.Option("fp32", help="fp32, or bf16 autocast of the UNet (fp32 master weights; also on CPU)"),
    ema_half_life: int = typer.Option(0, help="EMA half-life in steps (0: --ema-decay as CompVis, 0.9999)"),
    emoji_fraction: float = typer.Option(0.25, help="sr: share of emoji mosaics among the targets"),
    contexts: bool = typer.Option(True, help="txt2img: use the precomputed text contexts when prepared"),
    seed: int = typer.Option(0),
    checkpoint_every: int = typer.Option(500),
    sample_every: int = typer.Option(0, help="save sample grids every N steps (0: never)"),
    max_minutes: float = typer.Option(0.0, help="stop (checkpointed and exported) after this wall time; 0: no limit"),
    device: str = typer.Option("auto"),
    resume: bool = typer.Option(True, help="continue from the run folder's checkpoint"),
    init_from: Optional[Path] = typer.Option(None, help="fine-tune: start from this trained model's weights "
                                                        "(same architecture and first-stage encoder) when the run has no checkpoint"),
    export_to: Optional[Path] = typer.Option(None, help="export folder (default RUN/export)"),
) -> None:
    """Stage 2: a latent diffusion UNet on a frozen first stage (eps or v targets, EMA, CFG dropout)."""
    from latentgen.loader import load_model

    from .autoencoder import load_photos
    from .ldm import LDMConfig, LDMData, train_ldm

    config = LDMConfig(
        task=task, image_size=image_size, model_channels=model_channels, channel_mult=_numbers(channel_mult),
        num_res_blocks=num_res_blocks, attention_resolutions=_numbers(attention_resolutions),
        num_head_channels=num_head_channels, transformer_depth=transformer_depth, batch=batch, lr=lr, steps=steps, warmup=warmup, min_lr=min_lr,
        channels_last=channels_last, mirror=mirror, augment=augment, category_power=category_power, cond_drop=cond_drop,
        parameterization=prediction, zero_terminal_snr=zero_terminal_snr, min_snr_gamma=min_snr_gamma,
        min_snr_plus_one=min_snr_plus_one,
        precision=precision, ema_half_life=ema_half_life, emoji_fraction=emoji_fraction, seed=seed, checkpoint_every=checkpoint_every, sample_every=sample_every,
        max_minutes=max_minutes, device=device,
    )
    _check_precision(precision)
    rank = _join(config)
    wants_emoji = task == "txt2img" or (task == "sr" and emoji_fraction > 0)
    sources = LDMData(
        photos=load_photos(data / photos, image_size) if task != "txt2img" else None,
        emoji=datasets.EmojiSet.load(data, use_contexts=contexts) if wants_emoji else None,
    )
    from latentgen import catalog

    step = train_ldm(config, load_model(first_stage), sources, run, resume, export_dir=export_to,
                     init_from=load_model(init_from) if init_from else None,
                     first_stage_name=catalog.bundled_name(catalog.resolve(first_stage)), rank=rank).step
    _finish(rank, step, export_to or run / "export")


@train_app.command("estimator")
def estimator(
    run: Path = typer.Option(..., "--run", "--run-dir", help="run folder: checkpoint.pt, samples/, export/"),
    into: Optional[Path] = typer.Option(None, help="an LDM-SR (sr) or inpainting (inpaint) model folder to store the "
                                                   "trained estimator in (its upscale / inpaint then refines the estimate)"),
    task: str = typer.Option("sr", help="sr: a regression upscaler; inpaint: a regression inpainter"),
    factor: int = typer.Option(4, help="sr: upscaling factor (the LDM-SR model's f)"),
    channels: int = typer.Option(32, help="width of the low-resolution convolutions (inpaint: at 1/4 resolution)"),
    blocks: int = typer.Option(6, help="residual blocks (inpaint: at 1/8 resolution, twice --channels wide)"),
    photos: Path = typer.Option(DATA / "photos-128.npy", help="prepared photo crops"),
    crop: int = typer.Option(128, help="high-resolution training crop size"),
    batch: int = typer.Option(16),
    lr: float = typer.Option(1e-3),
    steps: int = typer.Option(20000),
    warmup: int = typer.Option(200, help="linear learning-rate warm-up steps, then cosine decay to --steps"),
    min_lr: float = typer.Option(0.02, help="final learning rate as a fraction of --lr"),
    grad_clip: float = typer.Option(1.0, help="gradient-norm clip (0: off)"),
    precision: str = typer.Option("fp32", help="fp32, or bf16 autocast (fp32 master weights)"),
    channels_last: bool = typer.Option(False, help="channels-last memory format (with bf16: 1.4x faster for inpaint here)"),
    seed: int = typer.Option(0),
    checkpoint_every: int = typer.Option(500),
    sample_every: int = typer.Option(0, help="save target/estimate grids every N steps (0: never)"),
    max_minutes: float = typer.Option(0.0, help="stop (checkpointed and exported) after this wall time; 0: no limit"),
    device: str = typer.Option("auto"),
    resume: bool = typer.Option(True, help="continue from the run folder's checkpoint"),
) -> None:
    """A regression upscaler (bicubic + learned residual, MSE) on clean bicubic downsamples of the
    photo crops, or a regression inpainter (push-pull fill + learned residual, MSE in the hole) on
    masked crops: the estimate an LDM's `upscale` / `inpaint` refines instead of sampling from noise."""
    from .autoencoder import load_photos
    from .estimator import EstimatorConfig, attach, train_estimator

    _check_precision(precision)
    config = EstimatorConfig(task=task, factor=factor, channels=channels, blocks=blocks, crop=crop, batch=batch, lr=lr,
                             steps=steps, warmup=warmup, min_lr=min_lr, grad_clip=grad_clip, precision=precision,
                             channels_last=channels_last, seed=seed, checkpoint_every=checkpoint_every, sample_every=sample_every,
                             max_minutes=max_minutes, device=device)
    rank = _join(config)
    with _flushed_denormals():  # as for dc: the zero-initialised residuals start near zero
        step = train_estimator(config, load_photos(photos, crop), run, resume, rank=rank).step
    _finish(rank, step, run / "export")
    if into is not None and rank.main:
        attach(into, run / "export")
        console.print(f"stored in {into}")


@train_app.command("fit-preview")
def fit_preview(
    model: Path = typer.Argument(..., help="a model folder (model.safetensors + config.json) to store the projection in"),
) -> None:
    """Fit the latent-to-RGB preview projection of a model folder and store it in its config.json."""
    from latentgen.loader import load_model
    from latentgen.previews import fit_projection

    from .runs import update_params

    if not (model / "config.json").is_file():
        raise typer.BadParameter(f"{model} has no config.json")
    loaded = load_model(model)
    projection = fit_projection(loaded.first_stage, loaded.spec.scale_factor, loaded.spec.factor).tolist()
    file = update_params(model, {"preview_projection": projection})
    console.print(f"stored the preview projection in {file}")


@train_app.command("evaluate")
def evaluate(
    model: Path = typer.Argument(..., help="a model folder or checkpoint (autoencoder, SR or inpainting)"),
    data: Path = typer.Option(EVAL_PHOTOS, help="folder holding set5/, set14/, bsd68/ (never trained on)"),
    datasets: str = typer.Option(",".join(DATASETS), help="which of them"),
    crop: int = typer.Option(128, help="central crop side in pixels (the high-res side for SR); 0: whole images"),
    steps: Optional[int] = typer.Option(None, help="DDIM steps (default: the model's default_steps, else 50)"),
    strength: Optional[float] = typer.Option(None, help="SR and inpainting with a regression estimator: the strength its estimate "
                                                        "is refined from (default: the model's)"),
    seed: int = typer.Option(0, help="noise and inpainting-mask seed (txt2img: the first seed)"),
    seeds: int = typer.Option(10, help="txt2img: seeds per colour prompt"),
    scale: Optional[float] = typer.Option(None, help="txt2img: guidance scale (default: the model's)"),
    emoji: int = typer.Option(0, help="autoencoders: also score this many seeded emoji round trips (colour fidelity)"),
    emoji_size: int = typer.Option(128, help="autoencoders: the emoji's size in pixels"),
    emoji_data: Path = typer.Option(DATA, help="folder with the prepared emoji.npz (for --emoji)"),
    device: str = typer.Option("cpu"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write per-image scores and means here"),
) -> None:
    """Held-out scores of a trained model against the task's simple baseline (the model cards' numbers);
    text-to-image models: how often colour prompts get their colour."""
    from dataclasses import asdict

    from latentgen import tasks
    from latentgen.loader import load_model

    from .data import EmojiSet
    from .evaluate import emoji_round_trip, summarize, task_of
    from .evaluate import evaluate as run_evaluation

    loaded = tasks.prepare(load_model(model), device, "fp32")
    steps = steps or loaded.spec.default_steps or tasks.DEFAULT_STEPS
    if task_of(loaded) == "txt2img":
        options = tasks.Sampling(steps=steps, seed=seed,
                                     scale=tasks.default_scale(loaded) if scale is None else scale)
        _evaluate_colours(model, loaded, seeds, options, json_out)
        return
    options = tasks.Sampling(steps=steps, seed=seed)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("images", total=None)
        scores = run_evaluation(loaded, data, tuple(_numbers(datasets, str)), crop, options,
                                progress=lambda done, total: progress.update(task, completed=done, total=total),
                                strength=strength)
    means = summarize(scores)
    hole = " (hole)" if task_of(loaded) == "inpaint" else ""
    columns = {"psnr": f"PSNR{hole} dB", "ssim": "SSIM", "baseline_psnr": f"baseline PSNR{hole} dB",
               "baseline_ssim": "baseline SSIM", "gradient_ratio": "gradient energy / truth",
               "baseline_gradient_ratio": "baseline gradient / truth"}
    size = f"{crop} px crops" if crop > 0 else "whole images"
    Console().print(_means_table(means, columns, f"{model.name}: {task_of(loaded)}, {size}"))
    if "chroma_error" in means["all"]:
        colour = {"chroma_error": "a*b* error", "baseline_chroma_error": "baseline a*b* error",
                  "green": "green px", "original_green": "original green px"}
        Console().print(_means_table(means, colour, f"{model.name}: hue kept", caption=(
            "a*b* error: mean CIELAB a*b* distance of 8x8-block means (hue kept: <= 3); "
            "green px: share of green-dominant pixels")))
    for score in scores:
        if score.green is not None and score.image == "pepper.png":
            console.print(f"{score.dataset}/{score.image}: green-dominant pixels {score.original_green:.1%} -> "
                          f"{score.green:.1%} (bicubic {score.baseline_green:.1%}), a*b* error {score.chroma_error:.2f}")
    report = {"model": str(model), "task": task_of(loaded), "crop": crop, "steps": steps, "seed": seed, "means": means,
              "images": [asdict(s) for s in scores]}
    if emoji and task_of(loaded) == "autoencoder":
        trip = emoji_round_trip(loaded, EmojiSet.load(emoji_data, use_contexts=False).images, emoji,
                                emoji_size, seed)
        console.print(f"{trip.images} emoji at {emoji_size} px: PSNR {trip.psnr:.2f} dB, mean colour error "
                      f"{trip.colour_error:.3f}, saturation {trip.saturation:.3f} (originals {trip.original_saturation:.3f})")
        report["emoji"] = asdict(trip)
    if json_out is not None:
        console.print(f"wrote {write_new(json_out, json.dumps(report, indent=2))}")


def _means_table(means: dict, columns: dict[str, str], title: str, caption: Optional[str] = None) -> Table:
    """One row per dataset of the `columns` present in the means (green shares as percentages)."""
    shown = [key for key in columns if key in means["all"]]
    table = Table("dataset", "images", *(columns[key] for key in shown), title=title, caption=caption)
    for name, row in means.items():
        table.add_row(name, str(row["images"]), *(f"{row[key]:.1%}" if "green" in key else
                                                  f"{row[key]:.2f}" if "psnr" in key or "chroma" in key else
                                                  f"{row[key]:.4f}" for key in shown))
    return table


def _evaluate_colours(path: Path, model, seeds: int, options, json_out: Optional[Path]) -> None:
    from dataclasses import asdict

    from .evaluate import colour_prompt_scores

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("images", total=None)
        scores = colour_prompt_scores(model, seeds, options,
                                      progress=lambda done, total: progress.update(task, completed=done, total=total))
    table = Table("prompt", "right colour", "colours made", title=f"{path.name}: colour prompts, {seeds} seeds each, "
                  f"{options.steps} DDIM steps, guidance {options.scale:g}")
    by_prompt: dict[str, list] = {}
    for score in scores:
        by_prompt.setdefault(score.prompt, []).append(score)
    for prompt, group in by_prompt.items():
        made = Counter(score.found for score in group).most_common()
        table.add_row(prompt, f"{sum(s.found == s.expected for s in group)}/{len(group)}",
                      ", ".join(f"{name} {count}" for name, count in made))
    accuracy = sum(s.found == s.expected for s in scores) / len(scores)
    table.add_row("all", f"{accuracy:.0%}", "")
    Console().print(table)
    if json_out is not None:
        report = {"model": str(path), "task": "txt2img", "steps": options.steps, "scale": options.scale,
                  "seeds": seeds, "accuracy": accuracy, "images": [asdict(s) for s in scores]}
        console.print(f"wrote {write_new(json_out, json.dumps(report, indent=2))}")
