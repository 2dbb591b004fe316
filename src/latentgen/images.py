"""Image and mask files in and out: validation, colour conversion, atomic writes, generation parameters.

All PIL use lives here. Images leave this module as float32 tensors in [-1, 1], NCHW, and come
back the same way. Reading refuses anything doubtful with a one-line `LatentgenError` before a
model is loaded; writing never leaves a partial file behind.

Conventions, chosen to match what AUTOMATIC1111 users expect:
- transparency is composited over white (A1111's default img2img background colour);
- animated files (GIF, APNG, WebP) give their first frame, with a logged warning;
- EXIF orientation is applied; 16-bit samples are scaled by 1/65535 (never clipped at 255);
- masks are white = fill; a mask with real transparency uses its alpha channel as the mask
  (A1111's rule for painted masks), otherwise its luma; grey pixels are thresholded at 0.5.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import warnings
from io import BytesIO
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps, PngImagePlugin

from .errors import LatentgenError
from .files import require_file, write_new

log = logging.getLogger("latentgen")

MAX_PIXELS = 64 * 2**20
"""Default pixel limit of a loaded image or mask: larger headers are refused as decompression bombs."""
MAX_SIDE = 32768
"""Longest side accepted, whatever the pixel count (a 1 x 10^6 strip is no picture)."""

# Plugins we let PIL try. Others (EPS runs Ghostscript, PSD, ...) are refused as not-an-image.
READ_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM", "TGA")
WRITE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286

ImageLike = Union[torch.Tensor, Image.Image]


class InvalidOutputError(LatentgenError):
    """A generated image that must not be written (NaN/inf, or all black): the pipeline may retry."""


# ---- reading ---------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _megapixels(width: int, height: int) -> str:
    return f"{width}x{height} ({width * height / 2**20:.0f} MPix)"


def _open(path: Path, max_pixels: int, what: str) -> Image.Image:
    """The decoded first frame, upright; refuses missing, empty, malformed and oversized files."""
    require_file(path, what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=READ_FORMATS) as image:
                width, height = image.size
                if width * height > max_pixels or max(width, height) > MAX_SIDE:
                    raise LatentgenError(
                        f"{what} {path} is {_megapixels(width, height)}, over the limit of "
                        f"{max_pixels / 2**20:.0f} MPix and {MAX_SIDE} pixels a side (a decompression bomb?)")
                if getattr(image, "is_animated", False):
                    log.warning("%s %s is animated (%d frames): using the first frame", what, path, image.n_frames)
                image.load()
                return ImageOps.exif_transpose(image)
    except LatentgenError:
        raise
    except PermissionError:
        raise LatentgenError(f"cannot read {what} {path}: permission denied") from None
    except Image.UnidentifiedImageError:
        raise LatentgenError(
            f"{what} {path} is not a supported image ({', '.join(READ_FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise LatentgenError(f"{what} {path} is too large: {_one_line(error)}") from None
    except Exception as error:  # PIL's decoders raise OSError, SyntaxError, ValueError, struct.error ... on bad data
        raise LatentgenError(f"{what} {path} is damaged or truncated: {_one_line(error)}") from None


def _unit_gray(image: Image.Image) -> np.ndarray:
    """Single-channel 16/32-bit or float pixels -> [0, 1], scaled, never clipped at 8 bits.

    16-bit data (I;16*, and I holding 0..65535, as 16-bit PNGs open) is divided by 65535; float
    data already in [0, 1] is kept; anything else is stretched from its minimum to its maximum."""
    values = np.asarray(image).astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("it holds NaN or infinite samples")
    low, high = float(values.min()), float(values.max())
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
        return values / 65535
    if image.mode == "F" and low >= 0 and high <= 1:
        return values
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def _unit_rgba(image: Image.Image) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """RGB in [0, 1] as float32 [H, W, 3], and alpha in [0, 1] (None when the image has no transparency)."""
    if image.mode in ("LAB", "HSV"):
        raise ValueError(f"PIL cannot convert {image.mode} to RGB faithfully; save it as RGB")
    if image.mode.startswith("I") or image.mode == "F":
        gray = _unit_gray(image).astype(np.float32)
        return np.repeat(gray[..., None], 3, axis=2), None
    if image.has_transparency_data:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255
        return rgba[..., :3], rgba[..., 3]
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255, None


def _read(path: Path, max_pixels: int, what: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
    image = _open(path, max_pixels, what)
    try:
        return _unit_rgba(image)
    except (ValueError, OSError) as error:
        raise LatentgenError(f"{what} {path} cannot be converted to RGB from mode {image.mode}: {_one_line(error)}") from None


def load_image(path: Union[str, Path], max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Read an image file as a float32 tensor [1, 3, H, W] in [-1, 1] (see the module notes)."""
    rgb, alpha = _read(Path(path), max_pixels, "image")
    if alpha is not None:
        rgb = rgb * alpha[..., None] + (1 - alpha[..., None])
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() * 2 - 1


def load_mask(path: Union[str, Path], size: Optional[Sequence[int]] = None, resize: bool = False,
              max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Read a mask as [1, 1, H, W] in {0, 1}, 1 (white) = the region to fill.

    `size` is the image's (height, width): a mask of another size is refused, or resized with
    nearest neighbour when `resize` is true. Grey pixels are thresholded at 0.5 and reported."""
    path = Path(path)
    rgb, alpha = _read(path, max_pixels, "mask")
    if alpha is not None and alpha.min() < 1:
        soft = alpha
    else:
        soft = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    grey = int(np.count_nonzero((soft > 0) & (soft < 1)))
    if grey:
        log.warning("mask %s has %d grey pixels (%.1f%%): thresholded at 0.5", path, grey, 100 * grey / soft.size)
    mask = torch.from_numpy((soft >= 0.5).astype(np.float32))[None, None]
    if size is not None and tuple(mask.shape[-2:]) != tuple(size):
        (h, w), (mh, mw) = size, mask.shape[-2:]
        if not resize:
            raise LatentgenError(f"mask {path} is {mw}x{mh} but the image is {w}x{h} (width x height); "
                                 "make them the same size")
        log.warning("mask %s is %dx%d, the image %dx%d: resized with nearest neighbour", path, mw, mh, w, h)
        mask = F.interpolate(mask, size=(h, w), mode="nearest")
    return mask


def mask_coverage(mask: torch.Tensor) -> float:
    """Fraction of the image a mask covers: 0.0 = empty (nothing to fill), 1.0 = full (nothing kept)."""
    return float((mask > 0.5).float().mean())


# ---- tensor <-> PIL --------------------------------------------------------------------------


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[1, C, H, W] or [C, H, W] in [-1, 1] -> uint8 [H, W, C], rounding to the nearest level."""
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"expected one image, got a batch of {x.shape[0]}")
        x = x[0]
    levels = ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255)
    return levels.to(torch.uint8).permute(1, 2, 0).numpy()


def to_pil(x: torch.Tensor) -> Image.Image:
    """A [-1, 1] tensor (3 channels -> RGB, 1 channel -> L) as a PIL image."""
    array = to_uint8(x)
    return Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)


def from_pil(image: Image.Image) -> torch.Tensor:
    """A PIL image (any 8-bit mode) as [1, 3, H, W] in [-1, 1]; no compositing or 16-bit handling."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1


# ---- writing ---------------------------------------------------------------------------------


def _user_comment(text: str) -> bytes:
    """EXIF UserComment as A1111 writes it for JPEG/WebP (piexif's UNICODE, UTF-16 big endian)."""
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + text.encode("utf-16-be")
    return exif.tobytes()


def _encode(image: Image.Image, suffix: str, parameters: Optional[str]) -> bytes:
    buffer = BytesIO()
    kind = WRITE_FORMATS[suffix]
    if kind == "PNG":
        info = PngImagePlugin.PngInfo()
        if parameters is not None:
            info.add_text("parameters", parameters)
        image.save(buffer, "PNG", pnginfo=info)
    else:
        extra = {"exif": _user_comment(parameters)} if parameters is not None else {}
        image.save(buffer, kind, quality=95, **extra)
    return buffer.getvalue()


def _check_output(x: torch.Tensor, black: bool) -> None:
    if not torch.isfinite(x).all():
        raise InvalidOutputError("the image contains NaN or inf values; not written")
    if black and bool(((x + 1) * 127.5).round().max() <= 0):
        raise InvalidOutputError("the image is entirely black; not written")


def save_image(image: ImageLike, path: Union[str, Path], parameters: Optional[str] = None,
               overwrite: bool = False, check: bool = False) -> Path:
    """Write an image atomically and return the path written.

    An existing file is kept unless `overwrite`: the image goes to the first free numbered name
    (out.png -> out-1.png, ...). `parameters` becomes the PNG text chunk `parameters` (EXIF
    UserComment for JPEG/WebP), as AUTOMATIC1111 writes it. NaN/inf images are always refused,
    all-black ones too when `check` is set, with InvalidOutputError so the caller can retry."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITE_FORMATS:
        raise LatentgenError(f"cannot write {path}: use one of {', '.join(WRITE_FORMATS)}")
    if isinstance(image, torch.Tensor):
        _check_output(image, black=check)
        image = to_pil(image)
    elif check:
        _check_output(from_pil(image), black=True)
    data = _encode(image, suffix, parameters)
    if path.is_dir():
        raise LatentgenError(f"cannot write {path}: it is a folder")
    try:
        return write_new(path, data, overwrite)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise LatentgenError(f"cannot write {path}: the disk is full") from None
        raise LatentgenError(f"cannot write {path}: {error.strerror or _one_line(error)}") from None


# ---- generation parameters (AUTOMATIC1111 / stable-diffusion.cpp infotext) ------------------

# A1111's re_param (modules/infotext_utils.py): "Key: value" or "Key: \"json string\"", comma separated.
PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
KEY = re.compile(r"\w[\w \-/]+")


def _value_text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _quote(text: str) -> str:
    """A1111's quoting (JSON string when the value holds a comma, colon or newline), extended to
    values that start with a quote or have outer spaces, which A1111's parser would otherwise alter."""
    if any(c in text for c in ",:\n") or text.startswith('"') or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


def format_parameters(prompt: str, negative: str, fields: dict) -> str:
    """`prompt\\nNegative prompt: negative\\nKey: value, ...` exactly as A1111's create_infotext.

    Fields keep their order; None values are dropped; integral floats print as integers (7.0 -> 7)."""
    for key in fields:
        if not KEY.fullmatch(key):
            raise ValueError(f"infotext key {key!r} must be letters, digits, spaces, '-' or '/'")
    line = ", ".join(f"{key}: {_quote(_value_text(value))}" for key, value in fields.items() if value is not None)
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{negative_line}\n{line}".strip()


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def parse_parameters(text: str) -> dict:
    """Inverse of format_parameters, following A1111's parse_generation_parameters:
    {"prompt": ..., "negative_prompt": ..., "Steps": "20", ...}; values stay strings."""
    *lines, last = text.strip().split("\n")
    if len(PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    result = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    for key, value in PARAM.findall(last):
        result[key] = _unquote(value)
    return result


def read_parameters(path: Union[str, Path]) -> Optional[str]:
    """The `parameters` text of a PNG (or A1111 JPEG/WebP UserComment), None when absent."""
    require_file(Path(path), "image")
    try:
        with Image.open(path, formats=READ_FORMATS) as image:
            text = image.info.get("parameters")
            if text is None:
                comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
                if isinstance(comment, bytes) and comment.startswith(b"UNICODE\0"):
                    text = comment[8:].decode("utf-16-be", errors="replace")
    except Exception as error:  # same zoo of PIL decoder errors as _open
        raise LatentgenError(f"cannot read parameters of {path}: {_one_line(error)}") from None
    return text if isinstance(text, str) else None


# ---- geometry and compositing ----------------------------------------------------------------


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "reflect") -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad bottom and right so H and W are multiples of `multiple`; returns (x, (pad_bottom, pad_right)).

    Reflection needs the pad to be smaller than the side, so tiny images fall back to replicate."""
    height, width = x.shape[-2:]
    pad = (-height % multiple, -width % multiple)
    if pad == (0, 0):
        return x, pad
    if mode == "reflect" and (pad[0] >= height or pad[1] >= width):
        mode = "replicate"
    return F.pad(x, (0, pad[1], 0, pad[0]), mode=mode), pad


def crop_padding(x: torch.Tensor, pad: Sequence[int]) -> torch.Tensor:
    """Undo pad_to_multiple (pad scaled by the same factor as x when x was upsampled)."""
    height, width = x.shape[-2:]
    return x[..., : height - pad[0], : width - pad[1]]


def error_map(a: torch.Tensor, b: torch.Tensor, gain: float = 8.0) -> torch.Tensor:
    """|a - b| averaged over channels, times `gain`, as a grey [-1, 1] image: black = no error."""
    error = ((a - b).abs().mean(dim=1, keepdim=True) / 2 * gain).clamp(0, 1)
    return (error * 2 - 1).expand(-1, 3, -1, -1)


def side_by_side(images: Sequence[ImageLike], labels: Optional[Sequence[str]] = None, gap: int = 4) -> torch.Tensor:
    """Panels left to right on white, top-aligned, each under its label; returns [1, 3, H, W] in [-1, 1]."""
    panels = [image.convert("RGB") if isinstance(image, Image.Image) else to_pil(image).convert("RGB")
              for image in images]
    band = 16 if labels else 0
    width = sum(panel.width for panel in panels) + gap * (len(panels) - 1)
    sheet = Image.new("RGB", (width, band + max(panel.height for panel in panels)), "white")
    draw = ImageDraw.Draw(sheet)
    left = 0
    for i, panel in enumerate(panels):
        sheet.paste(panel, (left, band))
        if labels:
            draw.text((left + 2, 2), labels[i], fill="black")
        left += panel.width + gap
    return from_pil(sheet)


def grid(images: Sequence[torch.Tensor], columns: Optional[int] = None, gap: int = 0) -> torch.Tensor:
    """[1, 3, H, W] images of one size in rows of `columns` (default: as square as possible) on white."""
    count = len(images)
    columns = columns or max(1, round(count**0.5 + 0.499))
    rows = -(-count // columns)
    height, width = images[0].shape[-2:]
    sheet = torch.ones(1, 3, rows * height + (rows - 1) * gap, columns * width + (columns - 1) * gap)
    for i, image in enumerate(images):
        top, left = (i // columns) * (height + gap), (i % columns) * (width + gap)
        sheet[..., top:top + height, left:left + width] = image.reshape(1, 3, height, width)
    return sheet


def feather_mask(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Blend weight of the generated pixels: 1 on the mask, falling smoothly to 0 over `radius`
    pixels outside it (square distance), and exactly 0 beyond: pixels farther than `radius`
    from the mask keep their original values bit for bit. radius 0 gives the hard mask."""
    hard = (mask > 0.5).to(torch.float32)
    weight = hard
    grown = hard
    for step in range(1, radius + 1):
        grown = F.max_pool2d(grown, kernel_size=3, stride=1, padding=1)
        s = 1 - step / (radius + 1)
        weight = torch.maximum(weight, grown * (s * s * (3 - 2 * s)))
    return weight


def composite(base: torch.Tensor, overlay: torch.Tensor, mask: torch.Tensor, feather: int = 4) -> torch.Tensor:
    """`overlay` inside the mask, its edge feathered `feather` pixels outward, `base` elsewhere.

    Where the weight is 0 the result is `base` itself, not a blend, so even a NaN in `overlay`
    there cannot leak in; where it is 1 it is `overlay` exactly."""
    weight = feather_mask(mask, feather).to(base)
    blended = torch.lerp(base, overlay.to(base), weight)
    return torch.where(weight > 0, blended, base)


def fill_hole(image: torch.Tensor, fill: torch.Tensor, hole: torch.Tensor, feather: int = 4) -> torch.Tensor:
    """`fill` inside `hole` (1 = fill), `image` outside it bit for bit: the seam is blended over the
    hole's inner `feather` pixels, by laying the kept image over the fill with its edge feathered inward."""
    return composite(fill, image, 1 - hole, feather)
