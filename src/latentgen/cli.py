"""The `latentgen` command line: a thin layer over the Python API, one typer command per task.

Argument parsing, progress bars, tables and one-line errors live here; the work is done by
`tasks` (one image) and `jobs` (runs of many, resumable), which Python callers use directly.
"""

import functools
import json
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Callable, Optional

import torch
import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from . import __version__, addons, catalog, distributed, images, jobs, memory, previews, tasks
from . import prompts as prompt_syntax
from .devices import pick_device, pick_dtype
from .errors import LatentgenError
from .files import write_new
from .ldm import LatentDiffusion, ModelSpec
from .loader import convert_checkpoint, file_sha256, list_models, load_model
from .samplers import SAMPLERS
from .tiling import set_seamless
from .train.cli import train_app

CONTEXT = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, context_settings=CONTEXT,
                  help="Latent Diffusion image generation.")
app.add_typer(train_app, name="train", help="Train autoencoders and latent diffusion models.")
console = Console(stderr=True)


class Settings:
    """Options of the top-level callback that every command reads."""

    debug = False
    quiet = False
    json = False


# Options shared by several commands.
Ckpt = Annotated[Optional[Path], typer.Option("--ckpt", help="Checkpoint file, model folder or bundled model name (default: the bundled model).")]
Prediction = Annotated[Optional[str], typer.Option("--prediction", help="eps or v, for checkpoints whose kind cannot be detected (SD 2.x).")]
Config = Annotated[Optional[Path], typer.Option("--config", help="Official YAML or JSON config for --ckpt.")]
Device = Annotated[str, typer.Option("--device", help="auto, cuda, cuda:N, mps or cpu.")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto (fp16/bf16 on GPU; on a CPU with native bf16, bf16 for SD-sized UNets, else fp32), fp32, fp16 or bf16.")]
Out = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output image file (.png, .jpg, .webp) or folder (default ./outputs).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing files instead of numbering new ones.")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Seed of the first image; image i uses seed + i; -1: a random one.")]
Steps = Annotated[Optional[int], typer.Option("--steps", help=f"Sampling steps (default {tasks.DEFAULT_STEPS}).")]
Sampler = Annotated[Optional[str], typer.Option("--sampler", help=f"One of: {', '.join(SAMPLERS)}; AUTOMATIC1111's names ('DPM++ 2M Karras', 'Euler a') and stable-diffusion.cpp's (dpm++2m) work too.")]
Eta = Annotated[Optional[float], typer.Option("--eta", help="DDIM eta (0 = deterministic).")]
Karras = Annotated[bool, typer.Option("--karras", help="Karras sigmas for the k-diffusion samplers.")]
Guidance = Annotated[Optional[float], typer.Option("--scale", "--cfg-scale", help="Classifier-free guidance scale (1 = off; default: the model's).")]
Negative = Annotated[str, typer.Option("--negative", "--negative-prompt", help="Negative prompt (the unconditional context) of text models; AUTOMATIC1111's (word:1.2) syntax works.")]
Loras = Annotated[Optional[list[str]], typer.Option("--lora", help="A LoRA file (kohya/A1111 or diffusers/PEFT) to merge, as FILE or FILE:WEIGHT; repeatable.")]
LoraDir = Annotated[Optional[Path], typer.Option("--lora-dir", help="Folder where a prompt's <lora:name:weight> tags are found (also $LATENTGEN_LORA).")]
Vae = Annotated[Optional[Path], typer.Option("--vae", help="Another first stage with the same latents (e.g. SD's ft-MSE VAE).")]
Embeddings = Annotated[Optional[Path], typer.Option("--embeddings", help="Folder of textual-inversion embeddings (A1111 .pt/.safetensors), used in prompts by file name.")]
ClipSkip = Annotated[Optional[int], typer.Option("--clip-skip", help="CLIP layers to skip from the end, as A1111: 1 = last (default), 2 = penultimate.")]
VaeTiling = Annotated[bool, typer.Option("--vae-tiling", help="Decode in overlapping tiles: large images in bounded memory.")]
Seamless = Annotated[bool, typer.Option("--seamless", help="Circular padding in the UNet and decoder: the image tiles without a seam (A1111 'Tiling').")]
DeviceNoise = Annotated[bool, typer.Option("--device-noise", help="Draw noise on the device (faster, not reproducible across devices).")]
Inputs = Annotated[Optional[Path], typer.Option("--inputs", help="A folder of images (or a file listing them) to process in one resumable run instead of IMAGE; outputs go to the --out folder under the inputs' names; splits over torchrun's ranks.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue a stopped run (same arguments) from its manifest.")]
Refine = Annotated[Optional[float], typer.Option("--strength", help="Models with a regression estimator (the bundled sr4x and inpaint): the noise level the diffusion model refines the estimate from; 0 is the estimate, 1 samples from pure noise (default: the model's).")]
MaxMemory = Annotated[Optional[str], typer.Option("--max-memory", help="Refuse to start if the estimated peak memory exceeds this (e.g. 8GB, 512MiB).")]


def show_version(value: bool) -> None:
    if value:
        print(f"latentgen {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or tables.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON summary line on stdout.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=show_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """latentgen: txt2img, inpaint, upscale and reconstruct with Latent Diffusion Models."""
    Settings.debug, Settings.quiet, Settings.json = debug, quiet or json_output, json_output


def user_errors(command: Callable) -> Callable:
    """Print a user mistake as one line (never wrapped, even when piped) and exit 1; keep
    tracebacks for --debug."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except LatentgenError as error:
            if Settings.debug:
                raise
            rank = distributed.current()
            where = f" (rank {rank.rank} of {rank.world})" if rank.world > 1 else ""
            console.print(f"[bold red]error{where}:[/] {error}", highlight=False, soft_wrap=True, markup=True)
            raise typer.Exit(1)
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]: finished images are complete; nothing partial was written",
                          soft_wrap=True)
            raise typer.Exit(130)

    return wrapper


for _command in train_app.registered_commands:  # `latentgen train ...` reports mistakes the same way
    _command.callback = user_errors(_command.callback)


class RateColumn(ProgressColumn):
    """Items per second of a task (steps of an image, images of a run)."""

    def render(self, task) -> Text:
        return Text("" if not task.speed else f"{task.speed:.2f} it/s")


def progress_bar() -> Progress:
    """Per task: done / total, rate, time elapsed and left (ETA)."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console, disable=Settings.quiet, transient=True,
    )


def say(text: str) -> None:
    if not Settings.quiet:
        console.print(text, highlight=False, soft_wrap=True)


def summary(command: str, **fields) -> None:
    if Settings.json:
        print(json.dumps({"command": command, **fields}, default=str), flush=True)


def open_model(path: Path, config: Optional[Path], device: str, dtype: str,
               prediction: Optional[str] = None, vae_tiling: bool = False) -> LatentDiffusion:
    target = pick_device(device)

    def precision(spec: ModelSpec) -> torch.dtype:
        return pick_dtype(dtype, target, spec.unet.model_channels if spec.unet else None)

    with nullcontext() if Settings.quiet else console.status(f"loading {path.name}", spinner="dots"):
        model = load_model(path, config=config, prediction=prediction, dtype=precision)
    model.vae_tiling = vae_tiling
    return tasks.prepare(model, device, dtype)


def lora_argument(value: str) -> tuple[Path, float]:
    """FILE or FILE:WEIGHT."""
    path, _, weight = value.rpartition(":")
    try:
        return (Path(path), float(weight)) if path else (Path(value), 1.0)
    except ValueError:
        return Path(value), 1.0


def apply_addons(model: LatentDiffusion, texts: list[str], loras: Optional[list[str]], lora_dir: Optional[Path],
                 vae: Optional[Path], clip_skip: Optional[int], embeddings: Optional[Path] = None) -> None:
    """--lora files and the prompts' <lora:name:weight> tags merged, --vae swapped in, --clip-skip
    set, --embeddings made usable in prompts."""
    files = [lora_argument(value) for value in loras or []]
    for text in texts:
        for kind, name, weight in prompt_syntax.extra_networks(text)[1]:
            if kind != "lora":
                raise LatentgenError(f"<{kind}:{name}>: only <lora:...> tags are supported")
            entry = (catalog.find_lora(name, catalog.lora_dirs(lora_dir)), weight)
            if entry not in files:
                files.append(entry)
    addons.add_loras(model, files)
    if vae is not None:
        addons.swap_vae(model, vae)
    if clip_skip is not None:
        addons.set_clip_skip(model, clip_skip)
    if embeddings is not None:
        addons.record_embeddings(model, addons.load_embeddings(model, embeddings), texts)


def parameters_of(image: Path) -> str:
    text = images.read_parameters(image)
    if text is None:
        raise LatentgenError(f"{image} has no generation parameters")
    return text


def pick_seed(seed: Optional[int]) -> int:
    """0 by default; `-1` draws a random seed, which is printed (and recorded in the PNG like any seed)."""
    if seed is None:
        return 0
    if seed != -1:
        return seed
    seed = jobs.random_seed()
    say(f"seed {seed}")
    return seed


def join_torchrun(device: str) -> tuple[distributed.Rank, str]:
    """Under torchrun: this process's rank and device (`auto`: cuda:LOCAL_RANK or the CPU), the
    process group joined, and rank 0 alone speaking for the job."""
    rank = distributed.current()
    if rank.world > 1:
        Settings.quiet = Settings.quiet or not rank.main
        device = rank.device(device)
        distributed.start(rank)
    return rank, device


def image_loader(image: Optional[Path]) -> Callable[[Path], torch.Tensor]:
    """load(path) for a command's `make`: IMAGE read once, now (a bad file fails before the model
    loads), any other input when it is asked for."""
    first = images.load_image(image) if image is not None else None
    return lambda source: first if source == image else images.load_image(source)


def check_single_or_inputs(image: Optional[Path], inputs: Optional[Path], out: Optional[Path]) -> None:
    """One image or --inputs, not both; a run over inputs writes a folder; torchrun needs a run."""
    if (image is None) == (inputs is None):
        raise LatentgenError("give one image or --inputs DIR, not both" if image else "give an image or --inputs DIR")
    if inputs is not None and jobs.is_file_target(out):
        raise LatentgenError(f"--out {out} names one file; a run over --inputs writes a folder")
    if inputs is None and distributed.current().world > 1:
        raise LatentgenError("under torchrun give --inputs DIR: one image is not shared between ranks")


MakeImage = Callable[[Path, tasks.Sampling, Callable[[int, int], None]], tuple]
"""make(input path, sampling with its seed, step progress) -> (image tensor, PNG parameters text)."""


def run_images(command: str, image: Optional[Path], inputs: Optional[Path], out: Optional[Path], model: LatentDiffusion,
               options: tasks.Sampling, settings: dict, make: MakeImage, overwrite: bool, resume: bool,
               rank: distributed.Rank, unit: str = "steps") -> list[Path]:
    """IMAGE alone (written to `--out` or `outputs/COMMAND-SEED.png`), or every image of --inputs in
    a resumable run (`jobs.run_over_inputs`; image i with seed + i, rank 0 showing the whole run)."""
    if inputs is None:
        with progress_bar() as bar:
            task = bar.add_task(unit, total=options.steps)
            result, info = make(image, options, lambda i, n: bar.update(task, completed=i, total=n))
        return [images.save_image(result, jobs.output_path(out, f"{command}-{options.seed}"), parameters=info,
                                  overwrite=overwrite, check=True)]
    planned = jobs.plan_inputs(jobs.read_inputs(inputs), seed=options.seed)
    fingerprint = jobs.fingerprint(model, options, None, "", out, extra={"command": command, **settings})
    with progress_bar() as bar:
        images_task = bar.add_task(run_description(rank), total=len(planned))
        steps_task = bar.add_task(unit, total=options.steps)

        def made(job: jobs.Job) -> tuple:
            bar.reset(steps_task, total=options.steps)
            return make(job.source, replace(options, seed=job.seed),
                        lambda i, n: bar.update(steps_task, completed=i, total=n))

        written = jobs.run_over_inputs(planned, out or Path("outputs"), fingerprint, made, resume, overwrite,
                                       on_progress=lambda done, total: bar.update(images_task, completed=done,
                                                                                  total=total), rank=rank)
    distributed.finish(rank)
    if resume and not written:
        say("nothing left to do: every image of this run is already written")
    return written


def run_description(rank: distributed.Rank) -> str:
    return "images" if rank.world == 1 else f"images (all {rank.world} ranks)"


def sampling_options(sampler, steps, eta, karras, scale, seed, device_noise, model) -> tasks.Sampling:
    """The run's sampling; without --steps, the model's own `default_steps` (its config's) or DEFAULT_STEPS."""
    default_steps = model.spec.default_steps or tasks.DEFAULT_STEPS
    return tasks.Sampling(
        sampler=sampler or "ddim", steps=default_steps if steps is None else steps, eta=eta or 0.0, karras=karras,
        scale=scale if scale is not None else tasks.default_scale(model), seed=pick_seed(seed),
        on_device_noise=device_noise,
    )


@app.command()
@user_errors
def txt2img(
    prompt: Annotated[Optional[str], typer.Argument(help="What to draw (AUTOMATIC1111's (word:1.2), [word], BREAK work).")] = None,
    prompt_option: Annotated[Optional[str], typer.Option("--prompt", "-p", help="The prompt, as an option.")] = None,
    negative: Negative = "",
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="A text file with one prompt per line.")] = None,
    class_label: Annotated[Optional[list[int]], typer.Option("--class", help="Class id(s) for class-conditional models.")] = None,
    num: Annotated[int, typer.Option("--num", "-n", help="Images per prompt.")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 1,
    height: Annotated[Optional[int], typer.Option("--height", "-H", help="Pixels (default: the model's native size).")] = None,
    width: Annotated[Optional[int], typer.Option("--width", "-W", help="Pixels (default: the model's native size).")] = None,
    steps: Steps = None, sampler: Sampler = None, eta: Eta = None, karras: Karras = False,
    scale: Guidance = None, seed: Seed = None, device_noise: DeviceNoise = False,
    from_png: Annotated[Optional[Path], typer.Option("--from-png", help="Take prompt, negative prompt, sampler, steps, guidance, seed and size from an image's parameters (latentgen's, AUTOMATIC1111's, sd.cpp's); flags given too win.")] = None,
    grid: Annotated[bool, typer.Option("--grid", help="Also write one grid image of the run.")] = False,
    hires_scale: Annotated[Optional[float], typer.Option("--hires-scale", help="Hires fix (A1111): sample at the size asked, enlarge by this, refine with img2img.")] = None,
    hires_strength: Annotated[float, typer.Option("--hires-strength", help="Denoising strength of the hires pass.")] = 0.5,
    hires_steps: Annotated[int, typer.Option("--hires-steps", help="Steps of the hires pass (0: as --steps).")] = 0,
    hires_upscaler: Annotated[str, typer.Option("--hires-upscaler", help="latent (bilinear on the latent, A1111's default) or image (bicubic on the decoded image, then encoded).")] = "latent",
    seamless: Seamless = False, vae_tiling: VaeTiling = False, lora: Loras = None, lora_dir: LoraDir = None, vae: Vae = None, clip_skip: ClipSkip = None,
    embeddings: Embeddings = None,
    preview: Annotated[Optional[Path], typer.Option("--preview", help="Write the current x0 estimate to this PNG while sampling (cheap latent-to-RGB projection, or --taesd).")] = None,
    preview_every: Annotated[int, typer.Option("--preview-every", help="Steps between previews.")] = 5,
    taesd: Annotated[Optional[Path], typer.Option("--taesd", help="A TAESD decoder (madebyollin's taesd_decoder) for --preview.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a stopped run (same arguments) from its manifest.")] = False,
    max_memory: MaxMemory = None, ckpt: Ckpt = None, config: Config = None, prediction: Prediction = None, device: Device = "auto",
    dtype: Dtype = "auto", out: Out = None, overwrite: Overwrite = False,
) -> None:
    """Generate images from a text prompt (or class ids, or unconditionally)."""
    rank, device = join_torchrun(device)
    if prompt is not None and prompt_option is not None:
        raise LatentgenError("give the prompt once: as an argument or with -p/--prompt")
    prompt = prompt if prompt is not None else prompt_option
    recipe = jobs.from_parameters(parameters_of(from_png)) if from_png is not None else None
    if recipe is not None:
        prompt = recipe.prompt if prompt is None and prompts is None and not class_label else prompt
        negative = negative or recipe.negative
        class_label = class_label or ([recipe.label] if recipe.label is not None else None)
        sampler, steps = sampler or recipe.sampling.sampler, steps or recipe.sampling.steps
        karras, eta = karras or recipe.sampling.karras, recipe.sampling.eta if eta is None else eta
        scale = recipe.sampling.scale if scale is None else scale
        seed = recipe.sampling.seed if seed is None else seed
        height, width = (height, width) if height or width or recipe.size is None else recipe.size
        if hires_scale is None and recipe.hires is not None:
            hires_scale, hires_strength = recipe.hires.scale, recipe.hires.strength
            hires_steps, hires_upscaler = recipe.hires.steps, recipe.hires.upscaler
    if prompts is not None and prompt is not None:
        raise LatentgenError("give either a prompt or --prompts, not both")
    texts = jobs.read_prompts(prompts) if prompts is not None else [prompt or ""]
    jobs.plan_jobs(texts, class_label, num)  # argument mistakes before the model loads
    model = open_model(ckpt or catalog.default_model("txt2img"), config, device, dtype, prediction, vae_tiling)
    if recipe is not None and recipe.model_hash and not model.sha256.startswith(recipe.model_hash.lower()):
        say(f"note: {from_png.name} was made by a model with hash {recipe.model_hash}; this is {model.sha256[:10]}")
    tasks.check_inputs(model, next((text for text in texts if text), ""), negative, class_label)
    apply_addons(model, [*texts, negative], lora, lora_dir, vae, clip_skip, embeddings)
    options = sampling_options(sampler, steps, eta, karras, scale, seed, device_noise, model)
    planned = jobs.plan_jobs(texts, class_label, num, options.seed)
    size = tasks.check_size(model, height, width)
    hires = tasks.Hires(hires_scale, hires_strength, hires_steps, hires_upscaler) if hires_scale is not None else None
    final = tasks.hires_size(model, size, hires) if hires is not None else size
    need = memory.check(model, min(batch_size, len(planned)), final, options.scale != 1, max_memory)
    set_seamless(model.modules(), seamless)
    if taesd is not None and preview is None:
        raise LatentgenError("--taesd decodes --preview images: give --preview FILE too")
    decoder = previews.load_taesd(taesd, model.spec.latent_channels) if taesd is not None else None
    writer = previews.preview_writer(model, preview, preview_every, decoder) if preview is not None else None
    with progress_bar() as bar:
        images_task = bar.add_task(run_description(rank), total=len(planned))
        steps_task = bar.add_task("steps", total=options.steps)
        written = jobs.run_txt2img(model, planned, out, negative, options, size, batch_size, resume, overwrite,
                                   on_progress=lambda done, total: bar.update(images_task, completed=done, total=total),
                                   on_step=lambda i, n: bar.update(steps_task, completed=i, total=n),
                                   on_image=lambda path: bar.reset(steps_task, total=options.steps), preview=writer,
                                   hires=hires, rank=rank)
    distributed.finish(rank)
    if not rank.main:
        return
    for path in written:
        say(f"wrote {path}")
    if grid and written:
        sheet = images.grid([images.load_image(path) for path in written])
        first = images.read_parameters(written[0])
        folder = out.parent if jobs.is_file_target(out) else (out or Path("outputs"))
        say(f"wrote {images.save_image(sheet, folder / f'grid-{options.seed}.png', parameters=first)}")
    if resume and not written:
        say("nothing left to do: every image of this run is already written")
    summary("txt2img", outputs=[str(p) for p in written], seed=options.seed, steps=options.steps, sampler=options.sampler,
            scale=options.scale, model=model.name, model_hash=model.sha256[:10], memory_estimate=need.total)


@app.command()
@user_errors
def img2img(
    image: Annotated[Optional[Path], typer.Argument(help="The image to start from (or --inputs).")] = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="What it should become (A1111 syntax).")] = "",
    negative: Negative = "",
    strength: Annotated[float, typer.Option("--strength", help="0 keeps the image (a first-stage round trip), 1 starts from noise.")] = 0.75,
    mask: Annotated[Optional[Path], typer.Option("--mask", help="White = change, black = keep exactly; with --inputs, one mask for all or a folder of masks named as the inputs.")] = None,
    inputs: Inputs = None, resume: Resume = False,
    seamless: Seamless = False, vae_tiling: VaeTiling = False, max_memory: MaxMemory = None,
    lora: Loras = None, lora_dir: LoraDir = None, vae: Vae = None, clip_skip: ClipSkip = None,
    embeddings: Embeddings = None,
    steps: Steps = None, sampler: Sampler = None, eta: Eta = None, karras: Karras = False,
    scale: Guidance = None, seed: Seed = None, device_noise: DeviceNoise = False,
    ckpt: Ckpt = None, config: Config = None, prediction: Prediction = None, device: Device = "auto",
    dtype: Dtype = "auto", out: Out = None, overwrite: Overwrite = False,
) -> None:
    """Redraw IMAGE towards a prompt (SDEdit, as CompVis scripts/img2img.py)."""
    check_single_or_inputs(image, inputs, out)
    load = image_loader(image)
    rank, device = join_torchrun(device)
    model = open_model(ckpt or catalog.default_model("txt2img"), config, device, dtype, prediction, vae_tiling)
    tasks.check_inputs(model, prompt, negative)
    apply_addons(model, [prompt, negative], lora, lora_dir, vae, clip_skip, embeddings)
    options = sampling_options(sampler, steps, eta, karras, scale, seed, device_noise, model)
    set_seamless(model.modules(), seamless)
    need = []

    def make(source: Path, sampling: tasks.Sampling, progress) -> tuple:
        picture = load(source)
        region = mask_for(mask, source, picture) if mask is not None else None
        need.append(memory.check(model, 1, tuple(picture.shape[-2:]), sampling.scale != 1, max_memory))
        result = tasks.img2img(model, picture, prompt, negative, sampling, strength, region, progress=progress)
        return result, jobs.parameters_text(model, sampling, prompt, negative, tuple(picture.shape[-2:]), sampling.seed,
                                            strength=strength)

    settings = {"prompt": prompt, "negative": negative, "strength": strength, "mask": mask}
    written = run_images("img2img", image, inputs, out, model, options, settings, make, overwrite, resume, rank)
    for path in written:
        say(f"wrote {path}")
    summary("img2img", outputs=[str(p) for p in written], seed=options.seed, strength=strength, model=model.name,
            model_hash=model.sha256[:10], memory_estimate=need[-1].total if need else None)


def mask_for(mask: Path, source: Path, picture: torch.Tensor) -> torch.Tensor:
    """The mask of input `source`: `mask` itself, or in a folder `mask` the file named as `source`."""
    if mask.is_dir():
        found = sorted(p for p in mask.glob(f"{source.stem}.*") if p.suffix.lower() in jobs.INPUT_SUFFIXES)
        if not found:
            raise LatentgenError(f"{mask} has no mask for {source.name} (a {source.stem}.png, say)")
        mask = found[0]
    return images.load_mask(mask, picture.shape[-2:])


@app.command()
@user_errors
def inpaint(
    image: Annotated[Optional[Path], typer.Argument(help="The image to repair (or --inputs).")] = None,
    mask: Annotated[Optional[Path], typer.Argument(help="White = region to fill, black = keep.")] = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text for text-conditional models.")] = "",
    negative: Negative = "",
    feather: Annotated[int, typer.Option("--feather", help="Pixels inside the hole over which the fill is blended.")] = 4,
    inputs: Inputs = None,
    masks: Annotated[Optional[Path], typer.Option("--masks", help="With --inputs: one mask for all, or a folder of masks named as the inputs.")] = None,
    strength: Refine = None,
    resume: Resume = False,
    max_memory: MaxMemory = None, lora: Loras = None, lora_dir: LoraDir = None, vae: Vae = None,
    clip_skip: ClipSkip = None, embeddings: Embeddings = None, vae_tiling: VaeTiling = False,
    steps: Steps = None, sampler: Sampler = None, eta: Eta = None, karras: Karras = False,
    scale: Guidance = None, seed: Seed = None, device_noise: DeviceNoise = False,
    ckpt: Ckpt = None, config: Config = None, prediction: Prediction = None, device: Device = "auto",
    dtype: Dtype = "auto", out: Out = None, overwrite: Overwrite = False,
) -> None:
    """Fill the white region of MASK in IMAGE."""
    check_single_or_inputs(image, inputs, out)
    if (mask if inputs is None else masks) is None:
        raise LatentgenError("give the mask: IMAGE MASK, or --masks with --inputs")
    if inputs is None and masks is not None:
        raise LatentgenError("--masks goes with --inputs; for one image give IMAGE MASK")
    if image is None and mask is not None:
        raise LatentgenError("with --inputs the masks come from --masks")
    load = image_loader(image)
    if image is not None:
        tasks.check_mask(mask_for(mask, image, load(image)))  # before the model loads
    rank, device = join_torchrun(device)
    model = open_model(ckpt or catalog.default_model("inpaint"), config, device, dtype, prediction, vae_tiling)
    tasks.check_inputs(model, prompt, negative)
    apply_addons(model, [prompt, negative], lora, lora_dir, vae, clip_skip, embeddings)
    options = sampling_options(sampler, steps, eta, karras, scale, seed, device_noise, model)
    refined = tasks.refine_strength(model, strength) if model.estimator is not None else None
    need = []

    def make(source: Path, sampling: tasks.Sampling, progress) -> tuple:
        picture = load(source)
        region = mask_for(mask or masks, source, picture)
        tasks.check_mask(region)
        need.append(memory.check(model, 1, tuple(picture.shape[-2:]), sampling.scale != 1, max_memory))
        result = tasks.inpaint(model, picture, region, prompt, negative, sampling, feather, progress=progress,
                               strength=strength)
        return result, jobs.parameters_text(model, sampling, prompt, negative, tuple(picture.shape[-2:]), sampling.seed,
                                            strength=refined)

    settings = {"prompt": prompt, "negative": negative, "feather": feather, "masks": masks, "strength": refined}
    written = run_images("inpaint", image, inputs, out, model, options, settings, make, overwrite, resume, rank)
    for path in written:
        say(f"wrote {path}")
    summary("inpaint", outputs=[str(p) for p in written], seed=options.seed, steps=options.steps, model=model.name,
            model_hash=model.sha256[:10], memory_estimate=need[-1].total if need else None)


@app.command()
@user_errors
def upscale(
    image: Annotated[Optional[Path], typer.Argument(help="The low-resolution image (or --inputs).")] = None,
    factor: Annotated[Optional[int], typer.Option("--factor", help="Output size factor (default: the model's, 4).")] = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text for text-conditional upscalers (SD 2 x4).")] = "",
    negative: Negative = "",
    scale: Annotated[Optional[float], typer.Option("--scale", help="Classifier-free guidance scale of text-conditional upscalers (default 9 for the SD 2 x4 upscaler; 1 = off).")] = None,
    noise_level: Annotated[Optional[int], typer.Option("--noise-level", help="Noise added to the low-res image by the SD 2 x4 upscaler, 0..350 (default 20); more noise, more invented detail.")] = None,
    tile: Annotated[int, typer.Option("--tile", help="Tile size in low-resolution pixels for large images.")] = 128,
    strength: Refine = None,
    inputs: Inputs = None, resume: Resume = False,
    max_memory: MaxMemory = None, lora: Loras = None, lora_dir: LoraDir = None, vae: Vae = None,
    clip_skip: ClipSkip = None, embeddings: Embeddings = None, vae_tiling: VaeTiling = False,
    steps: Steps = None, sampler: Sampler = None, eta: Eta = None, karras: Karras = False,
    seed: Seed = None, device_noise: DeviceNoise = False,
    ckpt: Ckpt = None, config: Config = None, prediction: Prediction = None, device: Device = "auto",
    dtype: Dtype = "auto", out: Out = None, overwrite: Overwrite = False,
) -> None:
    """Super-resolve IMAGE (4x with the LDM-SR family and the SD 2 x4 upscaler)."""
    check_single_or_inputs(image, inputs, out)
    load = image_loader(image)
    rank, device = join_torchrun(device)
    model = open_model(ckpt or catalog.default_model("upscale"), config, device, dtype, prediction, vae_tiling)
    tasks.check_inputs(model, prompt, negative)
    apply_addons(model, [prompt, negative], lora, lora_dir, vae, clip_skip, embeddings)
    guidance = scale if scale is not None else tasks.upscale_guidance(model)
    options = sampling_options(sampler, steps, eta, karras, guidance, seed, device_noise, model)
    extra = {"Noise level": tasks.upscale_noise_level(model, noise_level)} if model.noise_augmentation else None
    refined = tasks.refine_strength(model, strength) if model.estimator is not None else None
    f = model.spec.factor
    sizes = []

    def make(source: Path, sampling: tasks.Sampling, progress) -> tuple:
        picture = load(source)
        memory.check(model, 1, tuple(min(tile, side) * f for side in picture.shape[-2:]), sampling.scale != 1,
                     max_memory)
        result = tasks.upscale(model, picture, sampling, factor, tile, prompt, progress=progress, negative=negative,
                               noise_level=noise_level, strength=strength)
        sizes.append(list(result.shape[-2:]))
        return result, jobs.parameters_text(model, sampling, prompt, negative, tuple(result.shape[-2:]), sampling.seed,
                                            extra=extra, strength=refined)

    settings = {"factor": factor, "prompt": prompt, "negative": negative, "noise_level": noise_level, "tile": tile,
                "strength": refined}
    written = run_images("upscale", image, inputs, out, model, options, settings, make, overwrite, resume, rank, "tiles")
    for path in written:
        say(f"wrote {path}")
    summary("upscale", outputs=[str(p) for p in written], size=sizes[-1] if sizes else None, model=model.name,
            model_hash=model.sha256[:10])


def _factors_help() -> str:
    installed = ", ".join(str(f) for f in catalog.installed_factors()) or "none"
    return f"Downsampling factor of the bundled autoencoder (installed: {installed})."


@app.command()
@user_errors
def reconstruct(
    inputs: Annotated[list[Path], typer.Argument(help="Images to pass through the autoencoder.")],
    f: Annotated[int, typer.Option("--f", help=_factors_help())] = 4,
    compare: Annotated[bool, typer.Option("--compare", help="Also write input | reconstruction | amplified error.")] = False,
    ckpt: Ckpt = None, config: Config = None, device: Device = "auto", dtype: Dtype = "auto",
    out: Out = None, overwrite: Overwrite = False,
) -> None:
    """Encode and decode images through a first-stage autoencoder; report PSNR and SSIM."""
    if jobs.is_file_target(out) and len(inputs) > 1:
        raise LatentgenError(f"--out {out} names one file, but {len(inputs)} images were given: pass a folder")
    pictures = [(path, images.load_image(path)) for path in inputs]
    model = open_model(ckpt or catalog.autoencoder_for_factor(f), config, device, dtype)
    table = Table("image", "PSNR dB", "SSIM", "latent", "compression")
    rows = []
    for source, picture in pictures:
        result = tasks.reconstruct(model, picture)
        written = images.save_image(result.image, jobs.output_path(out, f"{source.stem}-recon"), overwrite=overwrite)
        row = {"input": str(source), "output": str(written), "psnr": result.psnr, "ssim": result.ssim,
               "latent_shape": list(result.latent_shape), "compression": result.compression}
        if compare:
            sheet = images.side_by_side([picture, result.image, images.error_map(picture, result.image)],
                                        labels=["input", "reconstruction", "error x8"])
            stem = out.stem if jobs.is_file_target(out) else source.stem
            row["compare"] = str(images.save_image(sheet, written.with_name(f"{stem}-compare.png"), overwrite=overwrite))
        table.add_row(str(source), f"{result.psnr:.2f}", f"{result.ssim:.4f}", "x".join(map(str, result.latent_shape)),
                      f"{result.compression:.1f}x")
        rows.append(row)
    if not Settings.quiet:
        Console().print(table)
    for row in rows:
        say(f"wrote {row['output']}" + (f" and {row['compare']}" if compare else ""))
    summary("reconstruct", model=model.name, results=rows)


@app.command()
@user_errors
def info(image: Annotated[Path, typer.Argument(help="A PNG written by latentgen, AUTOMATIC1111 or stable-diffusion.cpp.")]) -> None:
    """Show the generation parameters stored in an image."""
    text = parameters_of(image)
    if Settings.json:
        summary("info", file=str(image), **images.parse_parameters(text))
    else:
        print(text)


@app.command()
@user_errors
def models() -> None:
    """List the bundled models and the checkpoints in $LATENTGEN_WEIGHTS and $LATENTGEN_MODELS."""
    rows = list_models()
    if Settings.json:
        summary("models", models=[row.__dict__ for row in rows])
        return
    table = Table("name", "family", "f", "size MB", "hash", "path")
    for row in rows:
        table.add_row(row.name, row.family, str(row.factor), f"{row.size_mb:.1f}", row.hash, row.path)
    Console().print(table)


@app.command()
@user_errors
def convert(
    source: Annotated[Path, typer.Argument(help="A .ckpt/.pt or .safetensors checkpoint.")],
    target: Annotated[Path, typer.Argument(help="The .safetensors file to write.")],
    half: Annotated[bool, typer.Option("--half", help="Store floating-point tensors as fp16.")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Store matrices and kernels as int8, one scale per output channel (half of fp16's size; read back as floats).")] = False,
    trust: Annotated[bool, typer.Option("--trust", help="Fully unpickle a file that needs more than tensors: this RUNS any code in it. Only for files you trust.")] = False,
    overwrite: Overwrite = False,
) -> None:
    """Convert a checkpoint to safetensors (without --trust no code is executed while reading it)."""
    written = convert_checkpoint(source, target, half=half, trust=trust, overwrite=overwrite, int8=int8)
    say(f"wrote {written} (sha256 {file_sha256(written)[:10]})")
    summary("convert", output=str(written))


@app.command()
@user_errors
def bench(
    latent: Annotated[Optional[int], typer.Option("--latent", help="Latent side (64 = 512 px; default 64 on GPU, 16 on CPU).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="DDIM steps of the full image (default 50 on GPU and with --bundled, else 4 on CPU).")] = None,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed repeats per measurement (median).")] = 5,
    no_diffusers: Annotated[bool, typer.Option("--no-diffusers", help="Time latentgen alone.")] = False,
    bundled: Annotated[bool, typer.Option("--bundled", help="Time the bundled default models instead of SD 1.5.")] = False,
    cold: Annotated[bool, typer.Option("--cold", help="Also time a cold txt2img process with the bundled model.")] = False,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="Also time channels_last memory format.")] = False,
    compile_unet: Annotated[bool, typer.Option("--compile", help="Also time torch.compile'd UNets.")] = False,
    cuda_graph: Annotated[bool, typer.Option("--cuda-graph", help="Also time a CUDA-graph-captured step (GPU).")] = False,
    peer: Annotated[Optional[tuple[str, Path]], typer.Option("--peer", help="sd-cpp PATH: also time cold processes on one random-weight checkpoint file (--steps steps at --latent x 8 px): latentgen, diffusers (unless --no-diffusers) and this stable-diffusion.cpp binary.")] = None,
    processes: Annotated[bool, typer.Option("--processes", help="Time only the cold processes (latentgen, diffusers, and --peer's binary if given), not the in-process rows.")] = False,
    arch: Annotated[Optional[str], typer.Option("--arch", hidden=True, help="sd15 (default) or tiny (for tests).")] = None,
    device: Device = "auto", dtype: Dtype = "auto",
    out: Annotated[Path, typer.Option("--out", "-o", help="JSON file for the results (numbered if it exists).")] = Path("bench.json"),
    overwrite: Overwrite = False,
) -> None:
    """Time latentgen and diffusers on the same weights (UNet step, full image, VAE decode, memory),
    and with --peer sd-cpp PATH or --processes latentgen, diffusers and stable-diffusion.cpp as
    whole cold processes on one checkpoint file."""
    from . import bench as benchmark

    if peer is not None and (peer[0] != "sd-cpp" or bundled):
        raise LatentgenError("--peer takes sd-cpp PATH (stable-diffusion.cpp's sd binary), without --bundled")
    if processes and bundled:
        raise LatentgenError("--processes times the SD architecture as whole processes, not --bundled")
    target = pick_device(device)
    channels = None if bundled else benchmark.ARCHITECTURES[arch or benchmark.DEFAULT_ARCH].unet["model_channels"]
    precision = pick_dtype(dtype, target, channels)  # auto: per the UNet's size (the bundled ones: fp32 on CPU)
    gpu = target.type == "cuda"
    side, count = latent or (64 if gpu else 16), steps or (50 if gpu else 4)
    rows = []
    if bundled:
        rows = benchmark.run_bundled(target, precision, repeats, not no_diffusers, say,
                                     steps=steps or tasks.DEFAULT_STEPS)
        rows += benchmark.cold_start_rows(target, say) if cold else []
    elif not processes:
        rows = benchmark.run(target, precision, side, count, repeats, not no_diffusers, say, arch=arch,
                             channels_last=channels_last, compile_unet=compile_unet, cuda_graph_step=cuda_graph,
                             cold=cold)
    if peer is not None or processes:
        rows += benchmark.process_rows(arch, side * 8, count, max(1, repeats // 3), dtype, peer[1] if peer else None,
                                       not no_diffusers, say)
    context = benchmark.environment(target, precision)
    written = write_new(out, benchmark.to_json(rows, context), overwrite)
    if not Settings.quiet:
        Console().print(benchmark.table(rows, f"{context.get('device', target)}, {precision}"))
    say(f"wrote {written}")
    summary("bench", file=str(written), **context)


if __name__ == "__main__":
    sys.exit(app())
