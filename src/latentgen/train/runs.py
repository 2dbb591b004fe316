"""What both training loops share: resumable checkpoints written atomically, the random state that
makes a resumed run draw exactly what an uninterrupted one would, the rich progress bar, and
the fp16 safetensors + config.json export that `load_model` reads like an official checkpoint."""

import json
import math
import time
from pathlib import Path
from typing import Callable, Optional, Protocol

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from latentgen import distributed
from latentgen.errors import LatentgenError
from latentgen.files import atomic_write
from latentgen.images import grid, save_image

CHECKPOINT = "checkpoint.pt"


def autocast(device: torch.device, cpu_bf16: bool = False, enabled: bool = True):
    """bf16 autocast on CUDA (the GPU runs); on CPU only with `cpu_bf16`, for models measured faster
    that way (a conv stack on an avx512_bf16 CPU: 2-4x, issue 14; a transformer layer: slower)."""
    on = enabled and (device.type == "cuda" or (device.type == "cpu" and cpu_bf16))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def learning_rate(step: int, base: float, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from `base` down to `floor * base` at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_learning_rate(optimizer: torch.optim.Optimizer, step: int, base: float, warmup: int, total: int,
                      floor: float) -> float:
    """Give every parameter group `learning_rate` at `step`, and return it."""
    lr = learning_rate(step, base, warmup, total, floor)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def random_state(generator: torch.Generator) -> dict:
    """The global torch RNG (noise, timesteps, KL samples), CUDA's, and the data generator's."""
    state = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_random_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, state: dict) -> Path:
    """`folder`/checkpoint.pt, replaced atomically: an interrupted save leaves the previous one."""
    path = folder / CHECKPOINT
    atomic_write(path, lambda temp: torch.save(state, temp))
    return path


def load_checkpoint(folder: Path) -> Optional[dict]:
    """The run's checkpoint, or None when it has none yet (tensors, numbers and strings only)."""
    path = folder / CHECKPOINT
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a foreign or truncated file: tell the user which
        raise LatentgenError(f"cannot resume from {path}: {str(error).splitlines()[0]}") from None


def export_folder(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """model.safetensors (fp16) and config.json in `folder`, each written atomically."""
    from safetensors.torch import save_file

    half = {k: (v.half() if v.is_floating_point() else v).contiguous().cpu() for k, v in tensors.items()}
    atomic_write(folder / "model.safetensors", lambda temp: save_file(half, str(temp), metadata={"format": "pt"}))
    atomic_write(folder / "config.json", json.dumps(config, indent=2) + "\n")
    return folder


def update_params(folder: Path, values: dict) -> Path:
    """Set `values` in the model params of `folder`/config.json (either config shape), atomically."""
    file = folder / "config.json"
    config = json.loads(file.read_text())
    params = config["model"]["params"] if "model" in config else config
    params.update(values)
    atomic_write(file, json.dumps(config, indent=2) + "\n")
    return file


def append_log(folder: Path, entry: dict) -> None:
    """One JSON line per checkpoint in `folder`/log.jsonl: the means of the logged values since the last
    one (the model cards' training-log tables; `minutes` counts from this process's start)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "log.jsonl", "a") as log:
        log.write(json.dumps(entry) + "\n")


def load_weights(module: torch.nn.Module, state: dict, mismatch: str) -> None:
    """`module` given `state` (strict), or the one-line error `mismatch` with the first mismatch named."""
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise LatentgenError(f"{mismatch}: {str(error).splitlines()[0]}") from None


def save_grid(images: torch.Tensor, path: Path, columns: int = 4) -> Path:
    """A grid PNG of [B, 3, H, W] images in [-1, 1], replacing the previous one."""
    return save_image(grid(list(images[:, None]), columns), path, overwrite=True)


def progress_bar(quiet: bool = False) -> Progress:
    """Steps done, loss, it/s and time left."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.2f} it/s"),
        TimeRemainingColumn(), disable=quiet,
    )


class Trainer(Protocol):
    """What `train_loop` drives: a model's training state at `step`."""

    step: int

    def train_step(self) -> dict[str, float]: ...

    def state(self) -> dict: ...

    def samples(self) -> torch.Tensor: ...


def train_loop(trainer: Trainer, steps: int, run_dir: Path, checkpoint_every: int, sample_every: int = 0,
               description: str = "train", quiet: bool = False,
               on_step: Optional[Callable[[int, dict], None]] = None, max_minutes: float = 0.0,
               rank: distributed.Rank = distributed.Rank()) -> None:
    """Step to `steps` with a progress bar (loss, it/s); checkpoint every `checkpoint_every` steps and
    at the end, save a sample grid to `run_dir`/samples every `sample_every` steps. With `max_minutes`,
    stop early once that much wall time has passed (checkpointed, so a rerun continues). Under
    torchrun rank 0 alone shows progress and writes; logs are the ranks' means."""
    deadline = time.monotonic() + max_minutes * 60 if max_minutes > 0 else float("inf")
    rate = 0.0
    window: dict[str, list[float]] = {}
    started_at = time.monotonic()
    with progress_bar(quiet or not rank.main) as progress:
        task = progress.add_task(description, total=steps, completed=trainer.step, loss=0.0, rate=0.0)
        while trainer.step < steps:
            started = time.perf_counter()
            logs = distributed.mean_over_ranks(rank, trainer.train_step())
            speed = 1 / (time.perf_counter() - started)
            rate = speed if rate == 0 else 0.9 * rate + 0.1 * speed
            progress.update(task, completed=trainer.step, loss=logs["loss"], rate=rate)
            if on_step is not None:
                on_step(trainer.step, logs)
            out_of_time = distributed.rank0_says(rank, time.monotonic() > deadline)
            for key, value in logs.items() if rank.main else ():
                window.setdefault(key, []).append(float(value))
            if rank.main and (trainer.step % checkpoint_every == 0 or trainer.step == steps or out_of_time):
                save_checkpoint(run_dir, trainer.state())
                append_log(run_dir, {"step": trainer.step, "minutes": round((time.monotonic() - started_at) / 60, 2),
                                     "it_s": round(rate, 3), **{k: sum(v) / len(v) for k, v in window.items()}})
                window = {}
            if rank.main and sample_every and trainer.step % sample_every == 0:
                save_grid(trainer.samples(), run_dir / "samples" / f"step-{trainer.step:06d}.png")
            if out_of_time:
                break
