"""How much memory a sampling run will need, and refusing a run that cannot fit.

The estimate is a deliberately simple model, calibrated on measured CPU peaks (tests/test_memory.py
keeps it within 0.5x-2x of them):

    peak = weights + max(UNet forward, first-stage decode)

* weights: every floating-point parameter and buffer at the run's dtype, plus the frozen MiniLM
  text encoder that lives outside the module tree (MINILM_PARAMETERS).
* UNet forward, at batch B (2B with classifier-free guidance) and latent h x w: the skip
  connections the UNet keeps for its decoder half (one map per input block), plus the working
  set of the costliest block: a ResBlock at the top level (UNET_RESBLOCK_MAPS maps of its width)
  or a transformer block (UNET_TRANSFORMER_MAPS maps: the residuals, the gated feed-forward's
  8x-wide hidden state and its halves).
* decode, at batch B and the output size: DECODE_MAPS maps of the widest full-resolution level.

Attention holds no tokens x tokens matrix: every attention layer hands contiguous q, k, v to the
fused `scaled_dot_product_attention` kernels, whose working set is a few token maps.

Sampler state (x, a few eps) is latent-sized and ignored. The check runs with the weights already
loaded on the device, so the device's free memory is compared with the activations alone, while
`--max-memory` bounds the whole peak.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .errors import LatentgenError
from .ldm import LatentDiffusion, UNetLayout
from .models.text import MiniLMEmbedder

UNET_RESBLOCK_MAPS = 6
UNET_TRANSFORMER_MAPS = 22
DECODE_MAPS = 3.5
MINILM_PARAMETERS = 22_713_216  # all-MiniLM-L6-v2, loaded from its package on first use

_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
          "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}


def parse_size(text: str) -> int:
    """"8GB" -> 8e9 bytes, "512MiB" / "512M" -> 512 * 2**20; a bare number is bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise LatentgenError(f"cannot read memory size {text!r}: write e.g. 8GB, 6GiB or 512MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(size: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


@dataclass(frozen=True)
class Estimate:
    """Peak bytes of a run, by part."""

    weights: int
    unet: int
    decode: int

    @property
    def activations(self) -> int:
        return max(self.unet, self.decode)

    @property
    def total(self) -> int:
        return self.weights + self.activations


def weights_bytes(model: LatentDiffusion, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    total = MINILM_PARAMETERS * size if isinstance(model.cond_stage, MiniLMEmbedder) else 0
    for module in model.modules():
        for tensor in [*module.parameters(), *module.buffers()]:
            total += tensor.numel() * (size if tensor.is_floating_point() else tensor.element_size())
    return total


def unet_bytes(unet: UNetLayout, batch: int, latent: tuple[int, int], itemsize: int) -> int:
    """One UNet forward at `batch` (already doubled for guidance) and latent size (h, w)."""
    mults, width, blocks = unet.channel_mult, unet.model_channels, unet.num_res_blocks
    pixels = [(latent[0] // 2**i) * (latent[1] // 2**i) for i in range(len(mults))]
    skips = width * pixels[0] + sum(
        width * m * (blocks * pixels[i] + (pixels[i + 1] if i + 1 < len(mults) else 0)) for i, m in enumerate(mults)
    )
    work = UNET_RESBLOCK_MAPS * width * max(mults[0], mults[min(1, len(mults) - 1)]) * pixels[0]
    if unet.spatial_transformer:
        for i in unet.attention_levels:
            work = max(work, UNET_TRANSFORMER_MAPS * width * mults[i] * pixels[i])
    return int(batch * (skips + work) * itemsize)


def decode_bytes(decoder_width: int, batch: int, size: tuple[int, int], itemsize: int) -> int:
    """One first-stage decode of `batch` latents into size (H, W) images, `decoder_width` channels at full size."""
    return int(batch * DECODE_MAPS * decoder_width * size[0] * size[1] * itemsize)


def estimate(model: LatentDiffusion, batch: int, size: tuple[int, int], guided: bool,
             dtype: Optional[torch.dtype] = None) -> Estimate:
    """Peak memory of sampling `batch` images of `size` (H, W) pixels; dtype: the model's by default."""
    spec = model.spec
    dtype = dtype or next(model.first_stage.parameters()).dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    latent = (size[0] // spec.factor, size[1] // spec.factor)
    unet = unet_bytes(spec.unet, batch * (2 if guided else 1), latent, itemsize) if spec.unet is not None else 0
    return Estimate(weights_bytes(model, dtype), unet, decode_bytes(spec.decoder_width, batch, size, itemsize))


def available(device: torch.device) -> Optional[int]:
    """Free memory on `device` now: CUDA's free bytes, or the RAM Linux could give (MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        import psutil
    except ImportError:
        meminfo = Path("/proc/meminfo")
        if not meminfo.is_file():
            return None
        match = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo.read_text(), re.MULTILINE)
        return int(match.group(1)) * 1024 if match else None
    return psutil.virtual_memory().available


def check(model: LatentDiffusion, batch: int, size: tuple[int, int], guided: bool,
          max_memory: Optional[str] = None) -> Estimate:
    """The run's estimate; a LatentgenError naming what to lower if it exceeds `max_memory` or
    the device's free memory (the weights, already loaded, do not count against the latter)."""
    need = estimate(model, batch, size, guided)
    device = next(model.first_stage.parameters()).device
    limit = parse_size(max_memory) if max_memory is not None else None
    free = available(device)
    if limit is not None and need.total > limit:
        over = f"--max-memory {max_memory}"
    elif free is not None and need.activations > free:
        over = f"the {format_size(free)} free on {device.type}"
    else:
        return need
    lower = "--batch-size, " if batch > 1 else ""
    dtype = next(model.first_stage.parameters()).dtype
    precision = " or --dtype fp16" if dtype == torch.float32 else ""
    raise LatentgenError(
        f"this run needs about {format_size(need.total)} (weights {format_size(need.weights)} + sampling "
        f"{format_size(need.activations)}), more than {over}: lower {lower}--height/--width{precision}"
    )
