"""`latentgen bench`: latentgen against diffusers on the same weights, in one process, and
against stable-diffusion.cpp as whole processes on the same checkpoint file (`--peer sd-cpp`).

diffusers is optional here (a test extra, imported only inside `reference`'s functions): when it
is importable, the very tensors latentgen runs on are handed to diffusers models (`reference`),
so both runners share weights, device and dtype. Every comparison also records how far the two
outputs are apart (`rel_diff`), so a fast but wrong path cannot pass unnoticed. Times are medians
over repeats after warm-up, the two runners called in turn, measured with CUDA events on GPU and
perf_counter elsewhere. Whole processes cannot share tensors, so latentgen, diffusers'
`StableDiffusionPipeline.from_single_file` and the stable-diffusion.cpp binary each load one
random-weight checkpoint written in the official single-file layout and are timed from process
start to PNG, with each process's own peak RSS (`process_rows`).
"""

import copy
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from . import catalog, metrics
from .devices import pick_memory_format
from .errors import LatentgenError
from .guidance import Conditioning, guided_model
from .models.autoencoder import AutoencoderKL
from .models.unet import UNetModel
from .models import adopt, on_meta
from .reference import first_stage_to_diffusers, unet_to_diffusers
from .samplers import sample
from .schedules import make_alphas_cumprod

Step = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
Report = Callable[[str], None]
GUIDANCE_SCALE = 7.5


@dataclass(frozen=True)
class Architecture:
    """A UNet and KL autoencoder shape in CompVis terms (`unet_config.params`, `ddconfig`)."""

    unet: dict
    ddconfig: dict
    embed_dim: int = 4
    scale_factor: float = 0.18215
    context_length: int = 77
    text: Optional[dict] = None
    """The CLIP text encoder's config (transformers' CLIPTextConfig names); None: SD 1.x's ViT-L/14."""

    def params(self) -> dict:
        """The architecture as an official YAML's `model.params`, the shape diffusers' converter reads."""
        return {
            "unet_config": {"params": self.unet},
            "first_stage_config": {"params": {"embed_dim": self.embed_dim, "ddconfig": self.ddconfig}},
            "scale_factor": self.scale_factor,
        }


ARCHITECTURES = {
    "sd15": Architecture(
        unet=dict(image_size=64, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                  num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                  transformer_depth=1, context_dim=768, legacy=False),
        ddconfig=dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                      ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0),
    ),
    # The same building blocks at toy width, for tests and quick checks of the bench itself.
    "tiny": Architecture(
        unet=dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2],
                  num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
                  transformer_depth=1, context_dim=32, legacy=False),
        ddconfig=dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                      num_res_blocks=1, attn_resolutions=[], dropout=0.0),
        context_length=8,
        text={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "max_position_embeddings": 77},
    ),
}
DEFAULT_ARCH = "sd15"


def architecture(arch: Union[str, Architecture, None]) -> Architecture:
    """An Architecture as given, by name, or the default (SD 1.5)."""
    return arch if isinstance(arch, Architecture) else ARCHITECTURES[arch or DEFAULT_ARCH]


@dataclass
class Row:
    """One measurement: what, the value per runner (None where a runner was not run), and notes such
    as `rel_diff`, the relative L2 distance between the two runners' outputs."""

    name: str
    latentgen_ms: float
    diffusers_ms: Optional[float] = None
    extra: dict = field(default_factory=dict)
    sdcpp_ms: Optional[float] = None

    @property
    def ratio(self) -> Optional[float]:
        return None if self.diffusers_ms is None else self.latentgen_ms / self.diffusers_ms

    @property
    def sdcpp_ratio(self) -> Optional[float]:
        return None if self.sdcpp_ms is None else self.latentgen_ms / self.sdcpp_ms


def time_ms(fns: Sequence[Callable[[], object]], device: torch.device, repeats: int, warmup: int = 2) -> list[float]:
    """Median wall time in milliseconds of each of `fns` over `repeats` rounds, after `warmup`
    untimed rounds. A round calls each function once in turn, so that a machine slowing down or
    speeding up during the run (other processes, clocks, heat) weighs on all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    samples = [[] for _ in fns]
    for _ in range(repeats):
        for fn, times in zip(fns, samples):
            times.append(_elapsed_ms(fn, device))
    return [statistics.median(times) for times in samples]


def _elapsed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """One call's time: CUDA events on GPU, perf_counter elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1000


class KeepLast:
    """A callable that remembers its latest result, so comparing outputs costs no extra call."""

    def __init__(self, fn: Callable[[], torch.Tensor]):
        self.fn, self.result = fn, None

    def __call__(self) -> torch.Tensor:
        self.result = self.fn()
        return self.result


def relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """||ours - reference|| / ||reference||, computed in float32."""
    ours, reference = ours.float(), reference.float()
    return ((ours - reference).norm() / reference.norm().clamp_min(1e-12)).item()


def random_state_dict(module: nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0,
                      memory_format: torch.memory_format = torch.contiguous_format) -> dict:
    """Random tensors for every entry of `module.state_dict()` (build it on the meta device), scaled
    like a trained network so that fp16 sees realistic ranges: weights N(0, 1/fan_in), norm gains
    near 1, small biases. Each tensor has its own storage, as a loaded checkpoint's have (oneDNN
    ran channels-last convolutions on views into one shared buffer 1.2x slower), 4-D ones laid out
    in `memory_format`."""
    generator = torch.Generator(device).manual_seed(seed)
    state = {}
    for name, shape in ((name, tensor.shape) for name, tensor in module.state_dict().items()):
        layout = memory_format if len(shape) == 4 else torch.contiguous_format
        tensor = torch.empty(shape, device=device, dtype=dtype, memory_format=layout).normal_(generator=generator)
        if len(shape) >= 2:
            tensor.mul_(shape[1:].numel() ** -0.5)
        elif name.endswith("weight"):
            tensor.mul_(0.1).add_(1.0)
        else:
            tensor.mul_(0.02)
        state[name] = tensor
    return state


def build_latentgen(arch: Architecture, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """(UNet, autoencoder) of `arch` with random weights on `device` in `dtype`, laid out as the
    commands lay them out there (`pick_memory_format`)."""
    def make_unet():
        return UNetModel(**arch.unet)

    def make_vae():
        return AutoencoderKL(arch.ddconfig, embed_dim=arch.embed_dim)

    unet_shapes, vae_shapes = on_meta(make_unet), on_meta(make_vae)
    layout = pick_memory_format(device, dtype)
    unet = adopt(make_unet, random_state_dict(unet_shapes, device, dtype, seed, layout))
    vae = adopt(make_vae, random_state_dict(vae_shapes, device, dtype, seed + 1, layout))
    return unet, vae


def has_diffusers() -> bool:
    """Whether the optional reference, diffusers, is installed."""
    return importlib.util.find_spec("diffusers") is not None


def diffusers_models(unet: Optional[nn.Module], first_stage: Optional[nn.Module], params: dict):
    """diffusers' (UNet, autoencoder) holding the very tensors of our modules (`reference`: diffusers'
    own single-file utilities where they apply). `params` is an official `model.params`
    (unet_config, first_stage_config). Either entry is None where its module was None; the whole
    result is None when diffusers is not installed."""
    if not has_diffusers():
        return None
    theirs_unet = None if unet is None else unet_to_diffusers(unet, params["unet_config"]["params"])
    theirs_vae = None if first_stage is None else first_stage_to_diffusers(first_stage,
                                                                           params["first_stage_config"]["params"])
    return theirs_unet, theirs_vae


@dataclass(frozen=True)
class Runner:
    """One implementation under test as plain callables: a UNet step (x, t, context) -> eps, a decode,
    and how it makes a guided image from those two (`latentgen_image` or `diffusers_image`)."""

    step: Step
    decode: Callable[[torch.Tensor], torch.Tensor]
    image: Callable[..., torch.Tensor]
    modules: tuple[nn.Module, ...]


def latentgen_runner(unet: nn.Module, first_stage: nn.Module) -> Runner:
    return Runner(lambda x, t, context: unet(x, t, context=context), first_stage.decode, latentgen_image,
                  (unet, first_stage))


def diffusers_runner(unet: Optional[nn.Module], vae: Optional[nn.Module]) -> Runner:
    """A diffusers UNet (2DCondition or 2D: a None context is not passed) and autoencoder (KL or VQ)
    as a Runner (either may be None: not run)."""
    def step(x: torch.Tensor, t: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        text = {} if context is None else {"encoder_hidden_states": context}
        return unet(x, t, **text, return_dict=False)[0]

    decode = None if vae is None else lambda z: vae.decode(z, return_dict=False)[0]
    return Runner(None if unet is None else step, decode, diffusers_image, tuple(m for m in (unet, vae) if m is not None))


def latentgen_image(step: Step, decode, context: Optional[torch.Tensor], x_T: torch.Tensor, steps: int,
                    scale_factor: float, concat: Optional[torch.Tensor] = None) -> torch.Tensor:
    """What latentgen's commands run after encoding their inputs: our DDIM sampler over our
    guidance (one batched forward over the [uncond, cond] rows of `context`), or, for a concat
    model (inpainting, SR; `context` None), over the UNet with `concat` joining x, then the decode."""
    unet = lambda x, t, context=None, y=None: step(x, t, context)  # noqa: E731
    if context is None:
        model = guided_model(unet, Conditioning(concat=concat))
    else:
        model = guided_model(unet, Conditioning(context=context[1:]), Conditioning(context=context[:1]),
                             GUIDANCE_SCALE)
    alphas_cumprod = make_alphas_cumprod("linear", 1000, 0.00085, 0.012)
    return decode(sample("ddim", model, x_T, alphas_cumprod, "eps", steps) / scale_factor)


def diffusers_image(step: Step, decode, context: Optional[torch.Tensor], x_T: torch.Tensor, steps: int,
                    scale_factor: float, concat: Optional[torch.Tensor] = None) -> torch.Tensor:
    """What diffusers' pipelines run after encoding: StableDiffusionPipeline's guidance over the
    [uncond, cond] rows of `context` in one forward, or LDMSuperResolutionPipeline's concatenation
    (`context` None), in its DDIMScheduler loop with SD's schedule, then the decode."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(steps, device=x_T.device)
    z = x_T
    for t in scheduler.timesteps:
        if context is None:
            eps = step(torch.cat([z, concat], dim=1), t.expand(len(z)), None)
        else:
            eps_uncond, eps_cond = step(torch.cat([z, z]), t.expand(2), context).chunk(2)
            eps = eps_uncond + GUIDANCE_SCALE * (eps_cond - eps_uncond)
        z = scheduler.step(eps, t, z, return_dict=False)[0]
    return decode(z / scale_factor)


def cuda_graph(step: Step, x: torch.Tensor, t: torch.Tensor, context: Optional[torch.Tensor]) -> Step:
    """`step` captured once in a CUDA graph with static inputs shaped like these; each call copies
    its inputs in and replays. The returned tensor is overwritten by the next call."""
    static = [x.clone(), t.clone(), None if context is None else context.clone()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(*static)

    def replay(x: torch.Tensor, t: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        for target, value in zip(static, (x, t, context)):
            if target is not None:
                target.copy_(value)
        graph.replay()
        return out

    return replay


def weight_bytes(*modules: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


def peak_memory_mb(fn: Callable[[], object], device: torch.device, *modules: nn.Module) -> float:
    """GPU: the modules' weights plus the most memory `fn` allocated on top of what was live before.
    Elsewhere: the whole process's peak resident set so far, which covers every runner (`fn` is not run)."""
    if device.type != "cuda":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before + weight_bytes(*modules)) / 2**20


def compare(name: str, ours: Callable[[], torch.Tensor], theirs: Optional[Callable[[], torch.Tensor]],
            device: torch.device, repeats: int, warmup: int = 2, **extra) -> Row:
    """Time both runners (theirs may be None), interleaved, and record how far apart their last
    outputs are."""
    runners = [KeepLast(fn) for fn in (ours, theirs) if fn is not None]
    row = Row(name, *time_ms(runners, device, repeats, warmup), extra=extra)
    if theirs is not None:
        row.extra["rel_diff"] = relative_difference(runners[0].result, runners[1].result)
    return row


@dataclass
class Workload:
    """The fixed inputs and timing settings of one run. `x`, `t`, `context` are a guided UNet step's
    (batch 2; the context rows serve as [uncond, cond]); `z` is one image's latent noise; the maps
    are laid out as the commands lay them out (`pick_memory_format`)."""

    device: torch.device
    repeats: int
    warmup: int
    x: torch.Tensor
    t: torch.Tensor
    context: Optional[torch.Tensor]
    z: torch.Tensor
    steps: int = 1
    scale_factor: float = 1.0
    concat: Optional[torch.Tensor] = None

    @staticmethod
    def random(batch: int, channels: int, latent: int, context_dim: Optional[int], context_length: int,
               device: torch.device, dtype: torch.dtype, repeats: int, warmup: int, seed: int = 0, **rest):
        generator = torch.Generator(device).manual_seed(seed)
        x = torch.randn(batch, channels, latent, latent, generator=generator, device=device, dtype=dtype)
        context = None if context_dim is None else torch.randn(
            batch, context_length, context_dim, generator=generator, device=device, dtype=dtype)
        z = torch.randn(1, channels, latent, latent, generator=generator, device=device, dtype=dtype)
        t = torch.full((batch,), 500.0, device=device)
        layout = pick_memory_format(device, dtype)  # as the commands lay out their latents
        return Workload(device, repeats, warmup, x.contiguous(memory_format=layout), t, context,
                        z.contiguous(memory_format=layout), **rest)

    def first(self, batch: int) -> "Workload":
        """The same inputs cut to `batch` rows."""
        context = None if self.context is None else self.context[:batch]
        return replace(self, x=self.x[:batch], t=self.t[:batch], context=context)


def step_row(name: str, ours: Runner, theirs: Optional[Runner], work: Workload, **extra) -> Row:
    def call(runner: Runner) -> Callable[[], torch.Tensor]:
        return lambda: runner.step(work.x, work.t, work.context)

    return compare(name, call(ours), theirs and theirs.step and call(theirs), work.device, work.repeats,
                   work.warmup, **extra)


def decode_row(name: str, ours: Runner, theirs: Optional[Runner], work: Workload, **extra) -> Row:
    def call(runner: Runner) -> Callable[[], torch.Tensor]:
        return lambda: runner.decode(work.z)

    return compare(name, call(ours), theirs and theirs.decode and call(theirs), work.device, work.repeats,
                   work.warmup, **extra)


def _image(runner: Runner, work: Workload) -> Callable[[], torch.Tensor]:
    return lambda: runner.image(runner.step, runner.decode, work.context, work.z, work.steps, work.scale_factor,
                                work.concat)


def image_row(name: str, ours: Runner, theirs: Optional[Runner], work: Workload, **extra) -> Row:
    """A whole image is slow on CPU: a third of the repeats, one warm-up."""
    return compare(name, _image(ours, work), theirs and _image(theirs, work), work.device,
                   max(1, work.repeats // 3), warmup=1, **extra)


def precision_row(unet: nn.Module, first_stage: nn.Module, work: Workload) -> Row:
    """How far this dtype's guided image is from float32's with the same weights and noise (the
    float32 copies made here): the decoded images' PSNR, their relative L2 distance as `rel_diff`."""
    ours = _image(latentgen_runner(unet, first_stage), work)().float()
    full = replace(work, **{name: getattr(work, name).float() for name in ("x", "z", "context", "concat")
                            if getattr(work, name) is not None})
    reference = _image(latentgen_runner(copy.deepcopy(unet).float(), copy.deepcopy(first_stage).float()), full)()
    return Row("guided image vs float32: PSNR (dB)", metrics.psnr(ours.clamp(-1, 1), reference.clamp(-1, 1)),
               extra={"rel_diff": relative_difference(ours, reference)})


def memory_row(ours: Runner, theirs: Optional[Runner], work: Workload) -> Row:
    if work.device.type != "cuda":
        return Row("peak RSS of the process (MB)", peak_memory_mb(lambda: None, work.device))
    row = Row("peak memory, guided image (MB)", peak_memory_mb(_image(ours, work), work.device, *ours.modules))
    if theirs is not None:
        row.diffusers_ms = peak_memory_mb(_image(theirs, work), work.device, *theirs.modules)
    return row


def run(device: torch.device, dtype: torch.dtype, latent: int, steps: int, repeats: int,
        with_diffusers: bool = True, report: Report = lambda text: None, *,
        arch: Union[str, Architecture, None] = None, channels_last: bool = False, compile_unet: bool = False,
        cuda_graph_step: bool = False, cold: bool = False, warmup: int = 2, seed: int = 0) -> list[Row]:
    """Time an architecture (default SD 1.5) with random weights: UNet step at batch 1 and 2, a
    guided `steps`-step DDIM image with decode, the decode alone, peak memory; then each requested
    fast path (channels_last, torch.compile, CUDA graph) as rows of their own; then, if asked and
    the bundled txt2img model exists, the cold start."""
    arch = architecture(arch)
    report("building the UNet and autoencoder with random weights")
    unet, vae = build_latentgen(arch, device, dtype, seed)
    ours, theirs = latentgen_runner(unet, vae), None
    if with_diffusers:
        reference = diffusers_models(unet, vae, arch.params())
        theirs = reference and diffusers_runner(*reference)
        if theirs is None:
            report("diffusers is not installed: timing latentgen alone")
    work = Workload.random(2, arch.unet["in_channels"], latent, arch.unet["context_dim"], arch.context_length,
                           device, dtype, repeats, warmup, seed, steps=steps, scale_factor=arch.scale_factor)
    rows = []
    with torch.inference_mode():
        for batch in (1, 2):
            report(f"UNet step, batch {batch}")
            rows.append(step_row(f"UNet step, batch {batch}", ours, theirs, work.first(batch), latent=latent))
        report(f"{steps}-step DDIM image with guidance")
        rows.append(image_row(f"{steps}-step guided DDIM image + decode", ours, theirs, work, image=latent * 8))
        report("decode")
        rows.append(decode_row("decode", ours, theirs, work, image=latent * 8))
        report("peak memory")
        rows.append(memory_row(ours, theirs, work))
        if dtype != torch.float32:
            report("the same image in float32")
            rows.append(precision_row(unet, vae, work))
        rows += fast_rows(ours, theirs, work, report, channels_last, compile_unet, cuda_graph_step)
    if cold:
        rows += cold_start_rows(device, report)
    return rows


def fast_rows(ours: Runner, theirs: Optional[Runner], work: Workload, report: Report = lambda text: None,
              channels_last: bool = False, compile_unet: bool = False, cuda_graph_step: bool = False) -> list[Row]:
    """The GPU levers, each timed (guided UNet step and a whole image) against the same lever applied
    to diffusers. `rel_eager` is how far our fast step's output is from our eager one; `*_setup_s` is
    the time to compile or capture, first call included. channels_last, when asked, applies to the
    levers after it (and converts the models in place)."""
    eager = ours.step(work.x, work.t, work.context)
    levers = []
    if channels_last:
        for runner in (ours, theirs):
            for module in runner.modules if runner is not None else ():
                module.to(memory_format=torch.channels_last)
        work = replace(work, x=work.x.contiguous(memory_format=torch.channels_last))
        levers.append(("channels_last", lambda step: step))
    if compile_unet:
        levers.append(("torch.compile", torch.compile))
    if cuda_graph_step and work.device.type == "cuda":
        levers.append(("CUDA graph", lambda step: cuda_graph(step, work.x, work.t, work.context)))
    elif cuda_graph_step:
        report("skipping --cuda-graph: CUDA graphs need a CUDA device")
    rows = []
    for label, lever in levers:
        label += " + channels_last" if channels_last and label != "channels_last" else ""
        report(f"UNet step and image, {label}")
        setup, fast = {}, {}
        for side, runner in (("latentgen", ours), ("diffusers", theirs)):
            if runner is not None:
                begin = time.perf_counter()
                fast[side] = replace(runner, step=lever(runner.step))
                fast[side].step(work.x, work.t, work.context)
                setup[f"{side}_setup_s"] = round(time.perf_counter() - begin, 2)
        rel_eager = relative_difference(fast["latentgen"].step(work.x, work.t, work.context), eager)
        rows.append(step_row(f"UNet step, batch 2, {label}", fast["latentgen"], fast.get("diffusers"), work,
                             rel_eager=rel_eager, **setup))
        rows.append(image_row(f"{work.steps}-step guided image, {label}", fast["latentgen"], fast.get("diffusers"),
                              work))
    return rows


def run_bundled(device: torch.device, dtype: torch.dtype, repeats: int, with_diffusers: bool = True,
                report: Report = lambda text: None, warmup: int = 2, names: Optional[list[str]] = None,
                steps: int = 50) -> list[Row]:
    """The bundled default models at their native size against diffusers on the same tensors: UNet
    step (batch 2 when cross-attention can guide), decode, and a whole `steps`-step image as their
    command makes it after encoding its inputs (guided for text, concat for inpainting and SR).
    Models not installed are skipped."""
    from .loader import load_model

    rows = []
    for name in names or sorted(set(catalog.DEFAULTS.values())):
        try:
            path = catalog.bundled_model(name)
        except LatentgenError:
            report(f"skipping {name}: not installed")
            continue
        model = load_model(path).to(device, dtype).eval()
        unet_params = model.params["unet_config"]["params"]
        latent, context_dim = unet_params.get("image_size", 32), unet_params.get("context_dim")
        batch = 2 if context_dim is not None else 1
        ours, theirs = latentgen_runner(model.unet, model.first_stage), None
        if with_diffusers:
            try:
                reference = diffusers_models(model.unet, model.first_stage, model.params)
                theirs = reference and diffusers_runner(*reference)
            except Exception as error:  # a layout diffusers' converter does not know: time ours alone
                reason = str(error).splitlines()[0][:200]
                report(f"{name}: diffusers cannot convert it ({type(error).__name__}: {reason})")
        work = Workload.random(batch, unet_params["in_channels"], latent, context_dim, 77, device, dtype, repeats,
                               warmup, steps=steps, scale_factor=model.scale_factor)
        channels = model.spec.latent_channels
        work.z, work.concat = work.z[:, :channels], (work.z[:, channels:] if context_dim is None else None)
        with torch.inference_mode():
            report(f"{name}: UNet step, decode, {steps}-step image")
            rows.append(step_row(f"{name}: UNet step, batch {batch}", ours, theirs, work, latent=latent))
            rows.append(decode_row(f"{name}: decode", ours, theirs, work, latent=latent))
            rows.append(image_row(f"{name}: {steps}-step image + decode", ours, theirs, work, latent=latent))
        del model, ours, theirs
    return rows


def cold_start_ms(prompt: str = "a red heart", device: str = "cpu") -> float:
    """Process start to first PNG with the bundled default txt2img model."""
    with tempfile.TemporaryDirectory() as folder:
        begin = time.perf_counter()
        subprocess.run([sys.executable, "-m", "latentgen.cli", "--quiet", "txt2img", prompt, "--out",
                        str(Path(folder) / "cold.png"), "--device", device], check=True)
        return (time.perf_counter() - begin) * 1000


def cold_start_rows(device: torch.device, report: Report = lambda text: None) -> list[Row]:
    """The cold-start row, or none (with a note) when the bundled txt2img model is not installed."""
    try:
        catalog.default_model("txt2img")
    except LatentgenError:
        report("skipping the cold start: the bundled txt2img model is not installed")
        return []
    report("cold start")
    return [Row("cold start to PNG (bundled txt2img)", cold_start_ms(device=str(device)))]


# ---- whole processes: latentgen against stable-diffusion.cpp on one file --------------------

PEER_PROMPT = "a photograph of an astronaut riding a horse"


def write_checkpoint(arch: Architecture, folder: Path, seed: int = 0) -> tuple[Path, Optional[Path]]:
    """(model.safetensors, config or None): `arch` with random weights (UNet, KL autoencoder, CLIP
    text encoder) in the official single-file key layout, fp16 as released checkpoints are; the
    config (a `cond_stage_config`) only where the text encoder is not SD 1.x's, which the loader
    would otherwise assume."""
    from safetensors.torch import save_file

    from .models.text import FrozenCLIPEmbedder

    unet, vae = build_latentgen(arch, torch.device("cpu"), torch.float16, seed)
    text = random_state_dict(on_meta(lambda: FrozenCLIPEmbedder(arch.text)), torch.device("cpu"), torch.float16,
                             seed + 2)
    state = {**{f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()},
             **{f"first_stage_model.{k}": v for k, v in vae.state_dict().items()},
             **{f"cond_stage_model.{k}": v for k, v in text.items()}}
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    if arch.text is None:
        return weights, None
    config = folder / "text-encoder.json"
    config.write_text(json.dumps({"cond_stage_config": {
        "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder", "params": {"config": arch.text}}}))
    return weights, config


@dataclass(frozen=True)
class ProcessRun:
    seconds: float
    peak_rss_mb: float


# ru_maxrss of a child forked from this (large) process starts at our own RSS, so the command is
# forked from a small Python that times it and reports its wait4 figures.
_MEASURE = """import json, os, sys, time
begin = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
json.dump({"seconds": time.perf_counter() - begin, "rss_kb": usage.ru_maxrss,
           "code": os.waitstatus_to_exitcode(status)}, open(sys.argv[1], "w"))
"""


def run_process(command: Sequence[str], log: Path) -> ProcessRun:
    """Wall time from start to exit and the process's own peak RSS; its output goes to `log`."""
    figures = log.with_suffix(".json")
    with open(log, "wb") as output:
        subprocess.run([sys.executable, "-c", _MEASURE, str(figures), *command], stdout=output,
                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=True)
    measured = json.loads(figures.read_text())
    if measured["code"] != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise LatentgenError(f"{Path(command[0]).name} exited with {measured['code']}: {tail[0]} (log: {log})")
    return ProcessRun(measured["seconds"], measured["rss_kb"] / 1024)


def latentgen_command(weights: Path, config: Optional[Path], size: int, steps: int, out: Path, dtype: str) -> list[str]:
    """A txt2img process with the peer's settings: Euler, guidance 7.5, seed 0."""
    return [sys.executable, "-m", "latentgen", "-q", "txt2img", PEER_PROMPT, "--ckpt", str(weights),
            *(["--config", str(config)] if config else []), "--steps", str(steps), "-W", str(size), "-H", str(size),
            "--sampler", "euler", "--scale", str(GUIDANCE_SCALE), "--seed", "0", "--dtype", dtype, "--device", "cpu",
            "--out", str(out), "--overwrite"]


def sdcpp_command(binary: Path, weights: Path, size: int, steps: int, out: Path) -> list[str]:
    """stable-diffusion.cpp's CLI (`sd` / `sd-cli`) on the same file and settings; its weight type
    is the file's (f16)."""
    return [str(binary), "-m", str(weights), "-p", PEER_PROMPT, "--steps", str(steps), "-W", str(size), "-H", str(size),
            "--sampling-method", "euler", "--cfg-scale", str(GUIDANCE_SCALE), "-s", "0", "-o", str(out)]


# What a diffusers user runs on a single-file checkpoint: the pipeline from the file, diffusers'
# own key conversion, float32 (diffusers' CPU default); the configs, Euler's included, come from a
# local folder (`write_diffusers_config`) since nothing may be downloaded.
_DIFFUSERS_TXT2IMG = """import os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from diffusers import StableDiffusionPipeline
weights, config, prompt, size, steps, scale, out = sys.argv[1:]
pipe = StableDiffusionPipeline.from_single_file(weights, config=config, local_files_only=True,
                                                torch_dtype=torch.float32, safety_checker=None)
pipe(prompt, height=int(size), width=int(size), num_inference_steps=int(steps), guidance_scale=float(scale),
     generator=torch.Generator().manual_seed(0)).images[0].save(out)
"""


def write_diffusers_config(arch: Architecture, folder: Path) -> Path:
    """A diffusers pipeline folder of `arch` holding configs only (model_index.json, unet, vae, text
    encoder, tokenizer, scheduler): what `from_single_file(..., config=folder)` reads offline. The
    configs are converted from modules on the meta device, so no weights are built."""
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTokenizer

    from .models.text import CLIP_VIT_L14, CONTEXT_LENGTH, clip_vocabulary

    unet = unet_to_diffusers(on_meta(lambda: UNetModel(**arch.unet)), arch.unet)
    vae = first_stage_to_diffusers(on_meta(lambda: AutoencoderKL(arch.ddconfig, embed_dim=arch.embed_dim)),
                                   arch.params()["first_stage_config"]["params"])
    unet.save_config(folder / "unet")
    vae.save_config(folder / "vae")
    CLIPTextConfig(**{**CLIP_VIT_L14, **(arch.text or {})}).save_pretrained(folder / "text_encoder")
    vocabulary, ranks = clip_vocabulary()
    CLIPTokenizer(vocab=vocabulary, merges=sorted(ranks, key=ranks.get),
                  model_max_length=CONTEXT_LENGTH).save_pretrained(folder / "tokenizer")
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           steps_offset=1).save_config(folder / "scheduler")
    components = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                  "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                  "scheduler": ["diffusers", "EulerDiscreteScheduler"], "safety_checker": [None, None],
                  "feature_extractor": [None, None], "image_encoder": [None, None]}
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", **components,
                                                         "requires_safety_checker": False}))
    return folder


def diffusers_command(weights: Path, config: Path, size: int, steps: int, out: Path) -> list[str]:
    """A diffusers process with the peers' settings (Euler, guidance 7.5, seed 0), float32."""
    return [sys.executable, "-c", _DIFFUSERS_TXT2IMG, str(weights), str(config), PEER_PROMPT, str(size), str(steps),
            str(GUIDANCE_SCALE), str(out)]


def process_rows(arch: Union[str, Architecture, None], size: int, steps: int, repeats: int, dtype: str,
                 sdcpp: Optional[Path] = None, with_diffusers: bool = True,
                 report: Report = lambda text: None) -> list[Row]:
    """Cold processes, each from start to PNG, on one random-weight checkpoint, called in turn
    (median of `repeats`): latentgen in `dtype`, diffusers in float32 (where installed, unless
    `with_diffusers` is off) and the stable-diffusion.cpp binary `sdcpp` (where given); and each
    process's peak RSS."""
    arch = architecture(arch)
    if sdcpp is not None and not sdcpp.is_file():
        raise LatentgenError(f"no stable-diffusion.cpp binary at {sdcpp}")
    if with_diffusers and not has_diffusers():
        report("diffusers is not installed: timing it is skipped")
        with_diffusers = False
    with tempfile.TemporaryDirectory() as temp:
        work = Path(temp)
        report("writing the random-weight checkpoint (official single-file layout, fp16)")
        weights, config = write_checkpoint(arch, work)
        commands = {"latentgen": latentgen_command(weights, config, size, steps, work / "ours.png", dtype)}
        if with_diffusers:
            folder = write_diffusers_config(arch, work / "diffusers")
            commands["diffusers"] = diffusers_command(weights, folder, size, steps, work / "diffusers.png")
        if sdcpp is not None:
            commands["sd.cpp"] = sdcpp_command(sdcpp, weights, size, steps, work / "sdcpp.png")
        runs: dict[str, list[ProcessRun]] = {name: [] for name in commands}
        for repeat in range(repeats):
            for name, command in commands.items():
                report(f"cold {name} process, {steps} steps at {size} px ({repeat + 1}/{repeats})")
                runs[name].append(run_process(command, work / f"{name}.log"))
    seconds = {name: statistics.median(run.seconds for run in done) * 1000 for name, done in runs.items()}
    memory = {name: max(run.peak_rss_mb for run in done) for name, done in runs.items()}
    return [Row(f"{steps}-step {size} px image, cold process (ms)", seconds["latentgen"], seconds.get("diffusers"),
                {"image": size, "steps": steps}, seconds.get("sd.cpp")),
            Row("peak RSS of that process (MB)", memory["latentgen"], memory.get("diffusers"),
                sdcpp_ms=memory.get("sd.cpp"))]


def to_json(rows: list[Row], context: dict) -> str:
    """The results as the JSON text `read_json` reads back."""
    return json.dumps({"context": context, "rows": [{**asdict(row), "ratio": row.ratio, "sdcpp_ratio": row.sdcpp_ratio}
                                                    for row in rows]}, indent=2)


def read_json(path: Path) -> tuple[dict, list[Row]]:
    """(context, rows) of a file holding `to_json`'s text."""
    payload = json.loads(Path(path).read_text())
    fields = ("name", "latentgen_ms", "diffusers_ms", "extra", "sdcpp_ms")
    return payload["context"], [Row(**{k: row[k] for k in fields if k in row}) for row in payload["rows"]]


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """What a published number needs next to it: hardware and versions."""
    try:
        from diffusers import __version__ as diffusers_version
    except ImportError:
        diffusers_version = None
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": str(dtype),
            "torch": torch.__version__, "diffusers": diffusers_version, "threads": torch.get_num_threads()}


def table(rows: list[Row], title: str):
    """The rows as a rich table: both runners side by side, their ratio and how far their outputs differ."""
    from rich.table import Table

    def number(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.1f}"

    def ratio(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.2f}"

    peer = any(row.sdcpp_ms is not None for row in rows)
    columns = ["measurement", "latentgen", "diffusers", "ratio", "rel. diff"] + (["sd.cpp", "ratio sd.cpp"] if peer else [])
    result = Table(*columns, title=title)
    for row in rows:
        rel = row.extra.get("rel_diff")
        cells = [row.name, number(row.latentgen_ms), number(row.diffusers_ms), ratio(row.ratio),
                 "-" if rel is None else f"{rel:.1e}"]
        result.add_row(*cells, *([number(row.sdcpp_ms), ratio(row.sdcpp_ratio)] if peer else []))
    return result
