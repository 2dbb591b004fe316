"""Train a regression estimator (`models/estimator.py`) an LDM-SR or inpainting model refines, and attach it.

The recipe is the DC-AE's (`dc.py`: MSE, AdamW, warm-up + cosine decay, gradient clipping, residual
branches starting at zero). The upscaler gets clean bicubic x`factor` downsamples of the photo
crops, the protocol of the SR benchmarks (Set14, BSD68); the inpainter gets the crops with a
LaMa-style mask zeroed (the masks the inpainting LDM trains and is evaluated with) and its loss is
the MSE inside the hole. `attach` stores the trained network inside a model folder of the matching
kind (tensors under `estimator.*`, its config as `estimator_config`), so that model's `upscale` or
`inpaint` starts from its estimate.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from latentgen import distributed
from latentgen.detect import ESTIMATOR_PREFIX, target_name
from latentgen.errors import LatentgenError
from latentgen.files import atomic_write
from latentgen.models.estimator import (INPAINTER_TARGET, UPSCALER_TARGET, ResidualInpainter, ResidualUpscaler,
                                        zero_init_residuals)

from . import runs
from .data import ImageBatches, downsample, random_masks
from .dc import DCTrainer

TASKS = ("sr", "inpaint")


@dataclass
class EstimatorConfig:
    """Architecture and recipe (the fields DCTrainer reads, with the same meaning). `task` "sr":
    a ResidualUpscaler of `blocks` ResBlocks `channels` wide; "inpaint": a ResidualInpainter."""

    task: str = "sr"
    factor: int = 4
    channels: int = 32
    blocks: int = 6
    crop: int = 128
    batch: int = 16
    lr: float = 1e-3
    steps: int = 20000
    warmup: int = 200
    min_lr: float = 0.02
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    precision: str = "fp32"
    channels_last: bool = False
    emoji_fraction: float = 0.0
    ssim_weight: float = 0.0
    fft_weight: float = 0.0
    seed: int = 0
    checkpoint_every: int = 500
    sample_every: int = 0
    max_minutes: float = 0.0
    device: str = "auto"

    def model_config(self) -> dict:
        if self.task == "inpaint":
            return {"target": INPAINTER_TARGET, "params": {"channels": self.channels, "blocks": self.blocks}}
        return {"target": UPSCALER_TARGET,
                "params": {"factor": self.factor, "channels": self.channels, "blocks": self.blocks}}


class EstimatorTrainer(DCTrainer):
    """DCTrainer with an estimator as the model: downsampled crops, or masked crops, as its inputs."""

    @staticmethod
    def build(config: EstimatorConfig) -> torch.nn.Module:
        kind = ResidualInpainter if config.task == "inpaint" else ResidualUpscaler
        model = kind(**config.model_config()["params"])
        zero_init_residuals(model)
        return model

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """SR: the bicubic downsample. Inpainting: [x with the hole zeroed, mask], one mask per image
        of the global batch drawn on every rank alike (so ranks agree with a single process)."""
        if self.config.task == "sr":
            return downsample(x, self.config.factor)
        hole = random_masks(self.config.batch, *x.shape[-2:], self.generator)[self.rank.part(self.config.batch)]
        hole = hole.to(x)
        return torch.cat([x * (1 - hole), hole], 1)

    def loss_weight(self, inputs: torch.Tensor) -> Optional[torch.Tensor]:
        """Inpainting is scored inside the hole only (the rest is copied exactly)."""
        return inputs[:, 3:] if self.config.task == "inpaint" else None

    def export(self, folder: Path) -> Path:
        """model.safetensors (fp16) + config.json ({model: {target, params}, training})."""
        config = {"model": self.config.model_config(), "training": {"steps": self.step, "recipe": asdict(self.config)}}
        return runs.export_folder(folder, self.model.state_dict(), config)


def train_estimator(config: EstimatorConfig, data: ImageBatches, run_dir: Path, resume: bool = True,
                    quiet: bool = False, on_step: Optional[Callable[[int, dict], None]] = None,
                    rank: distributed.Rank = distributed.Rank()) -> EstimatorTrainer:
    """Train to `config.steps` (continuing `run_dir`'s checkpoint when `resume`), then export to `run_dir`/export."""
    if config.task not in TASKS:
        raise LatentgenError(f"unknown estimator task {config.task!r}; known: {', '.join(TASKS)}")
    multiple = config.factor if config.task == "sr" else 8
    if config.crop % multiple:
        raise LatentgenError(f"--crop {config.crop} must be a multiple of {multiple}")
    trainer = EstimatorTrainer.create(config, data, rank=rank)
    state = runs.load_checkpoint(run_dir) if resume else None
    if state is not None:
        trainer.load(state)
    trainer.model.train()
    runs.train_loop(trainer, config.steps, run_dir, config.checkpoint_every, config.sample_every,
                    f"x{config.factor} estimator" if config.task == "sr" else "inpainting estimator", quiet, on_step, config.max_minutes, rank)
    if rank.main:
        trainer.export(run_dir / "export")
    return trainer


def attach(model_folder: Path, estimator_folder: Path) -> None:
    """Store the estimator exported to `estimator_folder` in `model_folder` (replacing one stored
    before), an LDM-SR model of its factor for an upscaler, an inpainting LDM for an inpainter: its
    tensors under `estimator.*` in model.safetensors, its config as `estimator_config` in
    config.json's model params."""
    from safetensors.torch import load_file, save_file

    from latentgen.loader import read_spec

    spec = read_spec(model_folder)[0]
    estimator = json.loads((estimator_folder / "config.json").read_text())["model"]
    kind = target_name(estimator)
    if kind == "ResidualInpainter" and spec.estimator_kind != kind:
        raise LatentgenError(f"{model_folder} is not an inpainting model folder")
    if kind == "ResidualUpscaler" and (spec.estimator_kind != kind or spec.factor != estimator["params"]["factor"]):
        raise LatentgenError(f"{model_folder} is not an x{estimator['params']['factor']} LDM-SR model folder")
    weights = model_folder / "model.safetensors"
    tensors = {k: v for k, v in load_file(weights).items() if not k.startswith(ESTIMATOR_PREFIX)}
    tensors.update({ESTIMATOR_PREFIX + k: v for k, v in load_file(estimator_folder / "model.safetensors").items()})
    atomic_write(weights, lambda temp: save_file(tensors, str(temp), metadata={"format": "pt"}))
    runs.update_params(model_folder, {"estimator_config": estimator})
