"""Stage 1: train a KL- or VQ-regularised autoencoder (any f) on photo crops, then export it as a
standalone first-stage checkpoint (`encoder.*`, `decoder.*`, `quant_conv.*` ... + config.json).
Kind "dc" (a residual DC-AE in diffusers' AutoencoderDC layout) has its own recipe in `dc.py`.

Each step updates the autoencoder on L1 + SSIM + FFT + (KL or VQ) + the adaptively weighted
PatchGAN loss once `disc_start` is reached, then the discriminator on the hinge loss.

`decoder_only` fine-tunes the decoder of a trained autoencoder with its encoder frozen, as
Stability did for SD's ft-MSE VAE: the latent space stays the same, so every diffusion model
trained on it keeps working, and only how latents are rendered improves. Emoji crops can join the
photos (`emoji_fraction`), so a decoder serving an emoji model learns their saturated colours.
"""

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from latentgen import distributed
from latentgen.detect import KL_TARGET, VQ_TARGET
from latentgen.devices import pick_device
from latentgen.errors import LatentgenError
from latentgen.models.autoencoder import AutoencoderKL, VQModel

from . import losses, runs
from .data import EmojiSet, ImageBatches, emoji_at, to_uint8

# CompVis' exported class name for the VQ first stage (VQModelInterface is the LDM wrapper).
VQ_EXPORT_TARGET = VQ_TARGET.replace("VQModelInterface", "VQModel")


@dataclass
class AutoencoderConfig:
    """Architecture (CompVis ddconfig names) and recipe. f = 2 ** (len(ch_mult) - 1)."""

    kind: str = "kl"
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 1
    z_channels: int = 4
    n_embed: int = 8192
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 256
    crop: int = 128
    batch: int = 8
    lr: float = 4e-4
    steps: int = 20000
    kl_weight: float = 1e-6
    ssim_weight: float = 0.2
    fft_weight: float = 0.1
    disc_start: int = 10000
    disc_weight: float = 0.5
    disc_ndf: int = 32
    disc_layers: int = 3
    decoder_only: bool = False
    emoji_fraction: float = 0.0
    seed: int = 0
    checkpoint_every: int = 500
    sample_every: int = 0
    max_minutes: float = 0.0
    device: str = "auto"
    # kind "dc" only (see dc.py): stage widths and ResBlocks per stage, f = 2 ** (len(widths) - 1)
    widths: tuple[int, ...] = (32, 32, 128)
    encoder_layers: tuple[int, ...] = (0, 1, 3)
    decoder_layers: tuple[int, ...] = (0, 1, 3)
    decoder_act: str = "silu"
    warmup: int = 200
    min_lr: float = 0.02
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    precision: str = "bf16"
    channels_last: bool = False

    def ddconfig(self) -> dict:
        return {"double_z": self.kind == "kl", "z_channels": self.z_channels, "resolution": self.resolution,
                "in_channels": 3, "out_ch": 3, "ch": self.ch, "ch_mult": list(self.ch_mult),
                "num_res_blocks": self.num_res_blocks, "attn_resolutions": list(self.attn_resolutions),
                "dropout": 0.0}

    def dc_params(self) -> dict:
        from .dc import dc_params

        return dc_params(self.widths, self.encoder_layers, self.decoder_layers, self.z_channels, self.decoder_act)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.widths if self.kind == "dc" else self.ch_mult) - 1)

    def first_stage_config(self) -> dict:
        """The official YAML's `first_stage_config` (also the standalone model's `model`)."""
        params = {"embed_dim": self.z_channels, "ddconfig": self.ddconfig()}
        if self.kind == "vq":
            return {"target": VQ_EXPORT_TARGET, "params": {**params, "n_embed": self.n_embed}}
        return {"target": KL_TARGET, "params": params}


def build_autoencoder(config: AutoencoderConfig) -> torch.nn.Module:
    if config.kind == "kl":
        return AutoencoderKL(config.ddconfig(), config.z_channels)
    if config.kind == "vq":
        return VQModel(config.ddconfig(), config.n_embed, config.z_channels)
    if config.kind == "dc":
        from latentgen.models.dcae import AutoencoderDC

        return AutoencoderDC(**config.dc_params())
    raise LatentgenError(f"unknown autoencoder kind {config.kind!r}: choose kl, vq or dc")


@dataclass
class Trainer:
    """An autoencoder, its discriminator and their optimisers at `step`."""

    config: AutoencoderConfig
    model: torch.nn.Module
    discriminator: losses.NLayerDiscriminator
    opt_ae: torch.optim.Optimizer
    opt_disc: torch.optim.Optimizer
    data: ImageBatches
    generator: torch.Generator
    device: torch.device
    emoji: Optional[ImageBatches] = None
    step: int = 0

    @classmethod
    def create(cls, config: AutoencoderConfig, data: ImageBatches, emoji: Optional[ImageBatches] = None,
               init_from: Optional[torch.nn.Module] = None) -> "Trainer":
        """A fresh trainer, starting from `init_from`'s weights when given (same architecture)."""
        if config.emoji_fraction > 0 and emoji is None:
            raise LatentgenError("--emoji-fraction needs the prepared emoji (latentgen train prepare-emoji)")
        if config.decoder_only and init_from is None:
            raise LatentgenError("--decoder-only fine-tunes a trained autoencoder: give it with --init-from")
        torch.manual_seed(config.seed)
        device = pick_device(config.device)
        model = build_autoencoder(config).to(device)
        if init_from is not None:
            runs.load_weights(model, init_from.state_dict(), "--init-from has another architecture")
        trained = model.parameters()
        if config.decoder_only:
            model.requires_grad_(False)
            trained = [*model.decoder.parameters(), *model.post_quant_conv.parameters()]
            for parameter in trained:
                parameter.requires_grad_(True)
        discriminator = losses.NLayerDiscriminator(3, config.disc_ndf, config.disc_layers).to(device)
        betas = (0.5, 0.9)  # taming's choice for both optimisers
        return cls(config, model, discriminator, torch.optim.Adam(trained, config.lr, betas=betas),
                   torch.optim.Adam(discriminator.parameters(), config.lr, betas=betas), data,
                   torch.Generator().manual_seed(config.seed), device, emoji)

    def state(self) -> dict:
        return {"config": asdict(self.config), "model": self.model.state_dict(),
                "discriminator": self.discriminator.state_dict(), "opt_ae": self.opt_ae.state_dict(),
                "opt_disc": self.opt_disc.state_dict(), "step": self.step,
                "random": runs.random_state(self.generator)}

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt_ae.load_state_dict(state["opt_ae"])
        self.opt_disc.load_state_dict(state["opt_disc"])
        self.step = int(state["step"])
        runs.restore_random_state(state["random"], self.generator)

    def init_codebook(self) -> None:
        """Set the VQ codebook to randomly chosen encoder outputs of the first photos. taming's
        uniform(-1/n, 1/n) start puts every code at the origin, where most never win a nearest-
        neighbour search and stay dead; codes drawn from the data all start in use."""
        codebook = self.model.quantize.embedding.weight
        vectors = []
        with torch.no_grad():
            while sum(len(v) for v in vectors) < len(codebook):
                x = self.data.sample(self.config.batch, self.generator)[0].to(self.device)
                vectors.append(self.model.encode(x).permute(0, 2, 3, 1).reshape(-1, codebook.shape[1]))
            vectors = torch.cat(vectors)
            codebook.copy_(vectors[torch.randperm(len(vectors), generator=self.generator)[:len(codebook)]])

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, weighted regulariser): a posterior sample for KL, the quantised latent for VQ."""
        if self.config.kind == "kl":
            mean, logvar = self.model.encode_moments(x)
            z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
            return self.model.decode(z), self.config.kl_weight * losses.kl_loss(mean, logvar)
        quant, qloss, _ = self.model.quantize(self.model.encode(x))
        return self.model.decode(quant, force_not_quantize=True), qloss

    def batch(self) -> torch.Tensor:
        """Photo crops, the last `emoji_fraction` of the batch replaced by emoji crops."""
        count = round(self.config.batch * self.config.emoji_fraction)
        parts = [self.data.sample(self.config.batch - count, self.generator)[0]]
        if count:
            parts.append(self.emoji.sample(count, self.generator)[0])
        return torch.cat(parts).to(self.device)

    def train_step(self) -> dict[str, float]:
        config = self.config
        x = self.batch()
        gan_on = losses.gan_factor(self.step, config.disc_start)
        with runs.autocast(self.device):
            xrec, regulariser = self.reconstruct(x)
        xrec = xrec.float()
        rec, parts = losses.reconstruction_loss(x, xrec, config.ssim_weight, config.fft_weight)
        loss = rec + regulariser
        if gan_on:
            g_loss = losses.generator_loss(self.discriminator(xrec))
            d_weight = losses.adaptive_weight(rec, g_loss, self.model.get_last_layer(), config.disc_weight)
            loss = loss + d_weight * g_loss
            parts.update(g_loss=g_loss.item(), d_weight=d_weight.item())
        self.opt_ae.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_ae.step()
        if gan_on:
            d_loss = losses.hinge_d_loss(self.discriminator(x), self.discriminator(xrec.detach()))
            self.opt_disc.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_disc.step()
            parts["d_loss"] = d_loss.item()
        self.step += 1
        return {"loss": loss.item(), "regulariser": regulariser.item(), **parts}

    def samples(self) -> torch.Tensor:
        """Fixed photos above their reconstructions."""
        x = self.data.sample(4, torch.Generator().manual_seed(12345))[0].to(self.device)
        rng = torch.get_rng_state()
        with torch.no_grad():
            xrec = self.reconstruct(x)[0].float().clamp(-1, 1)
        torch.set_rng_state(rng)
        return torch.cat([x, xrec]).cpu()

    def export(self, folder: Path) -> Path:
        """Standalone first-stage checkpoint: the model's own keys, fp16, and an official-shaped config."""
        config = {"model": self.config.first_stage_config(),
                  "training": {"steps": self.step, "recipe": asdict(self.config)}}
        return runs.export_folder(folder, self.model.state_dict(), config)


def load_photos(path: Path, crop: int) -> ImageBatches:
    if not path.is_file():
        raise LatentgenError(f"{path} does not exist: run `latentgen train prepare-photos` first")
    images = np.load(path, mmap_mode="r")
    if images.shape[1] < crop:
        raise LatentgenError(f"--crop {crop} is larger than the prepared {images.shape[1]} px photos")
    return ImageBatches(np.asarray(images), crop=crop)


def load_emoji_crops(folder: Path, size: int, crop: int) -> ImageBatches:
    """The prepared emoji resized to `size` px (as the txt2img model sees them), in random `crop` px windows."""
    images = EmojiSet.load(folder, use_contexts=False).images
    return ImageBatches(to_uint8(emoji_at(images, size)), crop=crop)


def train_autoencoder(config: AutoencoderConfig, data: ImageBatches, run_dir: Path, resume: bool = True,
                      quiet: bool = False, on_step: Optional[Callable[[int, dict], None]] = None,
                      export_dir: Optional[Path] = None, emoji: Optional[ImageBatches] = None,
                      init_from: Optional[torch.nn.Module] = None,
                      rank: distributed.Rank = distributed.Rank()) -> Trainer:
    """Train to `config.steps` (continuing `run_dir`'s checkpoint when `resume`, else starting from
    `init_from` when given), checkpoint every `checkpoint_every` steps and at the end, then export
    to `export_dir` (default `run_dir`/export). Under torchrun (`rank`) a dc autoencoder trains
    data-parallel, rank 0 writing."""
    if config.kind == "dc":
        from .dc import DCTrainer

        trainer = DCTrainer.create(config, data, emoji, init_from, rank)
    elif rank.world > 1:
        raise LatentgenError("data-parallel autoencoder training is for --kind dc; the kl/vq trainers (PatchGAN, "
                             "adaptive weight) run as one process")
    else:
        trainer = Trainer.create(config, data, emoji, init_from)
    state = runs.load_checkpoint(run_dir) if resume else None
    if state is not None:
        trainer.load(state)
    elif config.kind == "vq" and init_from is None:
        trainer.init_codebook()
    trainer.model.train()
    runs.train_loop(trainer, config.steps, run_dir, config.checkpoint_every, config.sample_every,
                    f"{config.kind}-f{config.factor}", quiet, on_step, config.max_minutes, rank)
    if rank.main:
        trainer.export(export_dir or run_dir / "export")
    return trainer
