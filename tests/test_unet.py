"""The CompVis UNet against diffusers on identical random weights.

Transformer UNets (SD 1.x/2.x, LDM text/class models) go through diffusers' own single-file utilities
into `UNet2DConditionModel`; the transformer-free LDM UNets (inpainting, super-resolution, LSUN, CelebA)
into `UNet2DModel` by `latentgen.reference`'s own mapping, as diffusers ships that one only in a script.
Official hyper-parameters are copied from the CompVis / Stability-AI YAMLs named beside each config.
"""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding

from latentgen.errors import LatentgenError
from latentgen.models.unet import GroupNorm32, SpatialTransformer, UNetModel, timestep_embedding
from latentgen.reference import plain_unet_to_diffusers, transformer_unet_to_diffusers

TOLERANCE = 2e-5  # measured: below 7e-6 everywhere; a GroupNorm eps of 1e-6 for 1e-5 alone gives 3e-5 to 7e-5

# ---- official unet_config.params -------------------------------------------------------------

SD_COMMON = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                 num_res_blocks=2, channel_mult=[1, 2, 4, 4], use_spatial_transformer=True, transformer_depth=1,
                 use_checkpoint=True, legacy=False)
OFFICIAL_CROSS = {
    # CompVis/stable-diffusion configs/stable-diffusion/v1-inference.yaml
    "sd-v1": dict(SD_COMMON, num_heads=8, context_dim=768),
    # Stability-AI/stablediffusion configs/stable-diffusion/v2-inference-v.yaml
    "sd-v2-v": dict(SD_COMMON, use_fp16=True, num_head_channels=64, use_linear_in_transformer=True, context_dim=1024),
    # ... v2-1-stable-unclip-h-inference.yaml
    "sd-v2-unclip-h": dict(SD_COMMON, num_classes="sequential", adm_in_channels=2048, num_head_channels=64,
                           use_linear_in_transformer=True, context_dim=1024),
    # ... x4-upscaling.yaml
    "sd-x4-upscaler": dict(use_checkpoint=True, num_classes=1000, image_size=128, in_channels=7, out_channels=4,
                           model_channels=256, attention_resolutions=[2, 4, 8], num_res_blocks=2,
                           channel_mult=[1, 2, 2, 4], disable_self_attentions=[True, True, True, False],
                           disable_middle_self_attn=False, num_heads=8, use_spatial_transformer=True,
                           transformer_depth=1, context_dim=1024, legacy=False, use_linear_in_transformer=True),
    # CompVis/latent-diffusion configs/latent-diffusion/txt2img-1p4B-eval.yaml
    "ldm-txt2img-1p4B": dict(SD_COMMON, num_heads=8, context_dim=1280),
    # ... configs/latent-diffusion/cin256-v2.yaml
    "ldm-cin256-v2": dict(image_size=64, in_channels=3, out_channels=3, model_channels=192,
                          attention_resolutions=[8, 4, 2], num_res_blocks=2, channel_mult=[1, 2, 3, 5], num_heads=1,
                          use_spatial_transformer=True, transformer_depth=1, context_dim=512),
    # ... models/ldm/layout2img-openimages256/config.yaml
    "ldm-layout2img": dict(image_size=64, in_channels=3, out_channels=3, model_channels=128,
                           attention_resolutions=[8, 4, 2], num_res_blocks=2, channel_mult=[1, 2, 3, 4],
                           num_head_channels=32, use_spatial_transformer=True, transformer_depth=3, context_dim=512),
}


def ldm_plain(image_size, in_channels, model_channels, attention_resolutions, channel_mult, **heads):
    return dict(image_size=image_size, in_channels=in_channels, out_channels=3, model_channels=model_channels,
                attention_resolutions=attention_resolutions, num_res_blocks=2, channel_mult=channel_mult, **heads)


OFFICIAL_PLAIN = {  # CompVis/latent-diffusion models/ldm/*/config.yaml
    "ldm-inpainting-big": ldm_plain(64, 7, 256, [8, 4, 2], [1, 2, 3, 4], num_heads=8, resblock_updown=True),
    "ldm-bsr-sr": ldm_plain(64, 6, 160, [16, 8], [1, 2, 2, 4], num_head_channels=32),
    "ldm-celeba256": ldm_plain(64, 3, 224, [8, 4, 2], [1, 2, 3, 4], num_head_channels=32),
    "ldm-semantic-synthesis": ldm_plain(64, 6, 128, [32, 16, 8], [1, 4, 8], num_heads=8),
    "ldm-lsun-churches": dict(ldm_plain(32, 4, 192, [1, 2, 4, 8], [1, 2, 2, 4, 4], num_heads=8,
                                        use_scale_shift_norm=True, resblock_updown=True), out_channels=4),
}


def tiny_cross(**extra):
    base = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                num_res_blocks=1, channel_mult=[1, 2], use_spatial_transformer=True, transformer_depth=1,
                context_dim=24)
    return {**base, **extra}


# One structural feature each, at a width where a forward pass takes milliseconds.
TINY_CROSS = {
    "sd1-num-heads": tiny_cross(num_heads=2, legacy=False),
    "sd2-linear-head-channels": tiny_cross(num_head_channels=16, use_linear_in_transformer=True, legacy=False),
    "head-channels-legacy": tiny_cross(num_head_channels=16),
    "one-head-legacy": tiny_cross(num_heads=1),
    "depth-2-partial-attention": tiny_cross(num_head_channels=16, transformer_depth=2, attention_resolutions=[2],
                                            channel_mult=[1, 1, 2], num_res_blocks=2),
    "scale-shift-norm": tiny_cross(num_heads=2, use_scale_shift_norm=True),
    "class-ids-no-self-attn": tiny_cross(num_heads=2, num_classes=10, disable_self_attentions=[True, False],
                                         use_linear_in_transformer=True, in_channels=7, legacy=False),
    "adm-sequential": tiny_cross(num_head_channels=16, use_linear_in_transformer=True, num_classes="sequential",
                                 adm_in_channels=12, legacy=False),
    "cin256-v2-reduced": {**OFFICIAL_CROSS["ldm-cin256-v2"], "model_channels": 32},
    "txt2img-1p4B-reduced": {**OFFICIAL_CROSS["ldm-txt2img-1p4B"], "model_channels": 64},
}


def tiny_plain(**extra):
    base = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[2, 4],
                num_res_blocks=1, channel_mult=[1, 2, 2])
    return {**base, **extra}


TINY_PLAIN = {
    "legacy-heads-resblock-updown": tiny_plain(in_channels=7, num_heads=2, resblock_updown=True),
    "head-channels": tiny_plain(in_channels=6, num_head_channels=16),
    "scale-shift-updown": tiny_plain(num_heads=2, use_scale_shift_norm=True, resblock_updown=True,
                                     attention_resolutions=[1, 2, 4]),
    "new-attention-order": tiny_plain(num_head_channels=16, use_new_attention_order=True),
    "non-legacy-heads": tiny_plain(num_heads=4, legacy=False),
    "heads-upsample": tiny_plain(num_heads=2, num_heads_upsample=4, num_res_blocks=2),
    "class-conditional": tiny_plain(num_heads=2, num_classes=5),
    "inpainting-big-reduced": {**OFFICIAL_PLAIN["ldm-inpainting-big"], "model_channels": 32},
    "bsr-sr-reduced": {**OFFICIAL_PLAIN["ldm-bsr-sr"], "model_channels": 32},
}

# ---- building and converting ---------------------------------------------------------------------


@torch.no_grad()
def randomise(model, seed=0):
    """Every parameter random (zero-initialised output layers too) at a scale that keeps activations O(1).
    Values are slices of one pool of normals, so that 860M parameters fill in about a second."""
    gen = torch.Generator().manual_seed(seed)
    params = list(model.named_parameters())
    largest = max(p.numel() for _, p in params)
    pool = torch.randn(2 * largest, generator=gen)
    for (name, p), offset in zip(params, torch.randint(0, largest, (len(params),), generator=gen).tolist()):
        noise = pool[offset:offset + p.numel()].view(p.shape)
        if name == "label_emb.weight":
            p.copy_(noise)
        elif p.ndim > 1:
            p.copy_(noise / p[0].numel() ** 0.5)
        elif name.endswith("weight"):  # every 1-D weight is a norm's scale
            p.copy_(1 + 0.1 * noise)
        else:
            p.copy_(0.05 * noise)


def build(params, materialise=True):
    """Our UNet, constructed without spending time on an init that `randomise` overwrites."""
    with torch.device("meta"):
        model = UNetModel(**params)
    if materialise:
        model.to_empty(device="cpu")
        randomise(model)
    return model.eval()


# ---- comparing -----------------------------------------------------------------------------------


def relative_error(ours, reference):
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def inputs(params, size=8, batch=2, tokens=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, params["in_channels"], size, size, generator=gen)
    t = torch.tensor([17.5, 871.0, 3.0, 500.0][:batch])
    context = (torch.randn(batch, tokens, params["context_dim"], generator=gen)
               if params.get("context_dim") else None)
    y = None
    if params.get("num_classes") == "sequential":
        y = torch.randn(batch, params["adm_in_channels"], generator=gen)
    elif params.get("num_classes") is not None:
        y = torch.randint(0, params["num_classes"], (batch,), generator=gen)
    return x, t, context, y


@torch.no_grad()
def cross_error(params, size=8, tokens=5):
    model = build(params)
    reference_model = transformer_unet_to_diffusers(model, params)
    x, t, context, y = inputs(params, size, tokens=tokens)
    ours = model(x, t, context, y)
    return relative_error(ours, reference_model(x, t, encoder_hidden_states=context, class_labels=y).sample)


@torch.no_grad()
def plain_error(params, size=8):
    model = build(params)
    reference_model = plain_unet_to_diffusers(model, params)
    x, t, _, y = inputs(params, size)
    return relative_error(model(x, t, y=y), reference_model(x, t, class_labels=y).sample)


@pytest.mark.parametrize("name", TINY_CROSS)
def test_transformer_unet_matches_diffusers(name):
    size = 16 if name.startswith("cin256") else 8  # reach its 2x2 attention level
    assert cross_error(TINY_CROSS[name], size) <= TOLERANCE


@pytest.mark.parametrize("name", TINY_PLAIN)
def test_plain_unet_matches_diffusers(name):
    assert plain_error(TINY_PLAIN[name], 16) <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("name, size", [("sd-v1", 8), ("sd-v2-v", 8), ("ldm-cin256-v2", 16)])
def test_official_transformer_unet_matches_diffusers(name, size):
    assert cross_error(OFFICIAL_CROSS[name], size, tokens=77) <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ldm-inpainting-big", "ldm-bsr-sr", "ldm-lsun-churches"])
def test_official_plain_unet_matches_diffusers(name):
    assert plain_error(OFFICIAL_PLAIN[name], 16) <= TOLERANCE


# ---- the official key layout ---------------------------------------------------------------------


@pytest.mark.parametrize("name", OFFICIAL_CROSS)
def test_official_transformer_keys_and_shapes_match_diffusers(name):
    """At full size on the meta device: diffusers' mapping takes every key, and its model every shape."""
    transformer_unet_to_diffusers(build(OFFICIAL_CROSS[name], materialise=False), OFFICIAL_CROSS[name])


@pytest.mark.parametrize("name", OFFICIAL_PLAIN)
def test_official_plain_keys_and_shapes_match_diffusers(name):
    plain_unet_to_diffusers(build(OFFICIAL_PLAIN[name], materialise=False), OFFICIAL_PLAIN[name])


def test_sd_v1_state_dict_is_the_official_layout():
    state = build(OFFICIAL_CROSS["sd-v1"], materialise=False).state_dict()
    assert len(state) == 686
    assert sum(v.numel() for v in state.values()) == 859_520_964
    expected = {
        "time_embed.0.weight": (1280, 320),
        "time_embed.2.bias": (1280,),
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias": (320,),
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
        "input_blocks.1.1.transformer_blocks.0.norm3.weight": (320,),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
        "middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "middle_block.2.out_layers.0.bias": (1280,),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "output_blocks.11.1.norm.weight": (320,),
        "output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
        "out.0.weight": (320,),
        "out.2.weight": (4, 320, 3, 3),
    }
    assert {k: tuple(state[k].shape) for k in expected} == expected
    no_attention = ("input_blocks.10.1.", "input_blocks.11.1.", "output_blocks.0.1.", "output_blocks.1.1.")
    assert not any(k.startswith(no_attention) for k in state)  # none at 8x downsampling


def test_sd_v2_uses_linear_projections_and_64_channel_heads():
    model = build(OFFICIAL_CROSS["sd-v2-v"], materialise=False)
    state = model.state_dict()
    assert len(state) == 686
    assert state["middle_block.1.proj_in.weight"].shape == (1280, 1280)
    assert state["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 1024)
    assert [model.input_blocks[i][1].transformer_blocks[0].attn1.heads for i in (1, 4, 7)] == [5, 10, 20]


def test_legacy_attention_block_layout():
    model = build(OFFICIAL_PLAIN["ldm-inpainting-big"], materialise=False)
    state = model.state_dict()
    assert state["input_blocks.4.1.qkv.weight"].shape == (1536, 512, 1)
    assert state["input_blocks.4.1.proj_out.weight"].shape == (512, 512, 1)
    assert state["input_blocks.3.0.in_layers.0.weight"].shape == (256,)  # the resblock_updown downsampler
    assert {m.num_heads for n, m in model.named_modules() if n.endswith(".1") and hasattr(m, "qkv")} == {8}


# ---- smaller pieces ------------------------------------------------------------------------------


def test_timestep_embedding_is_cos_first_without_frequency_shift():
    t = torch.tensor([0.0, 1.5, 999.0])
    ours = timestep_embedding(t, 64)
    reference = get_timestep_embedding(t, 64, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.allclose(ours, reference, atol=1e-6)
    assert torch.equal(ours[0], torch.cat([torch.ones(32), torch.zeros(32)]))
    odd = timestep_embedding(t, 7)
    assert odd.shape == (3, 7) and torch.equal(odd[:, -1], torch.zeros(3))
    assert torch.allclose(odd[1, :3], torch.cos(1.5 * torch.exp(-torch.arange(3) / 3 * torch.log(torch.tensor(1e4)))))


def test_group_norm32_computes_in_float32():
    gen = torch.Generator().manual_seed(0)
    norm = GroupNorm32(32, 64)
    torch.nn.init.normal_(norm.weight, 1.0, 0.2, generator=gen)
    x = (torch.randn(2, 64, 4, 4, generator=gen) * 100 + 1000).to(torch.bfloat16)
    reference = F.group_norm(x.float(), 32, norm.weight, norm.bias, eps=1e-5)
    out = norm.to(torch.bfloat16)(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference, rtol=1e-2, atol=1e-2)  # only the output's bf16 rounding


@torch.no_grad()
def test_bfloat16_forward_follows_float32():
    params = TINY_CROSS["sd1-num-heads"]
    model = build(params)
    x, t, context, _ = inputs(params)
    reference = model(x, t, context)
    low = model.to(torch.bfloat16)(x.bfloat16(), t, context.bfloat16())
    assert low.dtype == torch.bfloat16 and relative_error(low.float(), reference) < 5e-2


@torch.no_grad()
def test_a_channels_last_unet_keeps_its_layout_and_its_output():
    """A channels_last UNet computes what the NCHW one does, and its SpatialTransformers hand
    channels-last maps on as they are instead of copying them back to NCHW."""
    params = TINY_CROSS["sd1-num-heads"]
    model = build(params)
    x, t, context, _ = inputs(params)
    reference = model(x, t, context)
    model.to(memory_format=torch.channels_last)
    layouts = []
    for module in model.modules():
        if isinstance(module, SpatialTransformer):
            module.register_forward_hook(
                lambda _, args, out: layouts.append((out.is_contiguous(memory_format=torch.channels_last),
                                                     args[0].is_contiguous(memory_format=torch.channels_last))))
    out = model(x, t, context)
    assert layouts and all(kept and came for kept, came in layouts)
    assert torch.allclose(out, reference, atol=1e-5)


@torch.no_grad()
def test_one_timestep_serves_the_batch():
    params = TINY_PLAIN["head-channels"]
    model = build(params)
    x, _, _, _ = inputs(params)
    assert torch.equal(model(x, torch.tensor(40.0)), model(x, torch.tensor([40.0, 40.0])))


@torch.no_grad()
def test_codebook_id_predictor_replaces_the_output_head():
    params = tiny_plain(num_heads=2, n_embed=16)
    model = build(params)
    state = model.state_dict()
    assert state["id_predictor.1.weight"].shape == (16, 32, 1, 1) and "out.2.weight" in state
    features = []
    model.out.register_forward_pre_hook(lambda _, args: features.append(args[0]))
    model.predict_codebook_ids = False
    x, t, _, _ = inputs(params)
    model(x, t)
    model.predict_codebook_ids = True
    norm, conv = model.id_predictor
    expected = conv(F.group_norm(features[0], 32, norm.weight, norm.bias, norm.eps))  # no SiLU between
    assert torch.allclose(model(x, t), expected, atol=1e-5)


def test_num_attention_blocks_limits_attention_per_level():
    params = tiny_cross(num_heads=2, num_res_blocks=2, num_attention_blocks=[1, 2], use_linear_in_transformer=True)
    state = build(params, materialise=False).state_dict()
    attended = sorted({k.split(".")[1] for k in state if k.startswith("input_blocks") and ".1.proj_in" in k})
    assert attended == ["1", "4", "5"]  # level 0: first of two res blocks only; level 1: both


def test_conv_resample_off_pools_and_interpolates_without_weights():
    model = build(tiny_plain(num_heads=2, conv_resample=False))
    assert isinstance(model.input_blocks[2][0].op, torch.nn.AvgPool2d)
    assert not any(".op." in k or ".conv." in k for k in model.state_dict())
    x = torch.randn(1, 3, 8, 8)
    assert model(x, torch.tensor([5.0])).shape == (1, 3, 8, 8)


@pytest.mark.parametrize("params, message", [
    (tiny_cross(), "num_heads or num_head_channels"),
    (tiny_cross(num_heads=2, context_dim=None), "context_dim"),
    (tiny_plain(num_heads=2, context_dim=8), "context_dim"),
    (tiny_plain(num_heads=2, dims=3), "2-D"),
    (tiny_plain(num_heads=2, num_classes="continuous"), "num_classes"),
    (tiny_plain(num_heads=2, num_res_blocks=[1, 1]), "per channel_mult level"),
])
def test_bad_configs_are_user_errors(params, message):
    with pytest.raises(LatentgenError, match=message):
        UNetModel(**params)


def test_class_labels_are_required_exactly_for_class_conditional_models():
    params = TINY_PLAIN["class-conditional"]
    model = build(params)
    x, t, _, y = inputs(params)
    with pytest.raises(ValueError):
        model(x, t)
    with pytest.raises(ValueError):
        build(TINY_PLAIN["head-channels"])(torch.randn(2, 6, 8, 8), t, y=y)
