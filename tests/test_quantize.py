"""Int8 weight storage: what is quantised, how closely it comes back, and what a malformed file gets."""

import pytest
import torch
from safetensors.torch import save_file

from latentgen.errors import LatentgenError
from latentgen.loader import convert_checkpoint, load_model, read_checkpoint
from latentgen.quantize import dequantize_int8, quantize_int8

import tiny_models


def test_int8_keeps_vectors_and_integers_and_rounds_each_channel_to_half_a_step():
    torch.manual_seed(0)
    conv = torch.randn(6, 4, 3, 3) * torch.logspace(-3, 1, 6).view(6, 1, 1, 1)  # channels of very different sizes
    state = {"conv.weight": conv, "conv.bias": torch.randn(6), "ids": torch.arange(4), "zero": torch.zeros(3, 2)}
    stored = quantize_int8(state)
    assert stored["conv.weight"].dtype == torch.int8 and stored["conv.weight_scale"].shape == (6, 1, 1, 1)
    assert stored["conv.bias"] is state["conv.bias"] and stored["ids"] is state["ids"]
    back = dequantize_int8(stored, "test")
    assert set(back) == set(state)
    step = conv.abs().amax(dim=(1, 2, 3), keepdim=True) / 127
    assert ((back["conv.weight"] - conv).abs() <= step / 2 * 1.001).all()
    assert torch.equal(back["zero"], state["zero"]) and torch.equal(back["conv.bias"], state["conv.bias"])


def test_int8_scales_keep_the_tensor_dtype():
    stored = quantize_int8({"w": torch.randn(3, 5).half()})
    assert stored["w_scale"].dtype == torch.float16
    assert dequantize_int8(stored, "test")["w"].dtype == torch.float16


@pytest.mark.parametrize("scale,message", [
    (None, "needs a floating w_scale of shape \\[3, 1\\]"),
    (torch.ones(3), "needs a floating w_scale"),
    (torch.ones(3, 1, dtype=torch.int32), "needs a floating w_scale"),
])
def test_malformed_int8_files_are_refused_in_one_line(tmp_path, scale, message):
    state = {"w": torch.ones(3, 4, dtype=torch.int8)}
    if scale is not None:
        state["w_scale"] = scale
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LatentgenError, match=message):
        read_checkpoint(tmp_path / "bad.safetensors")


def test_a_taken_scale_name_is_not_overwritten():
    with pytest.raises(LatentgenError, match="w_scale is taken"):
        quantize_int8({"w": torch.randn(2, 2), "w_scale": torch.randn(2, 2)})


def test_an_int8_model_folder_loads_and_denoises_like_the_fp16_one(tmp_path):
    folder = tiny_models.diffusion_model(tmp_path / "fp16", "txt2img")
    int8 = tmp_path / "int8"
    int8.mkdir()
    (int8 / "config.json").write_text((folder / "config.json").read_text())
    convert_checkpoint(folder / "model.safetensors", int8 / "model.safetensors", half=True, int8=True)
    assert (int8 / "model.safetensors").stat().st_size < 0.6 * (folder / "model.safetensors").stat().st_size
    full, small = load_model(folder), load_model(int8)
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 384)
    with torch.no_grad():
        reference, quantised = full.unet(x, t, context=context), small.unet(x, t, context=context)
    assert (quantised - reference).norm() / reference.norm() < 0.01  # 0.003 measured
