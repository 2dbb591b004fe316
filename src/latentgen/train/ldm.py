"""Stage 2: train a diffusion UNet in the latent space of a frozen first stage (L_LDM, eps-prediction),
and export it in the official CompVis layout (`model.diffusion_model.*` from the EMA weights,
`first_stage_model.*`) with a config.json shaped like the official YAML's `model.params`.

Tasks and their conditioning, matching what `tasks` feeds the UNet at inference:
- txt2img: cross-attention on a frozen text encoder's context (MiniLM, [B, 77, 384]);
- inpaint: concat of [masked-image latent (scaled), mask at latent size] (LDM: 2C + 1 channels);
- sr: concat of the degraded low-resolution image at latent size (LDM-SR; factor = the first stage's f);
- uncond: nothing.
Condition dropout for classifier-free guidance: text is replaced by the empty prompt's context with
probability `cond_drop` (SD's `ucg_training`; the pipeline's unconditional branch is "" too). The
concat tasks keep their condition, as the LDM paper's inpainting and SR models: their pipelines
never guide (scale 1), so a dropped image would only be wasted capacity.
"""

import copy
import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from latentgen import distributed
from latentgen.detect import FIRST_STAGE, UNCONDITIONAL, UNET_TARGET
from latentgen.devices import pick_device
from latentgen.errors import LatentgenError
from latentgen.files import atomic_write
from latentgen.guidance import Conditioning, guided_model
from latentgen.ldm import MASKED_IMAGE_THEN_MASK, LatentDiffusion, ModelSpec
from latentgen.models.autoencoder import AutoencoderKL
from latentgen.models.unet import UNetModel
from latentgen.previews import fit_projection
from latentgen.samplers import make_noise, sample
from latentgen.tasks import inpainting_concat
from latentgen.schedules import make_alphas_cumprod

from . import losses, runs
from .data import EmojiSet, ImageBatches, degrade, emoji_at, emoji_mosaic, random_masks, random_views

TASKS = ("txt2img", "inpaint", "sr", "uncond")
CONDITIONING_KEYS = {"txt2img": "crossattn", "inpaint": "concat", "sr": "concat", "uncond": None}
COND_STAGE_CONFIGS = {"inpaint": FIRST_STAGE, "sr": {"target": "torch.nn.Identity"}, "uncond": UNCONDITIONAL}
LDM_TARGET = "ldm.models.diffusion.ddpm.LatentDiffusion"
INPAINT_LAYOUT = MASKED_IMAGE_THEN_MASK  # what the loader reads off a "concat" model with latent + 1 extra channels
SAMPLE_PROMPTS = ("a red heart", "a blue heart", "a green apple", "a yellow star",
                  "a smiling face, twemoji style", "a cat face, noto emoji style", "a red car", "a pizza")
Encoder = Callable[[list[str]], torch.Tensor]
BLOCK = re.compile(r"(.*\.transformer_blocks\.\d+)\.")  # a transformer block's name in a UNet state dict


@dataclass
class LDMConfig:
    """UNet architecture (CompVis unet_config names), schedule and recipe. The learning rate warms
    up over `warmup` steps, then follows a cosine to `min_lr` x `lr` at `steps` (1.0: constant);
    `mirror` shows mirrorable emoji flipped left to right half of the time; `augment` adds that many
    views of every emoji (`random_views`: scaled, turned, shifted, mirrored as `mirror` allows),
    encoded once and drawn for half of the batch, so the drawings themselves stay half of it."""

    task: str = "txt2img"
    image_size: int = 128
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (2,)
    num_head_channels: int = 32
    transformer_depth: int = 1
    context_dim: int = 384
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000
    zero_terminal_snr: bool = False
    parameterization: str = "eps"
    min_snr_gamma: float = 0.0
    min_snr_plus_one: bool = False
    precision: str = "fp32"
    batch: int = 16
    lr: float = 2e-4
    steps: int = 20000
    warmup: int = 0
    min_lr: float = 1.0
    channels_last: bool = False
    mirror: bool = False
    augment: int = 0
    category_power: float = 1.0
    ema_decay: float = 0.9999
    ema_half_life: int = 0
    cond_drop: float = 0.1
    emoji_fraction: float = 0.25
    seed: int = 0
    checkpoint_every: int = 500
    sample_every: int = 0
    sample_steps: int = 25
    max_minutes: float = 0.0
    device: str = "auto"

    def unet_config(self, embed_dim: int, f: int) -> dict:
        extra = {"txt2img": 0, "uncond": 0, "inpaint": embed_dim + 1, "sr": 3}[self.task]
        params = {"image_size": self.image_size // f, "in_channels": embed_dim + extra, "out_channels": embed_dim,
                  "model_channels": self.model_channels, "attention_resolutions": list(self.attention_resolutions),
                  "num_res_blocks": self.num_res_blocks, "channel_mult": list(self.channel_mult),
                  "num_head_channels": self.num_head_channels}
        if self.task == "txt2img":
            params.update(use_spatial_transformer=True, transformer_depth=self.transformer_depth,
                          context_dim=self.context_dim)
        return {"target": UNET_TARGET, "params": params}


@dataclass
class LDMData:
    """What a task draws from: photo crops (inpaint, sr, uncond), emoji (txt2img; mosaics for sr)."""

    photos: Optional[ImageBatches] = None
    emoji: Optional[EmojiSet] = None


def latent_space_key(first_stage: torch.nn.Module) -> str:
    """A hash of what defines the latent space, the encoder and quant_conv: the same after a
    decoder-only fine-tune, so cached latents and `--init-from` models stay valid."""
    digest = hashlib.sha256()
    for name, tensor in first_stage.state_dict().items():
        if name.startswith(("encoder.", "quant_conv.")):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


def grow_transformer_depth(unet: UNetModel, state: dict[str, torch.Tensor]) -> None:
    """Fill `state`, a shallower model's UNet weights, with `unet`'s transformer blocks that it lacks,
    their attention and feed-forward output projections zeroed: each new pre-norm residual block is
    then the identity, so the grown model starts as the trained one and learns what depth adds."""
    blocks = {match.group(1) for key in state if (match := BLOCK.match(key))}
    for name, module in unet.named_modules():
        stack = name.rpartition(".")[0]
        if not stack.endswith(".transformer_blocks") or name in blocks or f"{stack}.0" not in blocks:
            continue
        block_state = _zeroed_outputs(module, ("attn1.to_out.0.", "attn2.to_out.0.", "ff.net.2."))
        state.update({f"{name}.{key}": value for key, value in block_state.items()})


def _zeroed_outputs(module: torch.nn.Module, outputs: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """A copy of `module`'s state with the layers named by `outputs` (key prefixes) zeroed: the output
    projections that make a new residual block start as the identity."""
    return {key: value.clone().zero_() if key.startswith(outputs) else value.clone()
            for key, value in module.state_dict().items()}


def _identity_block(block: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state of a new UNet block [ResBlock, attention?] that returns its input `h` unchanged: the
    ResBlock's last convolution and the attention's output projection zeroed, and an output block's
    1 x 1 skip convolution, fed cat([h, skip]), passing `h` through and dropping `skip`."""
    state = _zeroed_outputs(block, ("0.out_layers.3.", "1.proj_out."))
    if "0.skip_connection.weight" in state:
        weight = state["0.skip_connection.weight"]
        weight.zero_()[:, :weight.shape[0], 0, 0] = torch.eye(weight.shape[0])
        state["0.skip_connection.bias"].zero_()
    return state


def grow_res_blocks(unet: UNetModel, state: dict[str, torch.Tensor], levels: int) -> None:
    """Rewrite `state`, the UNet weights of a model with fewer ResBlocks per level, for `unet`: its
    blocks renumbered, and identity blocks added where `unet` has more. A new input block repeats its
    level's last skip; the new output blocks of a level follow its first one and drop those repeats,
    so every trained block sees what it saw before and the grown model starts as the trained one."""
    indices = {int(match.group(1)) for key in state if (match := re.match(r"input_blocks\.(\d+)\.", key))}
    old, new = len(indices) // levels - 1, len(unet.input_blocks) // levels - 1
    if not 0 < old < new:
        return
    names = {"input_blocks.0": "input_blocks.0"}
    for level in range(levels):
        for block in range(old + (level < levels - 1)):
            target = block if block < old else new
            names[f"input_blocks.{1 + level * (old + 1) + block}"] = f"input_blocks.{1 + level * (new + 1) + target}"
        for block in range(old + 1):
            target = block if block == 0 else block + new - old
            names[f"output_blocks.{level * (old + 1) + block}"] = f"output_blocks.{level * (new + 1) + target}"
    grown = {}
    for key, value in state.items():
        block = ".".join(key.split(".")[:2])
        grown[names.get(block, block) + key[len(block):]] = value
    kept = set(names.values())
    for stack in ("input_blocks", "output_blocks"):
        for index, block in enumerate(getattr(unet, stack)):
            if f"{stack}.{index}" not in kept:
                grown.update({f"{stack}.{index}.{key}": value for key, value in _identity_block(block).items()})
    state.clear()
    state.update(grown)


def encode(first_stage: torch.nn.Module, x: torch.Tensor, sample_posterior: bool) -> torch.Tensor:
    """Unscaled latents: a KL posterior sample (CompVis trains on samples) or its mean; VQ's pre-quantisation h."""
    if not isinstance(first_stage, AutoencoderKL):
        return first_stage.encode(x)
    mean, logvar = first_stage.encode_moments(x)
    return mean + (0.5 * logvar).exp() * torch.randn_like(mean) if sample_posterior else mean


@dataclass
class LDMTrainer:
    """UNet, its EMA copy, optimiser and the frozen first stage at `step`."""

    config: LDMConfig
    unet: UNetModel
    ema: UNetModel
    optimizer: torch.optim.Optimizer
    first_stage: torch.nn.Module
    first_stage_spec: ModelSpec
    first_stage_config: dict
    data: LDMData
    generator: torch.Generator
    device: torch.device
    alphas_cumprod: torch.Tensor
    text_encoder: Optional[Encoder] = None
    scale_factor: float = 1.0
    emoji_latents: Optional[torch.Tensor] = None
    empty_context: Optional[torch.Tensor] = None
    first_stage_name: Optional[str] = None
    rank: distributed.Rank = field(default_factory=distributed.Rank)
    parallel_unet: Optional[torch.nn.Module] = None
    step: int = 0

    @classmethod
    def create(cls, config: LDMConfig, first_stage: LatentDiffusion, data: LDMData,
               text_encoder: Optional[Encoder] = None, cache_dir: Optional[Path] = None,
               first_stage_name: Optional[str] = None, rank: distributed.Rank = distributed.Rank()) -> "LDMTrainer":
        """A fresh trainer; the emoji latents are computed once and kept in `cache_dir` (keyed by the
        first stage's hash, the emoji images' and the image size) so that resumed runs skip the
        encoding and a run folder reused with other emoji encodes them anew. With
        `first_stage_name` (a bundled autoencoder's) the export names it instead of storing a copy.
        Under torchrun (`rank`) the UNet trains under DistributedDataParallel on this rank's slice."""
        if config.task not in TASKS:
            raise LatentgenError(f"unknown task {config.task!r}: choose one of {', '.join(TASKS)}")
        if config.parameterization not in ("eps", "v"):
            raise LatentgenError(f"parameterization must be eps or v, got {config.parameterization!r}")
        if config.zero_terminal_snr and config.parameterization != "v":
            raise LatentgenError("a zero-terminal-SNR schedule needs v-prediction (eps is undefined at pure noise)")
        if config.min_snr_plus_one and config.parameterization != "v":
            raise LatentgenError("Min-SNR over SNR + 1 needs v-prediction (its eps weight is infinite at pure noise)")
        torch.manual_seed(config.seed)
        device = pick_device(config.device)
        stage = first_stage.first_stage.to(device).eval().requires_grad_(False)
        f = first_stage.spec.factor
        if config.image_size % (f * 2 ** (len(config.channel_mult) - 1)):
            raise LatentgenError(f"image size {config.image_size} must divide by f x 2^(levels - 1)")
        unet = UNetModel(**config.unet_config(first_stage.spec.latent_channels, f)["params"]).to(device)
        if config.channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        trainer = cls(config, unet, copy.deepcopy(unet).requires_grad_(False), torch.optim.AdamW(unet.parameters(), config.lr),
                      stage, first_stage.spec, first_stage.params["first_stage_config"], data, torch.Generator().manual_seed(config.seed),
                      device, make_alphas_cumprod("linear", config.timesteps, config.linear_start, config.linear_end,
                                                  zero_terminal_snr=config.zero_terminal_snr),
                      text_encoder, first_stage_name=first_stage_name, rank=rank)
        trainer.rank.part(config.batch)  # the global batch must split evenly
        trainer.parallel_unet = distributed.data_parallel(unet, rank)
        trainer._check_data()
        if config.task == "txt2img":
            key = f"{latent_space_key(stage)}-{data.emoji.fingerprint()}-{config.image_size}"
            key += "-mirrored" if config.mirror else ""
            key += f"-views{config.augment}-{config.seed}" if config.augment else ""
            cache = cache_dir / f"emoji-latents-{key}.pt" if cache_dir else None
            trainer.emoji_latents = trainer._encode_emoji(cache)
            trainer.empty_context = trainer._empty_context()
        trainer.scale_factor = trainer._measure_scale_factor()
        return trainer

    # ---- data --------------------------------------------------------------------------------

    def _check_data(self) -> None:
        task, data = self.config.task, self.data
        if task == "txt2img" and data.emoji is None:
            raise LatentgenError("txt2img training needs the prepared emoji (--data with emoji.npz)")
        if task != "txt2img" and data.photos is None:
            raise LatentgenError(f"{task} training needs the prepared photos (--data with photos-<size>.npy)")
        if data.photos is not None:
            data.photos.crop = self.config.image_size

    def _encode_emoji(self, cache: Optional[Path]) -> torch.Tensor:
        """Latent statistics of every emoji: KL (mean, logvar) stacked on channels, or VQ's h; with
        `mirror`, those of every emoji flipped left to right follow (row N + i is image i mirrored),
        then the `augment` random views, N rows each."""
        if cache is not None and cache.is_file():
            return torch.load(cache, weights_only=True)
        emoji, config = self.data.emoji, self.config
        blocks = [self._encode_images(emoji.images)]
        if config.mirror:
            blocks.append(self._encode_images(emoji.images[:, :, ::-1]))
        generator = torch.Generator().manual_seed(config.seed)
        for _ in range(config.augment):
            flip = (torch.rand(len(emoji.images), generator=generator) < 0.5) & self._mirrorable() & config.mirror
            blocks.append(self._encode_images(emoji.images, generator, flip))
        latents = torch.cat(blocks)
        if cache is not None:
            atomic_write(cache, lambda temp: torch.save(latents, temp))
        return latents

    def _encode_images(self, images: np.ndarray, generator: Optional[torch.Generator] = None,
                       flip: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Latent statistics of emoji (KL: mean and logvar on channels), of random views of them
        when given a `generator`."""
        out = []
        with torch.no_grad():
            for start in range(0, len(images), 64):
                x = emoji_at(images[start:start + 64], self.config.image_size)
                if generator is not None:
                    x = random_views(x, generator, flip[start:start + 64])
                x = x.to(self.device)
                if isinstance(self.first_stage, AutoencoderKL):
                    out.append(torch.cat(self.first_stage.encode_moments(x), 1).cpu())
                else:
                    out.append(self.first_stage.encode(x).cpu())
        return torch.cat(out)

    def _empty_context(self) -> torch.Tensor:
        emoji = self.data.emoji
        if emoji.contexts is not None:
            return torch.from_numpy(np.asarray(emoji.empty_context)).float()
        return self._encode_texts([""])[0]

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        if self.text_encoder is None:
            from latentgen.models.text import MiniLMEmbedder

            self.text_encoder = MiniLMEmbedder()
        with torch.no_grad():
            return self.text_encoder(texts).float().cpu()

    def _emoji_latents(self, indices: torch.Tensor) -> torch.Tensor:
        stats = self.emoji_latents[indices].to(self.device)
        if isinstance(self.first_stage, AutoencoderKL):
            mean, logvar = stats.chunk(2, dim=1)
            return mean + (0.5 * logvar).exp() * torch.randn_like(mean)
        return stats

    def _photos(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return self.data.photos.sample(batch, generator)[0].to(self.device)

    def _text_condition(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        emoji = self.data.emoji
        captions, rows = emoji.pick_captions(indices, generator)
        dropped = (torch.rand(len(indices), generator=generator) < self.config.cond_drop).tolist()
        if emoji.contexts is not None:
            context = torch.from_numpy(np.asarray(emoji.contexts[rows])).float()
            context[torch.tensor(dropped, dtype=torch.bool)] = self.empty_context
        else:
            context = self._encode_texts(["" if drop else c for c, drop in zip(captions, dropped)])
        return context.to(self.device)

    def batch(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, Conditioning]:
        """(scaled latents z0, their conditioning) for one training step."""
        task, sf = self.config.task, self.scale_factor
        if task == "txt2img":
            indices = self.data.emoji.draw(batch, generator, self.config.category_power)
            rows = self._mirrored(indices, generator) if self.config.mirror else indices
            rows = self._viewed(indices, rows, generator) if self.config.augment else rows
            return self._emoji_latents(rows) * sf, Conditioning(context=self._text_condition(indices, generator))
        if task == "sr":
            x = self._sr_targets(batch, generator)
            low = degrade(x.cpu(), self.first_stage_spec.factor, generator).to(self.device)
            with torch.no_grad():
                return encode(self.first_stage, x, True) * sf, Conditioning(concat=low)
        x = self._photos(batch, generator)
        with torch.no_grad():
            z = encode(self.first_stage, x, True) * sf
            if task == "uncond":
                return z, Conditioning()
            mask = random_masks(batch, x.shape[-2], x.shape[-1], generator).to(self.device)
            masked = encode(self.first_stage, x * (mask < 0.5), False) * sf
            small = F.interpolate(mask, size=z.shape[-2:], mode="nearest")
            return z, Conditioning(concat=inpainting_concat(INPAINT_LAYOUT, masked, small))

    def _mirrored(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Latent rows of `indices`, the mirrored copy (row N + i) for half of the mirrorable ones."""
        flip = (torch.rand(len(indices), generator=generator) < 0.5) & self._mirrorable()[indices]
        return indices + flip.long() * len(self.data.emoji.images)

    def _mirrorable(self) -> torch.Tensor:
        """Which emoji may be shown mirrored (none when the set does not say)."""
        emoji = self.data.emoji
        return torch.zeros(len(emoji.images), dtype=torch.bool) if emoji.mirrors is None else torch.from_numpy(emoji.mirrors)

    def _viewed(self, indices: torch.Tensor, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """`rows` with half of them, at random, replaced by one of their image's random views."""
        count, first = len(self.data.emoji.images), 2 if self.config.mirror else 1
        view = torch.randint(self.config.augment, (len(indices),), generator=generator)
        take = torch.rand(len(indices), generator=generator) < 0.5
        return torch.where(take, indices + (first + view) * count, rows)

    def _sr_targets(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """High-resolution targets: photo crops plus, when emoji are given, sharp emoji mosaics."""
        emoji, size = self.data.emoji, self.config.image_size
        count = 0
        if emoji is not None and size % emoji.images.shape[1] == 0:
            count = min(round(batch * self.config.emoji_fraction), batch - 1)
        x = self._photos(batch - count, generator)
        if count:
            x = torch.cat([x, emoji_mosaic(emoji.images, count, size // emoji.images.shape[1], generator).to(self.device)])
        return x

    def _measure_scale_factor(self, samples: int = 256) -> float:
        """1 / std of the training latents, as the LDM paper rescales them (drawn with a separate
        generator so the training batches do not depend on it)."""
        generator = torch.Generator().manual_seed(self.config.seed + 1)
        latents, batch = [], self.config.batch
        rng = torch.get_rng_state()
        with torch.no_grad():
            for _ in range(max(1, samples // batch)):
                if self.config.task == "txt2img":
                    z = self._emoji_latents(torch.randint(len(self.data.emoji.images), (batch,), generator=generator))
                else:
                    x = self._sr_targets(batch, generator) if self.config.task == "sr" else self._photos(batch, generator)
                    z = encode(self.first_stage, x, True)
                latents.append(z.float().cpu())
        torch.set_rng_state(rng)
        return float(1 / torch.cat(latents).std())

    # ---- training ----------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """One step on the global batch (drawn whole on every rank, so that it does not depend on
        the number of ranks), of which this rank trains its slice."""
        config = self.config
        lr = runs.set_learning_rate(self.optimizer, self.step, config.lr, config.warmup, config.steps, config.min_lr)
        z0, cond = self.batch(config.batch, self.generator)
        t = torch.randint(0, config.timesteps, (len(z0),)).to(self.device)
        noise = torch.randn(z0.shape).to(self.device)
        part = self.rank.part(len(z0))
        z0, t, noise = z0[part], t[part], noise[part]
        context, concat = (None if c is None else c[part] for c in (cond.context, cond.concat))
        x_t = losses.q_sample(z0, t, noise, self.alphas_cumprod)
        if concat is not None:
            x_t = torch.cat([x_t, concat], 1)
        if config.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with runs.autocast(self.device, cpu_bf16=config.precision == "bf16"):
            output = self.parallel_unet(x_t, t, context=context)
        alpha = self.alphas_cumprod.to(self.device)[t].float().view(-1, 1, 1, 1)
        target = losses.v_target(z0, noise, alpha) if config.parameterization == "v" else noise
        weights = losses.min_snr_weights(alpha, config.min_snr_gamma, config.parameterization, config.min_snr_plus_one) \
            if config.min_snr_gamma > 0 else torch.ones_like(alpha)
        loss = losses.diffusion_loss(output, target, weights)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        self._update_ema()
        return {"loss": loss.item(), "lr": lr}

    def _update_ema(self) -> None:
        """CompVis LitEma: decay warms up as (1 + n) / (10 + n) towards `ema_decay`, or, with
        `ema_half_life`, towards 0.5 ** (1 / half-life steps) (0.9999 is too slow for short runs)."""
        target = 0.5 ** (1 / self.config.ema_half_life) if self.config.ema_half_life > 0 else self.config.ema_decay
        decay = min(target, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for average, param in zip(self.ema.parameters(), self.unet.parameters()):
                average.lerp_(param, 1 - decay)

    def state(self) -> dict:
        return {"config": asdict(self.config), "unet": self.unet.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "step": self.step, "scale_factor": self.scale_factor,
                "random": runs.random_state(self.generator)}

    def start_from(self, model: LatentDiffusion) -> None:
        """Fine-tune: the UNet (and EMA) start from a trained model's weights and keep its latent
        scale factor (CompVis' `ckpt_path`); the optimiser starts afresh. The model must share this
        run's architecture, but for more ResBlocks per level (`grow_res_blocks`) or deeper transformers
        (`grow_transformer_depth`), and its first-stage encoder, or its latents would mean something
        else (a fine-tuned decoder is fine: it renders the same latents)."""
        if model.unet is None:
            raise LatentgenError("--init-from needs a diffusion model, not an autoencoder")
        if latent_space_key(self.first_stage) != latent_space_key(model.first_stage):
            raise LatentgenError("--init-from model was trained on another latent space (first-stage encoder) "
                                 "than --first-stage's")
        state = model.unet.state_dict()
        grow_res_blocks(self.unet, state, len(self.config.channel_mult))
        grow_transformer_depth(self.unet, state)
        runs.load_weights(self.unet, state, "--init-from model has another UNet architecture")
        self.ema.load_state_dict(self.unet.state_dict())
        self.scale_factor = model.scale_factor

    def load(self, state: dict) -> None:
        self.unet.load_state_dict(state["unet"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.scale_factor = float(state["scale_factor"])
        runs.restore_random_state(state["random"], self.generator)

    # ---- export and samples ------------------------------------------------------------------

    def model_params(self) -> dict:
        """The official YAML's `model.params` for this model."""
        config = self.config
        params = {
            "linear_start": config.linear_start, "linear_end": config.linear_end, "timesteps": config.timesteps,
            "image_size": config.image_size // self.first_stage_spec.factor,
            "channels": self.first_stage_spec.latent_channels, "scale_factor": self.scale_factor,
            "conditioning_key": CONDITIONING_KEYS[config.task], "parameterization": config.parameterization,
            "zero_terminal_snr": config.zero_terminal_snr,
            "unet_config": config.unet_config(self.first_stage_spec.latent_channels, self.first_stage_spec.factor),
        }
        if self.first_stage_name:
            params["first_stage"] = self.first_stage_name
        else:
            params["first_stage_config"] = self.first_stage_config
        params["preview_projection"] = fit_projection(self.first_stage, self.scale_factor,
                                                      self.first_stage_spec.factor).tolist()
        if config.task == "txt2img":
            params["cond_stage"] = "minilm"
        else:
            params["cond_stage_config"] = COND_STAGE_CONFIGS[config.task]
        return params

    def export(self, folder: Path) -> Path:
        tensors = {"model.diffusion_model." + k: v for k, v in self.ema.state_dict().items()}
        if not self.first_stage_name:
            tensors.update({"first_stage_model." + k: v for k, v in self.first_stage.state_dict().items()})
        config = {"model": {"target": LDM_TARGET, "params": self.model_params()},
                  "training": {"steps": self.step, "recipe": asdict(self.config)}}
        return runs.export_folder(folder, tensors, config)

    def samples(self, count: int = 8) -> torch.Tensor:
        """EMA samples with fixed seeds (DDIM): prompts for txt2img (guidance 5), otherwise fixed
        validation inputs shown as [condition, sample, target] rows."""
        config, sf = self.config, self.scale_factor
        generator = torch.Generator().manual_seed(12345)
        rng = torch.get_rng_state()
        self.ema.eval()
        with torch.no_grad():
            if config.task == "txt2img":
                cond = Conditioning(context=self._encode_texts(list(SAMPLE_PROMPTS[:count])).to(self.device))
                uncond = Conditioning(context=self.empty_context.expand(len(cond.context), -1, -1).to(self.device))
                z0, scale = None, 5.0
            else:
                z0, cond = self.batch(min(count, 4), generator)
                uncond, scale = None, 1.0
            shape = (len(cond.context) if z0 is None else len(z0), self.first_stage_spec.latent_channels,
                     *(2 * [config.image_size // self.first_stage_spec.factor]))
            x_T = make_noise(shape, 0).to(self.device)
            z = sample("ddim", guided_model(self.ema, cond, uncond, scale), x_T, self.alphas_cumprod,
                       config.parameterization, config.sample_steps,
                       spacing="trailing" if config.zero_terminal_snr else "uniform")
            images = self.first_stage.decode(z / sf).float().clamp(-1, 1).cpu()
            if z0 is not None:
                images = torch.cat([self._show_condition(cond, images.shape[-1]), images,
                                    self.first_stage.decode(z0 / sf).float().clamp(-1, 1).cpu()])
        torch.set_rng_state(rng)
        self.ema.train()
        return images

    def _show_condition(self, cond: Conditioning, size: int) -> torch.Tensor:
        if cond.concat is None:
            return torch.zeros(0, 3, size, size)
        if self.config.task == "sr":
            low = cond.concat.float().cpu()
        else:
            low = self.first_stage.decode(cond.concat[:, :-1] / self.scale_factor).float().cpu()
        return F.interpolate(low, size=(size, size), mode="nearest").clamp(-1, 1)


def train_ldm(config: LDMConfig, first_stage: LatentDiffusion, data: LDMData, run_dir: Path, resume: bool = True,
              text_encoder: Optional[Encoder] = None, quiet: bool = False,
              on_step: Optional[Callable[[int, dict], None]] = None,
              export_dir: Optional[Path] = None, init_from: Optional[LatentDiffusion] = None,
              first_stage_name: Optional[str] = None, rank: distributed.Rank = distributed.Rank()) -> LDMTrainer:
    """Train to `config.steps` (continuing `run_dir`'s checkpoint when `resume`, else starting from
    `init_from`'s weights when given; the export names the bundled `first_stage_name`; data-parallel
    over torchrun's ranks, rank 0 writing), checkpoint every
    `checkpoint_every` steps and at the end, save sample grids every `sample_every` steps, then
    export to `export_dir` (default `run_dir`/export)."""
    trainer = LDMTrainer.create(config, first_stage, data, text_encoder, run_dir, first_stage_name, rank)
    state = runs.load_checkpoint(run_dir) if resume else None
    if state is not None:
        trainer.load(state)
    elif init_from is not None:
        trainer.start_from(init_from)
    trainer.unet.train()
    runs.train_loop(trainer, config.steps, run_dir, config.checkpoint_every, config.sample_every,
                    f"ldm {config.task}", quiet, on_step, config.max_minutes, rank)
    if rank.main:
        trainer.export(export_dir or run_dir / "export")
    return trainer
