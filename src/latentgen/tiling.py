"""Overlapping tiles with seamless blending, so images larger than a model's native size fit in memory.

A function `fn` maps a tile of the input to a tile of the output `factor` times larger
(4 for super-resolution, f for a VAE decode). Tiles overlap; each output pixel is the
weighted mean of the tiles covering it, with weights that ramp linearly to (almost) zero
at a tile's inner edges, so no seam shows. Where only one tile covers a pixel the result
is that tile's exactly.

`set_seamless` is the other kind of tiling: an image that repeats without a seam.
"""

from typing import Callable, Iterable

import torch
from torch import nn


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length), neighbours sharing >= `overlap`."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _ramp(size: int, overlap: int, at_start: bool, at_end: bool) -> torch.Tensor:
    """1-D blending weight: 1 inside, rising linearly over `overlap` at inner edges."""
    weight = torch.ones(size)
    if overlap > 0:
        rise = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        if not at_start:
            weight[:overlap] = rise
        if not at_end:
            weight[-overlap:] = rise.flip(0)
    return weight


def map_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    factor: int,
) -> torch.Tensor:
    """Apply `fn` over overlapping `tile`-sized tiles of `x` [N,C,H,W] and blend the outputs in
    float32 whatever `fn` returns (a bf16 sum of weighted tiles would be off by a grey level); an
    `x` of one tile is `fn(x)` as it is."""
    _, _, height, width = x.shape
    if height <= tile and width <= tile:
        return fn(x)
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    out = weights = None
    for y in ys:
        for x0 in xs:
            piece = fn(x[:, :, y : y + tile, x0 : x0 + tile])
            th, tw = piece.shape[-2:]
            wy = _ramp(th, overlap * factor, y == ys[0], y == ys[-1])
            wx = _ramp(tw, overlap * factor, x0 == xs[0], x0 == xs[-1])
            w = (wy[:, None] * wx[None, :]).to(piece.device)
            if out is None:
                out = piece.new_zeros(*piece.shape[:2], height * factor, width * factor, dtype=torch.float32)
                weights = piece.new_zeros(height * factor, width * factor, dtype=torch.float32)
            oy, ox = y * factor, x0 * factor
            out[:, :, oy : oy + th, ox : ox + tw] += piece.float() * w
            weights[oy : oy + th, ox : ox + tw] += w
    return out / weights


def set_seamless(modules: Iterable[nn.Module], on: bool = True) -> None:
    """Circular padding in every padded convolution of `modules` (A1111's "Tiling", sd.cpp's
    `--circular`): the image then continues across its borders and tiles without a seam."""
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, nn.Conv2d) and any(layer.padding):
                layer.padding_mode = "circular" if on else "zeros"
