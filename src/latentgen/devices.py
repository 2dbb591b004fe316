"""Where and in which precision a model runs: decided once, by the caller of a task or a training run."""

from pathlib import Path
from typing import Optional, Union

import torch

from .errors import LatentgenError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(name: Union[str, torch.device] = "auto") -> torch.device:
    """`auto` takes CUDA, then Apple's MPS, then the CPU; a named device must exist."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LatentgenError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LatentgenError("device cuda asked for, but torch sees no CUDA GPU")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LatentgenError("device mps asked for, but torch sees no Apple GPU")
    return device


# On a 2-core avx512_bf16 CPU, bf16 halved an SD 1.5 (320-channel) UNet step at 512 px (9.8 -> 5.0 s
# guided) and its peak memory (5.1 -> 3.0 GB), and gained nothing for the 64-channel bundled models.
CPU_BF16_MIN_CHANNELS = 192


def native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (avx512_bf16 or AMX); elsewhere bf16 is emulated, slower than fp32."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        found = capabilities()
        return bool(found.get("avx512_bf16") or found.get("amx_bf16"))
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_memory_format(device: torch.device, dtype: torch.dtype) -> torch.memory_format:
    """channels_last for bf16 on the CPU, where oneDNN runs NHWC convolutions without reordering
    every map (an SD 1.5 guided 512 px step 2.37 -> 1.71-1.84 s, the 512 px decode 5.3-7.0 -> 2.1-2.2 s
    on a 2-core AMX Xeon); NCHW elsewhere, which stays as measured."""
    return torch.channels_last if device.type == "cpu" and dtype == torch.bfloat16 else torch.contiguous_format


def pick_dtype(name: Union[str, torch.dtype], device: torch.device, model_channels: Optional[int] = None) -> torch.dtype:
    """`auto`: bf16 (else fp16) on CUDA, fp16 on MPS; on the CPU bf16 for UNets of at least
    CPU_BF16_MIN_CHANNELS base channels where the CPU has native bf16 (measured 2x faster there),
    else fp32 (and `--dtype fp32` keeps seeds bit-exact between CPU and GPU)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        large = model_channels is not None and model_channels >= CPU_BF16_MIN_CHANNELS
        return torch.bfloat16 if large and native_bf16() else torch.float32
    if name not in DTYPES:
        raise LatentgenError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]
