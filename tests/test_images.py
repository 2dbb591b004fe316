"""Image/mask reading (refusals on real malformed files, every conversion), atomic numbered writes,
A1111 parameters, padding and compositing; a byte-mutation fuzz of the reader."""

import errno
import io
import logging
import os
import re
import struct
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from latentgen import files
from latentgen.errors import LatentgenError
from latentgen.images import (
    InvalidOutputError, composite, crop_padding, error_map, feather_mask, format_parameters, from_pil, load_image,
    load_mask, mask_coverage, pad_to_multiple, parse_parameters, read_parameters, save_image, side_by_side, to_pil,
)


# ---- file makers ---------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, bit_depth: int = 8, colour_type: int = 2, rows: bytes = b"") -> bytes:
    """A hand-made PNG: any header, even one declaring billions of pixels over a few bytes of data."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")


def encoded(image: Image.Image, kind: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def gradient_rgb(width=24, height=16) -> Image.Image:
    x = np.arange(width * height * 3, dtype=np.uint32).reshape(height, width, 3) * 7 % 256
    return Image.fromarray(x.astype(np.uint8))


def as_unit(t: torch.Tensor) -> np.ndarray:
    """[1, C, H, W] in [-1, 1] -> [H, W, C] in [0, 1]."""
    return ((t[0].permute(1, 2, 0) + 1) / 2).numpy()


# ---- refusals --------------------------------------------------------------------------------


def test_valid_png_loads_exactly(tmp_path):
    source = gradient_rgb()
    x = load_image(write(tmp_path / "a.png", encoded(source, "PNG")))
    assert x.shape == (1, 3, 16, 24) and x.dtype == torch.float32
    assert np.array_equal(to_pil(x), np.asarray(source))
    assert x.min() >= -1 and x.max() <= 1


def _refusals(tmp_path: Path) -> list:
    png = encoded(gradient_rgb(64, 64), "PNG")
    jpeg = encoded(gradient_rgb(64, 64), "JPEG", quality=90)
    (tmp_path / "folder.png").mkdir()
    return [
        ("does not exist", tmp_path / "missing.png"),
        ("is a folder", tmp_path / "folder.png"),
        ("empty (0 bytes)", write(tmp_path / "zero.png", b"")),
        ("not a supported image", write(tmp_path / "garbage.png", os.urandom(300))),
        ("not a supported image", write(tmp_path / "text.jpg", b"this is a text file\n" * 10)),
        ("not a supported image", write(tmp_path / "pcx.png", encoded(gradient_rgb(), "PCX"))),
        ("damaged or truncated", write(tmp_path / "half.png", png[: len(png) // 2])),
        ("damaged or truncated", write(tmp_path / "half.jpg", jpeg[: len(jpeg) // 2])),
        ("damaged or truncated", write(tmp_path / "header-only.png", png_bytes(32, 32))),
        ("too large", write(tmp_path / "bomb.png", png_bytes(100_000, 100_000))),  # PIL's DecompressionBombError
        ("too large", write(tmp_path / "bomb-warning.png", png_bytes(10_000, 10_000))),  # PIL's warning, made an error
        ("over the limit", write(tmp_path / "big.png", png_bytes(9000, 9000))),  # 81 MPix: under PIL's, over ours
        ("over the limit", write(tmp_path / "strip.png", png_bytes(40_000, 1))),  # few pixels, absurd side
    ]


def test_refusals_are_one_line_latentgen_errors(tmp_path):
    for expected, path in _refusals(tmp_path):
        for loader in (load_image, lambda p: load_mask(p, None)):
            with pytest.raises(LatentgenError, match=re.escape(expected)) as caught:
                loader(path)
            assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_pixel_limit_is_configurable(tmp_path):
    path = write(tmp_path / "a.png", encoded(gradient_rgb(64, 64), "PNG"))
    with pytest.raises(LatentgenError, match="over the limit"):
        load_image(path, max_pixels=1000)
    assert load_image(path, max_pixels=4096).shape == (1, 3, 64, 64)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file(tmp_path):
    path = write(tmp_path / "a.png", encoded(gradient_rgb(), "PNG"))
    path.chmod(0)
    with pytest.raises(LatentgenError, match="permission denied"):
        load_image(path)


# ---- conversions -----------------------------------------------------------------------------


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red
    x = load_image(write(tmp_path / "cmyk.jpg", encoded(cmyk, "JPEG", quality=100)))
    assert np.abs(as_unit(x) - np.array([1.0, 0.0, 0.0])).max() < 2 / 255


def test_palette_image_and_its_transparent_index(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    palette.putdata([0, 1])
    x = load_image(write(tmp_path / "p.png", encoded(palette, "PNG")))
    assert np.array_equal(to_pil(x), [[[10, 20, 30], [200, 100, 0]]])
    y = load_image(write(tmp_path / "pt.png", encoded(palette, "PNG", transparency=1)))
    assert np.array_equal(to_pil(y), [[[10, 20, 30], [255, 255, 255]]])


def test_alpha_is_composited_over_white(tmp_path):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 51)])
    x = as_unit(load_image(write(tmp_path / "rgba.png", encoded(rgba, "PNG"))))
    np.testing.assert_allclose(x[0], [[1, 1, 1], [0, 0, 1], [0.8, 0.8, 0.8]], atol=1e-6)
    la = Image.new("LA", (1, 1), (0, 128))
    y = as_unit(load_image(write(tmp_path / "la.png", encoded(la, "PNG"))))
    np.testing.assert_allclose(y[0, 0], [127 / 255] * 3, atol=1e-6)


def test_16_bit_gray_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    x = as_unit(load_image(write(tmp_path / "g16.png", encoded(image, "PNG"))))
    np.testing.assert_allclose(x[0, :, 0], values[0] / 65535, atol=1e-6)
    assert x[0, 2, 0] == pytest.approx(0.5, abs=1e-4)  # clipping at 255 would give 1.0


def test_16_bit_rgb_png_keeps_the_high_byte(tmp_path):
    rows = b"\x00" + struct.pack(">6H", 0x8000, 0xFFFF, 0x0000, 0x4000, 0x1234, 0xFF00)
    x = load_image(write(tmp_path / "rgb16.png", png_bytes(2, 1, bit_depth=16, colour_type=2, rows=rows)))
    assert np.array_equal(to_pil(x), [[[0x80, 0xFF, 0x00], [0x40, 0x12, 0xFF]]])


@pytest.mark.parametrize("mode,values,expected", [
    ("L", [0, 128, 255], [0, 128 / 255, 1]),
    ("1", [0, 255, 255], [0, 1, 1]),
    ("F", [0.0, 0.25, 1.0], [0, 0.25, 1]),
    ("F", [-2.0, 0.0, 2.0], [0, 0.5, 1]),  # outside [0, 1]: stretched
    ("I", [0, 1000, 70000], [0, 1000 / 70000, 1]),  # beyond 16 bits: stretched
])
def test_grayscale_modes(tmp_path, mode, values, expected):
    image = Image.new(mode, (3, 1))
    image.putdata(values)
    x = as_unit(load_image(write(tmp_path / f"{mode}.tiff", encoded(image, "TIFF"))))
    np.testing.assert_allclose(x[0, :, 0], expected, atol=1e-6)
    assert np.array_equal(x[..., 0], x[..., 2])


def test_unconvertible_modes_are_refused(tmp_path):
    lab = write(tmp_path / "lab.tiff", encoded(Image.new("LAB", (2, 2), (50, 10, 10)), "TIFF"))
    with pytest.raises(LatentgenError, match="cannot be converted to RGB from mode LAB"):
        load_image(lab)
    nan = Image.new("F", (2, 1))
    nan.putdata([0.5, float("nan")])
    with pytest.raises(LatentgenError, match="NaN"):
        load_image(write(tmp_path / "nan.tiff", encoded(nan, "TIFF")))


def test_exif_orientation_6_rotates_and_swaps_dimensions(tmp_path):
    stored = Image.new("RGB", (16, 8), (255, 0, 0))
    stored.paste((0, 0, 255), (8, 0, 16, 8))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    x = as_unit(load_image(write(tmp_path / "rot.jpg", encoded(stored, "JPEG", quality=100, exif=exif.tobytes()))))
    assert x.shape == (16, 8, 3)
    assert np.abs(x[2, 4] - [1, 0, 0]).max() < 0.05 and np.abs(x[13, 4] - [0, 0, 1]).max() < 0.05


def test_animated_gif_gives_the_first_frame_and_says_so(tmp_path, caplog):
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    with caplog.at_level(logging.WARNING, logger="latentgen"):
        x = as_unit(load_image(path))
    assert np.abs(x - [1, 0, 0]).max() < 0.02
    assert "animated (2 frames)" in caplog.text


def test_one_pixel_image(tmp_path):
    x = load_image(write(tmp_path / "one.png", encoded(Image.new("RGB", (1, 1), (0, 255, 0)), "PNG")))
    assert x.shape == (1, 3, 1, 1) and x.flatten().tolist() == [-1, 1, -1]


# ---- masks -----------------------------------------------------------------------------------


def _mask_file(tmp_path, name, mode, values, size=(4, 1)):
    image = Image.new(mode, size)
    image.putdata(values)
    return write(tmp_path / name, encoded(image, "PNG"))


def test_masks_are_binary_white_is_fill(tmp_path, caplog):
    binary = load_mask(_mask_file(tmp_path, "m.png", "L", [0, 255, 255, 0]), (1, 4))
    assert binary.shape == (1, 1, 1, 4) and binary.flatten().tolist() == [0, 1, 1, 0]
    rgb = load_mask(_mask_file(tmp_path, "rgb.png", "RGB", [(0, 0, 0), (255, 255, 255)] * 2), (1, 4))
    assert rgb.flatten().tolist() == [0, 1, 0, 1]
    with caplog.at_level(logging.WARNING, logger="latentgen"):
        soft = load_mask(_mask_file(tmp_path, "soft.png", "L", [0, 100, 200, 255]), (1, 4))
    assert soft.flatten().tolist() == [0, 0, 1, 1]
    assert "2 grey pixels" in caplog.text and "thresholded at 0.5" in caplog.text


def test_mask_from_alpha_and_16_bit(tmp_path):
    painted = load_mask(_mask_file(tmp_path, "a.png", "RGBA", [(0, 0, 0, 0), (0, 0, 0, 255)] * 2), None)
    assert painted.flatten().tolist() == [0, 1, 0, 1]  # transparent = keep, painted = fill
    sixteen = Image.fromarray(np.array([[0, 30000, 40000, 65535]], dtype=np.uint16))
    deep = load_mask(write(tmp_path / "m16.png", encoded(sixteen, "PNG")), (1, 4))
    assert deep.flatten().tolist() == [0, 0, 1, 1]


def test_mask_size_mismatch_is_refused_or_resized(tmp_path):
    path = _mask_file(tmp_path, "m.png", "L", [0, 255] * 8, size=(4, 4))
    with pytest.raises(LatentgenError, match="mask .* is 4x4 but the image is 8x6"):
        load_mask(path, (6, 8))
    resized = load_mask(path, (8, 8), resize=True)
    assert resized.shape == (1, 1, 8, 8) and set(resized.unique().tolist()) == {0.0, 1.0}
    assert resized[0, 0, 0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]


def test_mask_coverage_tells_empty_and_full(tmp_path):
    empty = load_mask(_mask_file(tmp_path, "e.png", "L", [0] * 4), (1, 4))
    full = load_mask(_mask_file(tmp_path, "f.png", "L", [255] * 4), (1, 4))
    assert mask_coverage(empty) == 0.0 and mask_coverage(full) == 1.0
    assert mask_coverage(torch.tensor([[[[0.0, 1.0, 1.0, 0.0]]]])) == 0.5


# ---- writing ---------------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(tmp_path):
    x = load_image(write(tmp_path / "a.png", encoded(gradient_rgb(), "PNG")))
    written = save_image(x, tmp_path / "out" / "deep" / "b.png")
    assert written == tmp_path / "out" / "deep" / "b.png"
    assert torch.equal(load_image(written), x)
    assert torch.equal(from_pil(to_pil(x)), x)


def test_existing_files_are_never_overwritten_unless_asked(tmp_path):
    target = tmp_path / "out.png"
    first = torch.full((1, 3, 2, 2), 0.5)
    paths = [save_image(first * s, target) for s in (1, -1, 0)]
    assert [p.name for p in paths] == ["out.png", "out-1.png", "out-2.png"]
    assert to_pil(load_image(target)).getpixel((0, 0)) == (191, 191, 191)
    assert save_image(-first, target, overwrite=True) == target
    assert to_pil(load_image(target)).getpixel((0, 0)) == (64, 64, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-1.png", "out-2.png", "out.png"]


def test_concurrent_writers_get_distinct_names(tmp_path):
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda i: save_image(torch.full((1, 3, 4, 4), i / 10), tmp_path / "x.png"), range(8)))
    assert len(set(paths)) == 8
    assert sorted(round(float(load_image(p)[0, 0, 0, 0]) * 10) for p in paths) == list(range(8))


@pytest.mark.parametrize("overwrite", [False, True])
def test_failure_mid_write_leaves_nothing_behind(tmp_path, monkeypatch, overwrite):
    target = write(tmp_path / "out.png", b"precious")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    with pytest.raises(LatentgenError, match="disk is full"):
        save_image(torch.zeros(1, 3, 8, 8), target, overwrite=overwrite)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    assert target.read_bytes() == b"precious"


def test_interrupt_during_replace_removes_the_temp_file(tmp_path, monkeypatch):
    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_image(torch.zeros(1, 3, 8, 8), tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_targets(tmp_path):
    blocker = write(tmp_path / "file", b"x")
    with pytest.raises(LatentgenError, match="cannot write"):
        save_image(torch.zeros(1, 3, 2, 2), blocker / "sub" / "out.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(LatentgenError, match="is a folder"):
        save_image(torch.zeros(1, 3, 2, 2), tmp_path / "dir.png", overwrite=True)
    with pytest.raises(LatentgenError, match="use one of"):
        save_image(torch.zeros(1, 3, 2, 2), tmp_path / "out.gif")


def test_invalid_outputs_are_refused(tmp_path):
    broken = torch.zeros(1, 3, 4, 4)
    broken[0, 1, 2, 2] = float("nan")
    with pytest.raises(InvalidOutputError, match="NaN"):
        save_image(broken, tmp_path / "nan.png")
    black = torch.full((1, 3, 4, 4), -1.0)
    with pytest.raises(InvalidOutputError, match="entirely black"):
        save_image(black, tmp_path / "black.png", check=True)
    with pytest.raises(InvalidOutputError, match="entirely black"):
        save_image(to_pil(black), tmp_path / "black.png", check=True)
    assert list(tmp_path.iterdir()) == []
    assert save_image(black, tmp_path / "black.png").exists()  # black is fine unless checked


# ---- parameters ------------------------------------------------------------------------------

FIELDS = {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7.0, "Seed": 42, "Size": "512x512",
          "Model hash": "1a2b3c4d5e", "Model": "name"}


def test_format_matches_a1111():
    assert format_parameters("a cat", "blurry", FIELDS) == (
        "a cat\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, Model hash: 1a2b3c4d5e, Model: name")
    assert format_parameters("", "", {**FIELDS, "Eta": None}).startswith("Steps: 20, ")
    quoted = format_parameters("p", "", {**FIELDS, "Model": 'v1, "fine": 2', "Eta": 0.25})
    assert quoted.endswith('Model: "v1, \\"fine\\": 2", Eta: 0.25')
    with pytest.raises(ValueError):
        format_parameters("p", "", {"bad: key": 1})


def test_parse_a1111_and_sdcpp_text():
    a1111 = ("girl with a beret, blue eyes\nNegative prompt: ugly, (((deformed)))\n"
             'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b, '
             'Lora hashes: "a: 1, b: 2"')
    parsed = parse_parameters(a1111)
    assert parsed["prompt"] == "girl with a beret, blue eyes" and parsed["negative_prompt"] == "ugly, (((deformed)))"
    assert parsed["Seed"] == "965400086" and parsed["Size"] == "512x512" and parsed["Lora hashes"] == "a: 1, b: 2"
    sdcpp = ("a lovely cat\nSteps: 20, CFG scale: 7.000000, Seed: 42, Size: 512x512, Model: sd-v1-4.ckpt, "
             "RNG: cuda, Sampler: euler_a karras, Version: stable-diffusion.cpp")
    parsed = parse_parameters(sdcpp)
    assert parsed["prompt"] == "a lovely cat" and parsed["negative_prompt"] == ""
    assert parsed["Sampler"] == "euler_a karras" and parsed["Version"] == "stable-diffusion.cpp"
    assert parse_parameters("just a prompt, no fields") == {"prompt": "just a prompt, no fields", "negative_prompt": ""}


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_parameters_round_trip_through_real_files(tmp_path, suffix):
    prompt = 'a "quoted" cat, sitting: on a mat\nsecond line with ümlauts ✓'
    negative = "blurry, low quality\nwatermark"
    fields = {**FIELDS, "Model": "my model, v2", "Comment": 'say "hi"\nthere'}
    text = format_parameters(prompt, negative, fields)
    path = save_image(torch.zeros(1, 3, 8, 8), tmp_path / f"p{suffix}", parameters=text)
    assert read_parameters(path) == text
    parsed = parse_parameters(read_parameters(path))
    assert parsed == {"prompt": prompt, "negative_prompt": negative, **{k: str(v) for k, v in fields.items()},
                      "CFG scale": "7"}


def test_read_parameters_absent_or_bad_file(tmp_path):
    assert read_parameters(save_image(torch.zeros(1, 3, 2, 2), tmp_path / "plain.png")) is None
    with pytest.raises(LatentgenError, match="does not exist"):
        read_parameters(tmp_path / "missing.png")
    with pytest.raises(LatentgenError, match="cannot read parameters"):
        read_parameters(write(tmp_path / "junk.png", b"junk" * 10))


# A1111 strips every prompt line, so only stripped lines can round trip in any compatible format.
prompt_lines = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), max_size=30).map(str.strip)


@settings(max_examples=150, deadline=None)
@given(prompt=st.lists(prompt_lines, max_size=3).map("\n".join), negative=st.lists(prompt_lines, max_size=3).map("\n".join),
       model=st.text(st.characters(blacklist_categories=("Cs",)), max_size=20))
def test_parameters_round_trip_property(prompt, negative, model):
    assume(prompt == prompt.strip() and negative == negative.strip())
    # A1111's format has no escape: any line starting "Negative prompt:" reads as the marker.
    assume(not any(line.startswith("Negative prompt:") for line in f"{prompt}\n{negative}".split("\n")))
    parsed = parse_parameters(format_parameters(prompt, negative, {**FIELDS, "Model": model}))
    assert (parsed["prompt"], parsed["negative_prompt"], parsed["Model"]) == (prompt, negative, model)


# ---- geometry and compositing ----------------------------------------------------------------


@pytest.mark.parametrize("size,multiple", [((13, 21), 8), ((16, 16), 8), ((1, 1), 8), ((3, 30), 4)])
def test_pad_and_crop(size, multiple):
    x = torch.rand(1, 3, *size)
    padded, pad = pad_to_multiple(x, multiple)
    assert padded.shape[-2] % multiple == 0 and padded.shape[-1] % multiple == 0
    assert padded.shape[-2:] == (size[0] + pad[0], size[1] + pad[1])
    assert torch.equal(crop_padding(padded, pad), x)
    up = torch.nn.functional.interpolate(padded, scale_factor=4)
    assert crop_padding(up, tuple(4 * p for p in pad)).shape[-2:] == (4 * size[0], 4 * size[1])


def test_reflect_padding_mirrors_the_edge():
    x = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 1, 6, 5)
    padded, pad = pad_to_multiple(x, 8)
    assert pad == (2, 3) and padded[0, 0, 0].tolist() == [0, 1, 2, 3, 4, 3, 2, 1]


def test_feather_weights_are_exact_outside_the_band():
    mask = torch.zeros(1, 1, 21, 21)
    mask[..., 8:13, 8:13] = 1
    weight = feather_mask(mask, 4)
    assert torch.equal(weight[mask == 1], torch.ones(25))
    assert weight[0, 0, 10, 3].item() == 0 and weight[0, 0, 10, 4].item() > 0  # 4 px away: last ramp step
    assert weight[0, 0, 10, 4] < weight[0, 0, 10, 5] < weight[0, 0, 10, 7] < 1
    assert torch.equal(feather_mask(mask, 0), mask)


def test_composite_keeps_unmasked_pixels_bit_exact(tmp_path):
    original = load_image(write(tmp_path / "a.png", encoded(gradient_rgb(32, 32), "PNG")))
    generated = torch.full_like(original, float("nan"))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 10:20, 12:22] = 1
    generated[..., 5:25, 7:27] = 0.3  # finite only within the feather band
    out = composite(original, generated, mask, feather=3)
    far = feather_mask(mask, 3) == 0
    assert torch.equal(out.expand_as(original)[far.expand_as(original)], original[far.expand_as(original)])
    assert torch.equal(out[..., 10:20, 12:22], generated[..., 10:20, 12:22])
    assert torch.isfinite(out).all()
    written = load_image(save_image(out, tmp_path / "out.png"))
    assert torch.equal(written[far.expand_as(written)], original[far.expand_as(original)])


def test_error_map_and_side_by_side():
    a = torch.zeros(1, 3, 6, 5)
    b = a.clone()
    b[..., 0, 0] = 0.25  # error 0.125 on the [0, 1] scale, x8 = 1
    emap = error_map(a, b, gain=8)
    assert emap.shape == (1, 3, 6, 5) and emap[0, :, 0, 0].tolist() == [1, 1, 1] and emap[0, :, 1, 1].tolist() == [-1] * 3
    sheet = side_by_side([a, b, emap], labels=["in", "out", "err"], gap=4)
    assert sheet.shape == (1, 3, 16 + 6, 3 * 5 + 2 * 4)
    assert torch.equal(sheet[..., 16:, 9:14], from_pil(to_pil(b)))
    assert (sheet[..., :16, :] < 0).any()  # label text drawn
    plain = side_by_side([a, torch.zeros(1, 3, 3, 2)])
    assert plain.shape == (1, 3, 6, 11) and torch.equal(plain[..., 3:, 9:], torch.ones(1, 3, 3, 2))


# ---- fuzz ------------------------------------------------------------------------------------

FUZZ_EXAMPLES = 500
SEEDS = {
    "png": encoded(gradient_rgb(12, 10), "PNG"),
    "rgba.png": encoded(gradient_rgb(9, 7).convert("RGBA"), "PNG"),
    "jpg": encoded(gradient_rgb(16, 16), "JPEG", quality=80),
    "gif": encoded(gradient_rgb(8, 8).convert("P"), "GIF"),
}


def _fix_png_crcs(data: bytes) -> bytes:
    """Recompute chunk CRCs so mutations reach PIL's decoders instead of its checksum check."""
    out, at = bytearray(data[:8]), 8
    while at + 12 <= len(data):
        length = struct.unpack(">I", data[at:at + 4])[0]
        body = data[at + 4:at + 8 + length]
        if at + 12 + length > len(data):
            break
        out += data[at:at + 8 + length] + struct.pack(">I", zlib.crc32(body))
        at += 12 + length
    return bytes(out + data[at:])


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=st.sampled_from(sorted(SEEDS)),
       edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 10**6)), fix_crc=st.booleans())
def test_fuzzed_files_load_or_raise_latentgen_error(seed, edits, cut, fix_crc):
    data = bytearray(SEEDS[seed])
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    if fix_crc and seed.endswith("png"):
        data = bytearray(_fix_png_crcs(bytes(data)))
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder) / f"f.{seed}", bytes(data))
        try:
            x = load_image(path)
        except LatentgenError as error:
            assert "\n" not in str(error)
            event(f"refused: {str(error).split(': ')[0].split(' is ')[-1]}")
            return
    event("loaded")
    assert x.dtype == torch.float32 and x.dim() == 4 and x.shape[:2] == (1, 3)
    assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
