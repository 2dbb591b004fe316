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
    assert detect.first_stage_factor(config["first_stage_config"]) == int(name.split("-f")[1].split("-")[0])


def test_unrecognised_state_dicts_are_refused():
    with pytest.raises(LatentgenError, match="not a CompVis LDM"):
        detect.detect_config({"foo.weight": (3, 3)})
    shapes = {"model.diffusion_model.x": (1,), "first_stage_model.y": (1,), "embedder.z": (1,)}
    with pytest.raises(LatentgenError, match="unCLIP"):
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


# ---- official full models (CompVis / Stability YAMLs) ---------------------------------------

SD_VAE = FIRST_STAGES["kl-f8"]
VQ_F4 = FIRST_STAGES["vq-f4"]
CLIP = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
OPENCLIP = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder", "params": {"freeze": True, "layer": "penultimate"}}
SD_SCHEDULE = {"linear_start": 0.00085, "linear_end": 0.012, "scale_factor": 0.18215}


def sd_unet(context_dim, heads, in_channels=4, image_size=64, **extra):
    return {"image_size": image_size, "in_channels": in_channels, "out_channels": 4, "model_channels": 320,
            "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], **heads,
            "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": context_dim, "legacy": False, **extra}


def ldm_unet(image_size, in_channels, out_channels, model_channels, attention_resolutions, channel_mult, heads, **extra):
    return {"image_size": image_size, "in_channels": in_channels, "out_channels": out_channels,
            "model_channels": model_channels, "attention_resolutions": attention_resolutions, "num_res_blocks": 2,
            "channel_mult": channel_mult, **heads, **extra}


def class_embedder(embed_dim=512, **extra):
    return {"target": "ldm.modules.encoders.modules.ClassEmbedder", "params": {**extra, "embed_dim": embed_dim, "key": "class_label"}}


def bert(n_embed):
    return {"target": "ldm.modules.encoders.modules.BERTEmbedder", "params": {"n_embed": n_embed, "n_layer": 32}}


def official(unet, first_stage, cond, linear_start=0.0015, linear_end=0.0195, **top):
    """An official YAML's model.params (the keys that describe the model), CompVis defaults filled in."""
    target, first_params = first_stage
    return detect.normalize_params({
        "linear_start": linear_start, "linear_end": linear_end, "timesteps": 1000, **top,
        "unet_config": {"target": detect.UNET_TARGET, "params": unet},
        "first_stage_config": {"target": target, "params": first_params},
        "cond_stage_config": cond,
    })


# (family, file name, official params). SD's YAMLs say unet image_size 32 "unused": the native
# latent size (64, 96 for 768-v) is what detection reports and what is checked here.
OFFICIAL = {
    "sd-v1-5": ("sd1", "v1-5-pruned-emaonly.ckpt", official(
        sd_unet(768, {"num_heads": 8}), SD_VAE, CLIP, **SD_SCHEDULE, conditioning_key="crossattn")),
    "sd-v1-5-inpainting": ("sd1-inpaint", "sd-v1-5-inpainting.ckpt", official(
        sd_unet(768, {"num_heads": 8}, in_channels=9), SD_VAE, CLIP, **SD_SCHEDULE, conditioning_key="hybrid")),
    "sd-v2-768-v": ("sd2", "768-v-ema.ckpt", official(
        sd_unet(1024, {"num_head_channels": 64}, image_size=96, use_linear_in_transformer=True), SD_VAE, OPENCLIP,
        **SD_SCHEDULE, conditioning_key="crossattn", parameterization="v")),
    "sd-v2-512-base": ("sd2", "512-base-ema.ckpt", official(
        sd_unet(1024, {"num_head_channels": 64}, use_linear_in_transformer=True), SD_VAE, OPENCLIP,
        **SD_SCHEDULE, conditioning_key="crossattn")),
    "sd-v2-inpainting": ("sd2-inpaint", "512-inpainting-ema.ckpt", official(
        sd_unet(1024, {"num_head_channels": 64}, in_channels=9, use_linear_in_transformer=True), SD_VAE, OPENCLIP,
        **SD_SCHEDULE, conditioning_key="hybrid")),
    "txt2img-1p4B": ("ldm-txt2img", "model.ckpt", official(
        sd_unet(1280, {"num_heads": 8}, image_size=32), SD_VAE, bert(1280), **SD_SCHEDULE, conditioning_key="crossattn")),
    "text2img256": ("ldm-txt2img", "model.ckpt", official(
        ldm_unet(64, 3, 3, 192, [8, 4, 2], [1, 2, 3, 5], {"num_head_channels": 32}, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=640), VQ_F4, bert(640), conditioning_key="crossattn")),
    "cin256-v2": ("ldm-class", "model.ckpt", official(
        ldm_unet(64, 3, 3, 192, [8, 4, 2], [1, 2, 3, 5], {"num_heads": 1}, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=512), VQ_F4, class_embedder(n_classes=1001), conditioning_key="crossattn")),
    "cin256": ("ldm-class", "model.ckpt", official(
        ldm_unet(32, 4, 4, 256, [4, 2, 1], [1, 2, 4], {"num_head_channels": 32}, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=512), FIRST_STAGES["vq-f8"], class_embedder(), conditioning_key="crossattn")),
    "bsr_sr": ("ldm-sr", "model.ckpt", official(
        ldm_unet(64, 6, 3, 160, [16, 8], [1, 2, 2, 4], {"num_head_channels": 32}), VQ_F4, {"target": "torch.nn.Identity"},
        linear_end=0.0155, concat_mode=True)),
    "inpainting_big": ("ldm-inpaint", "last.ckpt", official(
        ldm_unet(64, 7, 3, 256, [8, 4, 2], [1, 2, 3, 4], {"num_heads": 8}, resblock_updown=True),
        FIRST_STAGES["vq-f4-noattn"], "__is_first_stage__", linear_end=0.0205, concat_mode=True)),
    "lsun_churches256": ("ldm-uncond", "model.ckpt", official(
        ldm_unet(32, 4, 4, 192, [1, 2, 4, 8], [1, 2, 2, 4, 4], {"num_heads": 8}, use_scale_shift_norm=True,
                 resblock_updown=True), SD_VAE, "__is_unconditional__", linear_end=0.0155, concat_mode=False)),
    "celeba256": ("ldm-uncond", "model.ckpt", official(
        ldm_unet(64, 3, 3, 224, [8, 4, 2], [1, 2, 3, 4], {"num_head_channels": 32}), VQ_F4, "__is_unconditional__",
        concat_mode=False)),
}


def cond_stage_shapes(cond) -> dict:
    """The conditioning model's keys at its official size, built on meta from our text encoders."""
    from latentgen.models import text

    name = detect.target_name(cond)
    if name in ("__is_unconditional__", "__is_first_stage__", "Identity"):
        return {}
    params = {k: v for k, v in cond.get("params", {}).items() if k not in ("key", "freeze", "layer")}
    with torch.device("meta"):
        module = getattr(text, name)(**params)
    return detect.shapes_of(module.state_dict())


def official_shapes(params) -> dict:
    from latentgen.models.unet import UNetModel

    target, first_params = params["first_stage_config"]["target"], params["first_stage_config"]["params"]
    with torch.device("meta"):
        unet = UNetModel(**params["unet_config"]["params"])
        first = (VQModel if target == VQ else AutoencoderKL)(**copy.deepcopy(first_params))
    shapes = {}
    for prefix, part in ((detect.UNET_PREFIX, detect.shapes_of(unet.state_dict())),
                         (detect.FIRST_STAGE_PREFIX, detect.shapes_of(first.state_dict())),
                         (detect.COND_STAGE_PREFIX, cond_stage_shapes(params["cond_stage_config"]))):
        shapes.update({prefix + k: v for k, v in part.items()})
    return shapes


def comparable(params) -> dict:
    """Params with what carries no meaning normalised: the order of attention_resolutions, and
    resolutions the UNet never reaches (bsr_sr lists 16 with only downsamplings 1..8)."""
    params = copy.deepcopy(params)
    unet = params["unet_config"]["params"]
    reached = 2 ** (len(unet["channel_mult"]) - 1)
    unet["attention_resolutions"] = sorted(r for r in unet["attention_resolutions"] if r <= reached)
    return params


@pytest.mark.parametrize("model", sorted(OFFICIAL))
def test_official_models_are_detected(model):
    family, file_name, want = OFFICIAL[model]
    got = detect.detect_config(official_shapes(want), file_name)
    assert comparable(got) == comparable(want)
    assert detect.family_of(got) == family


def test_prediction_override_and_partial_overrides():
    _, _, params = OFFICIAL["sd-v2-512-base"]
    shapes = official_shapes(params)
    assert detect.detect_config(shapes, "512-base-ema.ckpt", prediction="v")["parameterization"] == "v"
    config = detect.detect_config(shapes, "x.ckpt", overrides={"scale_factor": 0.5, "unet_config": {"params": {"num_heads": 4}}})
    assert config["scale_factor"] == 0.5
    assert config["unet_config"]["params"]["num_heads"] == 4 and "num_head_channels" not in config["unet_config"]["params"]
    assert config["unet_config"]["params"]["context_dim"] == 1024
