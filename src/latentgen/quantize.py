"""Int8 weight storage: half the bytes of fp16 for the matrices and kernels that make up a model.

Each quantised tensor `NAME` is stored as int8 beside `NAME_scale`, one scale per output channel
(dim 0), shaped to broadcast over it, with `NAME = NAME.int8 * NAME_scale` (symmetric, absmax / 127;
the `weight` + `weight_scale` layout of compressed-tensors' channel-wise int8). Official
checkpoints never hold int8 tensors, so an int8 tensor is read as quantised and must have its
scale. Vectors (biases, norms) and integer tensors are kept as they are: they are small and some
are exact. The loader dequantises as it reads, so every model loads int8 files unchanged.
"""

import torch

from .errors import LatentgenError

SCALE_SUFFIX = "_scale"


def quantize_int8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every floating tensor of two or more dimensions as int8 + per-channel scale (in the
    tensor's own float dtype)."""
    out = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point() or tensor.dim() < 2:
            out[name] = tensor
            continue
        if name + SCALE_SUFFIX in state:
            raise LatentgenError(f"cannot store {name[:100]!r} as int8: {name[:100]}{SCALE_SUFFIX} is taken")
        values = tensor.float()
        absmax = values.abs().amax(dim=tuple(range(1, tensor.dim())), keepdim=True)
        scale = (absmax / 127).to(tensor.dtype)  # rounded as stored, so the int8 values fit the scale read back
        out[name] = (values / scale.float().clamp(min=torch.finfo(torch.float32).tiny)).round().clamp(-127, 127).to(torch.int8)
        out[name + SCALE_SUFFIX] = scale
    return out


def dequantize_int8(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """`state` with each int8 tensor and its scale replaced by their product (in the scale's dtype);
    `source` names the file in the one-line error a malformed pair gives."""
    scales = {name + SCALE_SUFFIX for name, tensor in state.items() if tensor.dtype == torch.int8}
    out = {}
    for name, tensor in state.items():
        if name in scales:
            continue
        if tensor.dtype != torch.int8:
            out[name] = tensor
            continue
        scale = state.get(name + SCALE_SUFFIX)
        expected = (tensor.shape[0],) + (1,) * (tensor.dim() - 1) if tensor.dim() else None
        if scale is None or not scale.is_floating_point() or tuple(scale.shape) != expected:
            raise LatentgenError(f"{source}: int8 tensor {name[:100]!r} needs a floating {name[:100]}{SCALE_SUFFIX} "
                                 f"of shape {list(expected or ())}, one scale per output channel")
        out[name] = tensor.to(scale.dtype) * scale
    return out
