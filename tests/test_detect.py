"""Detection recovers the official YAMLs' `model.params` from key names and shapes alone.

The state dicts are built on the `meta` device at the official sizes (no memory, no init cost)
from our CompVis-layout modules, so key layout and detection are checked together.
"""

import copy

import pytest
import torch

from latentgen import detect
from latentgen.errors import LatentgenError
from latentgen.models.autoencoder import AutoencoderKL, VQModel

# ---- official first stages (CompVis latent-diffusion models/first_stage_models/*/config.yaml) ----


def ddconfig(ch_mult, z_channels, attn_resolutions=(), double_z=False, **extra):
    return {**extra, "double_z": double_z, "z_channels": z_channels, "resolution": 256, "in_channels": 3,
            "out_ch": 3, "ch": 128, "ch_mult": list(ch_mult), "num_res_blocks": 2,
            "attn_resolutions": list(attn_resolutions), "dropout": 0.0}


KL = "ldm.models.autoencoder.AutoencoderKL"
VQ = "ldm.models.autoencoder.VQModelInterface"
FIRST_STAGES = {
    "kl-f4": (KL, {"embed_dim": 3, "ddconfig": ddconfig([1, 2, 4], 3, double_z=True)}),
    "kl-f8": (KL, {"embed_dim": 4, "ddconfig": ddconfig([1, 2, 4, 4], 4, double_z=True)}),
    "kl-f16": (KL, {"embed_dim": 16, "ddconfig": ddconfig([1, 1, 2, 2, 4], 16, [16], double_z=True)}),
    "kl-f32": (KL, {"embed_dim": 64, "ddconfig": ddconfig([1, 1, 2, 2, 4, 4], 64, [16, 8], double_z=True)}),
    "vq-f4": (VQ, {"embed_dim": 3, "n_embed": 8192, "ddconfig": ddconfig([1, 2, 4], 3)}),
    "vq-f4-noattn": (VQ, {"embed_dim": 3, "n_embed": 8192, "ddconfig": ddconfig([1, 2, 4], 3, attn_type="none")}),
    "vq-f8": (VQ, {"embed_dim": 4, "n_embed": 16384, "ddconfig": ddconfig([1, 2, 2, 4], 4, [32])}),
    "vq-f8-n256": (VQ, {"embed_dim": 4, "n_embed": 256, "ddconfig": ddconfig([1, 2, 2, 4], 4, [32])}),
    "vq-f16": (VQ, {"embed_dim": 8, "n_embed": 16384, "ddconfig": ddconfig([1, 1, 2, 2, 4], 8, [16])}),
}


def first_stage_shapes(name: str) -> dict:
    target, params = FIRST_STAGES[name]
    cls = VQModel if target == VQ else AutoencoderKL
    with torch.device("meta"):
        return detect.shapes_of(cls(**copy.deepcopy(params)).state_dict())


@pytest.mark.parametrize("name", sorted(FIRST_STAGES))
def test_standalone_first_stages(name):
    target, params = FIRST_STAGES[name]
    config = detect.detect_config(first_stage_shapes(name))
    assert config["first_stage_config"] == {"target": target, "params": params}
    assert config["cond_stage_config"] is None and "unet_config" not in config
    assert detect.family_of(config) == ("autoencoder-vq" if target == VQ else "autoencoder-kl")
    assert detect.latent_factor(config) == int(name.split("-f")[1].split("-")[0])


def test_unrecognised_state_dicts_are_refused():
    with pytest.raises(LatentgenError, match="not a CompVis LDM"):
        detect.detect_config({"foo.weight": (3, 3)})
    shapes = {"model.diffusion_model.x": (1,), "first_stage_model.y": (1,), "low_scale_model.z": (1,)}
    with pytest.raises(LatentgenError, match="x4-upscaler"):
        detect.detect_config(shapes)


@pytest.mark.parametrize("name, want", [
    ("768-v-ema.ckpt", True), ("v2-1_768-ema-pruned.safetensors", True), ("sd-v2-v.ckpt", True),
    ("512-base-ema.ckpt", False), ("v2-1_512-ema-pruned.ckpt", False), ("model.ckpt", False),
])
def test_v_prediction_heuristic_from_file_name(name, want):
    assert detect.wants_v_prediction(name, {}) is want


def test_v_prediction_from_metadata_beats_the_name():
    assert detect.wants_v_prediction("768-v-ema.safetensors", {"modelspec.prediction_type": "epsilon"}) is False
    assert detect.wants_v_prediction("model.safetensors", {"modelspec.prediction_type": "v"}) is True
