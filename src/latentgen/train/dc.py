"""Stage 1, residual kind: train a DC-AE (`models/dcae.py`) with the recipe that works on a small CPU.

Why a recipe of its own: the DC-AE is deterministic (no KL / VQ term) and cheap per step, so it is
trained for PSNR: MSE (+ optional SSIM / FFT terms), AdamW with a linear warm-up and cosine decay,
gradient-norm clipping (without clipping and decay a CPU run collapsed from 26.6 to 24.3 dB, issue
14), zero-initialised residual blocks (training starts from the linear shortcut path), fp32 master
weights with bf16 autocast (also on CPU: see `runs.autocast`) and optionally channels_last.
"""

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from latentgen import distributed
from latentgen.devices import pick_device
from latentgen.errors import LatentgenError
from latentgen.models.dcae import AutoencoderDC, zero_init_residuals

from . import losses, runs
from .data import ImageBatches

DC_TARGET = "latentgen.models.dcae.AutoencoderDC"


def dc_params(widths: tuple[int, ...], encoder_layers: tuple[int, ...], decoder_layers: tuple[int, ...],
              latent_channels: int, decoder_act: str = "silu") -> dict:
    """diffusers `AutoencoderDC` config of an all-ResBlock DC-AE (the bundled folders' config.json params)."""
    stages = len(widths)
    return {"in_channels": 3, "latent_channels": latent_channels,
            "encoder_block_types": "ResBlock", "decoder_block_types": "ResBlock",
            "encoder_block_out_channels": list(widths), "decoder_block_out_channels": list(widths),
            "encoder_layers_per_block": list(encoder_layers), "decoder_layers_per_block": list(decoder_layers),
            "encoder_qkv_multiscales": [[]] * stages, "decoder_qkv_multiscales": [[]] * stages,
            "upsample_block_type": "pixel_shuffle", "downsample_block_type": "pixel_unshuffle",
            "decoder_norm_types": "rms_norm", "decoder_act_fns": decoder_act, "encoder_out_shortcut": True,
            "decoder_in_shortcut": True, "decoder_conv_act_fn": "relu", "scaling_factor": 1.0}


@dataclass
class DCTrainer:
    """A DC-AE and its optimiser at `step` (driven by `runs.train_loop`); subclasses train another
    MSE network with the same recipe by overriding `build`, `inputs` and `export` (estimator.py)."""

    config: "object"  # train.autoencoder.AutoencoderConfig (kind "dc")
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data: ImageBatches
    generator: torch.Generator
    device: torch.device
    emoji: Optional[ImageBatches] = None
    rank: distributed.Rank = field(default_factory=distributed.Rank)
    parallel_model: Optional[torch.nn.Module] = None
    step: int = 0

    @classmethod
    def create(cls, config, data: ImageBatches, emoji: Optional[ImageBatches] = None,
               init_from: Optional[torch.nn.Module] = None,
               rank: distributed.Rank = distributed.Rank()) -> "DCTrainer":
        """A fresh trainer; under torchrun (`rank`) the model trains under DistributedDataParallel
        on this rank's slice of each global batch."""
        if config.emoji_fraction > 0 and emoji is None:
            raise LatentgenError("--emoji-fraction needs the prepared emoji (latentgen train prepare-emoji)")
        torch.manual_seed(config.seed)
        device = pick_device(config.device)
        model = cls.build(config)
        if init_from is not None:
            runs.load_weights(model, init_from.state_dict(), "--init-from has another architecture")
        model = model.to(device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        decay = [p for n, p in model.named_parameters() if p.ndim > 1]
        rest = [p for n, p in model.named_parameters() if p.ndim <= 1]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                       {"params": rest, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.99))
        rank.part(config.batch)  # the global batch must split evenly
        return cls(config, model, optimizer, data, torch.Generator().manual_seed(config.seed), device, emoji, rank,
                   distributed.data_parallel(model, rank))

    @staticmethod
    def build(config) -> torch.nn.Module:
        """The untrained model: residual blocks as the identity."""
        if config.decoder_only:
            raise LatentgenError("--decoder-only is for kl/vq autoencoders; a dc run trains the whole model")
        model = AutoencoderDC(**config.dc_params())
        zero_init_residuals(model)
        return model

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What the model gets for target `x`: `x` itself (an autoencoder)."""
        return x

    def loss_weight(self, inputs: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-pixel weight of the MSE for these model inputs ([B, 1, H, W]); None: every pixel alike."""
        return None

    def state(self) -> dict:
        return {"config": asdict(self.config), "model": self.model.state_dict(), "opt": self.optimizer.state_dict(),
                "step": self.step, "random": runs.random_state(self.generator)}

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["opt"])
        self.step = int(state["step"])
        runs.restore_random_state(state["random"], self.generator)

    def batch(self) -> torch.Tensor:
        """This rank's slice of the global batch: photo crops, the last `emoji_fraction` of it emoji crops."""
        count = round(self.config.batch * self.config.emoji_fraction)
        parts = [self.data.sample(self.config.batch - count, self.generator)[0]]
        if count:
            parts.append(self.emoji.sample(count, self.generator)[0])
        x = torch.cat(parts)[self.rank.part(self.config.batch)].to(self.device)
        # The crops arrive NHWC-strided, which makes oneDNN pick channels-last kernels; contiguous NCHW
        # is the layout measured fast here (0.3-0.4 s per f4 step at batch 8 x 64 px on the AVX2 CPU).
        return x.contiguous(memory_format=torch.channels_last if self.config.channels_last else torch.contiguous_format)

    def reconstruct(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        model = self.parallel_model if train else self.model
        with runs.autocast(self.device, cpu_bf16=self.config.precision == "bf16",
                           enabled=self.config.precision != "fp32"):
            return model(x).float()

    def loss(self, x: torch.Tensor, xrec: torch.Tensor,
             weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, float]]:
        """MSE (over the pixels `weight` selects) + ssim_weight * (1 - SSIM) + fft_weight * FFT-magnitude L1."""
        error = (x - xrec).square()
        mse = error.mean() if weight is None else (error * weight).sum() / (weight.sum() * x.shape[1]).clamp_min(1)
        total, parts = mse, {"mse": mse.item(), "psnr": 10 * math.log10(4 / max(mse.item(), 1e-10))}
        if self.config.ssim_weight:
            structural = 1 - losses.ssim_map(x, xrec).mean()
            total = total + self.config.ssim_weight * structural
            parts["ssim"] = 1 - structural.item()
        if self.config.fft_weight:
            frequency = losses.fft_loss(x, xrec)
            total = total + self.config.fft_weight * frequency
            parts["fft"] = frequency.item()
        return total, parts

    def train_step(self) -> dict[str, float]:
        config = self.config
        lr = runs.set_learning_rate(self.optimizer, self.step, config.lr, config.warmup, config.steps, config.min_lr)
        x = self.batch()
        inputs = self.inputs(x)
        loss, parts = self.loss(x, self.reconstruct(inputs, train=True), self.loss_weight(inputs))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip or float("inf"))
        self.optimizer.step()
        self.step += 1
        return {"loss": loss.item(), "lr": lr, "grad_norm": float(norm), **parts}

    def samples(self) -> torch.Tensor:
        """Fixed photos above the model's outputs."""
        x = self.data.sample(4, torch.Generator().manual_seed(12345))[0].to(self.device)
        with torch.no_grad():
            xrec = self.reconstruct(self.inputs(x)).clamp(-1, 1)
        return torch.cat([x, xrec]).cpu()

    def export(self, folder: Path) -> Path:
        """model.safetensors (fp16, diffusers AutoencoderDC keys) + config.json ({model: {target, params}})."""
        config = {"model": {"target": DC_TARGET, "params": self.config.dc_params()},
                  "training": {"steps": self.step, "recipe": asdict(self.config)}}
        state = {k: v.contiguous() for k, v in self.model.state_dict().items()}
        return runs.export_folder(folder, state, config)
