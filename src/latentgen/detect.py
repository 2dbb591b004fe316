"""Which model a state dict holds, and its hyper-parameters, from key names and shapes alone.

The result has the structure of an official CompVis YAML's `model.params` (unet_config,
first_stage_config, cond_stage_config, schedule, scale_factor, ...), so a YAML given by the
user and a detected configuration are built by the same code.

Shapes fix almost everything. What they cannot fix comes from the known official families,
keyed by what is detectable, and can always be overridden by a config:
  * attention heads (heads x head-width is all a weight shows): SD 1.x and the LDM BERT models
    use 8 heads, SD 2.x 64-channel heads, cin256-v2 one head, the legacy-attention LDMs with
    scale-shift norm / resblock up-down / channel_mult 1,4,8 use 8 heads, other LDMs 32-channel heads;
  * parameterization: SD 2.x 768 models predict v, 512 models eps, with identical weights'
    shapes; v is chosen when the file's metadata says so or its name contains "768" or a "v"
    token (768-v-ema.ckpt, v2-1_768-ema-pruned.safetensors), eps otherwise;
  * the noise schedule and scale_factor, per family (SD: 0.00085/0.012, 0.18215; LDM:
    0.0015/0.0155 for concat SR and the KL churches model, 0.0015/0.0205 for inpainting,
    0.0015/0.0195 otherwise; scale_factor 1.0 except KL-f8 text models);
  * the SD 2 x4 upscaler (recognised by its `low_scale_model.*` schedule buffers) predicts v on
    the 1e-4/2e-2 schedule with scale_factor 0.08333, uses 8 heads, and noise-augments its
    low-res input on a schedule of its own (`low_scale_config`, as in x4-upscaling.yaml).
"""

import re
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from .errors import LatentgenError
from .ldm import LOW_RES_IMAGE, MASK_THEN_MASKED_IMAGE, MASKED_IMAGE_THEN_MASK, ModelSpec, UNetLayout
from .schedules import TrainingSchedule

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model."
LOW_SCALE_PREFIX = "low_scale_model."
ESTIMATOR_PREFIX = "estimator."  # latentgen's own: the regression estimate an LDM refines (models/estimator.py)
AUTOENCODER_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")

UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
KL_TARGET = "ldm.models.autoencoder.AutoencoderKL"
VQ_TARGET = "ldm.models.autoencoder.VQModelInterface"
CLIP_TARGET = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
OPENCLIP_TARGET = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
BERT_TARGET = "ldm.modules.encoders.modules.BERTEmbedder"
CLASS_TARGET = "ldm.modules.encoders.modules.ClassEmbedder"
MINILM_TARGET = "latentgen.models.text.MiniLMEmbedder"
DC_TARGET = "latentgen.models.dcae.AutoencoderDC"
IDENTITY_TARGET = "torch.nn.Identity"
NOISE_AUGMENTATION_TARGET = "ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation"
X4_UPSCALER = "sd2-x4-upscaler"
UNCONDITIONAL = "__is_unconditional__"
FIRST_STAGE = "__is_first_stage__"

# What CompVis' DDPM / LatentDiffusion assume when a YAML leaves a key out.
COMPVIS_DEFAULTS = {**asdict(TrainingSchedule()), "parameterization": "eps", "scale_factor": 1.0, "concat_mode": True}

# x4-upscaling.yaml's low_scale_config: the low-res image is noised on this (CompVis "linear") schedule.
X4_LOW_SCALE_CONFIG = {
    "target": NOISE_AUGMENTATION_TARGET,
    "params": {"noise_schedule_config": {"linear_start": 1e-4, "linear_end": 2e-2}, "max_noise_level": 350},
}

Shapes = dict[str, tuple[int, ...]]


def shapes_of(state_dict: Mapping[str, Any]) -> Shapes:
    """Key -> shape, from tensors (any device, `meta` included) or from shapes."""
    return {key: tuple(getattr(value, "shape", value)) for key, value in state_dict.items()}


def sub_shapes(shapes: Shapes, prefix: str) -> Shapes:
    return {key[len(prefix):]: shape for key, shape in shapes.items() if key.startswith(prefix)}


def indices(shapes: Shapes, prefix: str) -> list[int]:
    """The sorted N of keys `prefix + "N." + ...`."""
    found = {int(m.group(1)) for key in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", key))}
    return sorted(found)


def has_prefix(shapes: Shapes, prefix: str) -> bool:
    return any(key.startswith(prefix) for key in shapes)


def is_standalone_autoencoder(shapes: Shapes) -> bool:
    compvis = "encoder.conv_in.weight" in shapes and "decoder.conv_out.weight" in shapes
    return compvis or is_dc_autoencoder(shapes)


# ---- UNet -----------------------------------------------------------------------------------


def _block_kind(shapes: Shapes, prefix: str) -> str:
    """What sits at `prefix` inside a TimestepEmbedSequential: resblock, attention, transformer, conv, down."""
    if f"{prefix}in_layers.2.weight" in shapes:
        return "resblock"
    if f"{prefix}proj_in.weight" in shapes:
        return "transformer"
    if f"{prefix}qkv.weight" in shapes:
        return "attention"
    if f"{prefix}op.weight" in shapes:
        return "down"
    if f"{prefix}conv.weight" in shapes:
        return "up"
    return "unknown"


def detect_unet(shapes: Shapes) -> dict:
    """UNetModel constructor parameters (heads excepted, see `official_head_layout`)."""
    if "input_blocks.0.0.weight" not in shapes or "out.2.weight" not in shapes:
        raise LatentgenError("the diffusion model has no input_blocks.0.0 / out.2 convolution: not a CompVis UNet")
    model_channels, in_channels = shapes["input_blocks.0.0.weight"][:2]
    out_channels = shapes["out.2.weight"][0]

    # Output blocks: each level holds num_res_blocks + 1 blocks and ends (except the last) in an upsampler.
    outputs = indices(shapes, "output_blocks.")
    upsampler_at = {}
    for n in outputs:
        for part in indices(shapes, f"output_blocks.{n}.")[1:]:
            kind = _block_kind(shapes, f"output_blocks.{n}.{part}.")
            if kind in ("up", "resblock"):
                upsampler_at[n] = kind
    if not upsampler_at:
        raise LatentgenError("cannot find the UNet's upsamplers (conv_resample=False?): pass --config")
    blocks_per_level = min(upsampler_at) + 1
    num_res_blocks = blocks_per_level - 1
    levels = len(outputs) // blocks_per_level
    if levels * blocks_per_level != len(outputs):
        raise LatentgenError(f"the UNet's {len(outputs)} output blocks do not split into levels of {blocks_per_level}")
    widths = [shapes[f"output_blocks.{level * blocks_per_level}.0.out_layers.3.weight"][0] for level in range(levels)]
    channel_mult = [width // model_channels for width in reversed(widths)]

    # Input blocks: block 1 + level * (num_res_blocks + 1) + i is resblock i of level; attention follows it.
    attention_resolutions, attention_prefix = [], None
    for level in range(levels):
        for i in range(num_res_blocks):
            block = 1 + level * blocks_per_level + i
            if _block_kind(shapes, f"input_blocks.{block}.1.") in ("transformer", "attention"):
                attention_prefix = attention_prefix or f"input_blocks.{block}.1."
                if 2**level not in attention_resolutions:
                    attention_resolutions.append(2**level)
    attention_resolutions.sort(reverse=True)

    emb_width = shapes["input_blocks.1.0.emb_layers.1.weight"][0]
    params: dict[str, Any] = {
        "image_size": 64,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "model_channels": model_channels,
        "attention_resolutions": attention_resolutions,
        "num_res_blocks": num_res_blocks,
        "channel_mult": channel_mult,
    }
    if emb_width == 2 * shapes["input_blocks.1.0.out_layers.3.weight"][0]:
        params["use_scale_shift_norm"] = True
    if "resblock" in upsampler_at.values():
        params["resblock_updown"] = True
    if "label_emb.weight" in shapes:
        params["num_classes"] = shapes["label_emb.weight"][0]
    elif "label_emb.0.0.weight" in shapes:
        params["num_classes"] = "sequential"
        params["adm_in_channels"] = shapes["label_emb.0.0.weight"][1]
    attention_prefix = attention_prefix or ("middle_block.1." if has_prefix(shapes, "middle_block.1.") else None)
    if attention_prefix and _block_kind(shapes, attention_prefix) == "transformer":
        params["use_spatial_transformer"] = True
        params["transformer_depth"] = len(indices(shapes, f"{attention_prefix}transformer_blocks."))
        params["context_dim"] = shapes[f"{attention_prefix}transformer_blocks.0.attn2.to_k.weight"][1]
        if len(shapes[f"{attention_prefix}proj_in.weight"]) == 2:
            params["use_linear_in_transformer"] = True
        params.update(_self_attention_flags(shapes, levels, blocks_per_level, params["context_dim"]))
    return params


def _self_attention_disabled(shapes: Shapes, prefix: str, context_dim: int) -> bool:
    """Whether the transformer at `prefix` has its self-attention replaced by cross-attention
    (CompVis `disable_self_attn`): its attn1 keys then read context_dim-wide inputs."""
    key = f"{prefix}transformer_blocks.0.attn1.to_k.weight"
    return key in shapes and shapes[key][1] == context_dim != shapes[f"{prefix}transformer_blocks.0.attn1.to_q.weight"][1]


def _self_attention_flags(shapes: Shapes, levels: int, blocks_per_level: int, context_dim: int) -> dict:
    """`disable_self_attentions` per level and `disable_middle_self_attn`, only where some are set
    (the x4 upscaler's first levels); levels without attention read False."""
    per_level = [_self_attention_disabled(shapes, f"input_blocks.{1 + level * blocks_per_level}.1.", context_dim)
                 for level in range(levels)]
    middle = _self_attention_disabled(shapes, "middle_block.1.", context_dim)
    params: dict[str, Any] = {}
    if any(per_level):
        params["disable_self_attentions"] = per_level
    if middle:
        params["disable_middle_self_attn"] = True
    return params


def official_head_layout(unet: dict, cond_target: Optional[str]) -> dict:
    """The official families' head layout for a detected UNet (heads are not visible in shapes)."""
    if unet.get("use_spatial_transformer"):
        if cond_target == OPENCLIP_TARGET:
            return {"num_head_channels": 64}
        if cond_target in (CLIP_TARGET, BERT_TARGET) and unet["model_channels"] == 320:
            return {"num_heads": 8}
        if cond_target == CLASS_TARGET and unet["channel_mult"] == [1, 2, 3, 5]:
            return {"num_heads": 1}
        return {"num_head_channels": 32}
    if unet.get("use_scale_shift_norm") or unet.get("resblock_updown") or unet["channel_mult"] == [1, 4, 8]:
        return {"num_heads": 8}
    return {"num_head_channels": 32}


# ---- first stage ----------------------------------------------------------------------------


def detect_first_stage(shapes: Shapes) -> dict:
    """`first_stage_config` ({target, params: {embed_dim, [n_embed], ddconfig}}) of an autoencoder."""
    if is_dc_autoencoder(shapes):
        return detect_dc_autoencoder(shapes)
    required = ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_in.weight",
                "decoder.conv_out.weight", "post_quant_conv.weight")
    missing = [key for key in required if key not in shapes]
    if missing:
        raise LatentgenError(f"the autoencoder lacks {missing[0]!r}: not a CompVis first-stage model")
    ch, in_channels = shapes["encoder.conv_in.weight"][:2]
    levels = indices(shapes, "encoder.down.")
    ch_mult = [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in levels]
    resolution = 256  # not stored; CompVis trained every official autoencoder at 256
    attn_resolutions = [resolution // 2**i for i in levels if has_prefix(shapes, f"encoder.down.{i}.attn.")]
    z_channels = shapes["decoder.conv_in.weight"][1]
    ddconfig: dict[str, Any] = {
        "double_z": shapes["encoder.conv_out.weight"][0] == 2 * z_channels,
        "z_channels": z_channels,
        "resolution": resolution,
        "in_channels": in_channels,
        "out_ch": shapes["decoder.conv_out.weight"][0],
        "ch": ch,
        "ch_mult": ch_mult,
        "num_res_blocks": len(indices(shapes, "encoder.down.0.block.")),
        "attn_resolutions": attn_resolutions,
        "dropout": 0.0,
    }
    if not has_prefix(shapes, "encoder.mid.attn_1."):
        ddconfig = {"attn_type": "none", **ddconfig}
    params: dict[str, Any] = {"embed_dim": shapes["post_quant_conv.weight"][1]}
    if "quantize.embedding.weight" in shapes:
        params["n_embed"] = shapes["quantize.embedding.weight"][0]
        return {"target": VQ_TARGET, "params": {**params, "ddconfig": ddconfig}}
    return {"target": KL_TARGET, "params": {**params, "ddconfig": ddconfig}}


def is_dc_autoencoder(shapes: Shapes) -> bool:
    """diffusers `AutoencoderDC` keys (DC-AE): `encoder.down_blocks.*` and `decoder.up_blocks.*`."""
    return has_prefix(shapes, "encoder.down_blocks.") and has_prefix(shapes, "decoder.up_blocks.")


def _dc_stages(shapes: Shapes, prefix: str) -> tuple[list[int], list[int], list[str]]:
    """(width, ResBlock count, norm type) per stage of `prefix` (`encoder.down_blocks.` / `decoder.up_blocks.`).
    A stage without layers stores no keys: it takes the next stage's width (it is never built)."""
    stages = max(indices(shapes, prefix)) + 1
    widths, layers, norms = [0] * stages, [0] * stages, ["rms_norm"] * stages
    for i in range(stages):
        blocks = [j for j in indices(shapes, f"{prefix}{i}.") if f"{prefix}{i}.{j}.conv1.weight" in shapes]
        layers[i] = len(blocks)
        if blocks:
            widths[i] = shapes[f"{prefix}{i}.{blocks[0]}.conv1.weight"][0]
            if f"{prefix}{i}.{blocks[0]}.norm.running_mean" in shapes:
                norms[i] = "batch_norm"
    for i in reversed(range(stages)):
        widths[i] = widths[i] or widths[min(i + 1, stages - 1)]
    return widths, layers, norms


def detect_dc_autoencoder(shapes: Shapes) -> dict:
    """`first_stage_config` ({target: DC_TARGET, params: diffusers AutoencoderDC config}) of a DC-AE.
    Shapes do not tell the activations or shortcuts: diffusers' defaults are assumed (config.json overrides)."""
    attention = next((key for key in shapes if ".attn." in key or ".conv_out.conv_inverted." in key), None)
    if attention is not None:
        raise LatentgenError(f"DC-AE with EfficientViT attention stages ({attention!r}) is not supported: "
                             "only ResBlock stages are")
    enc_widths, enc_layers, _ = _dc_stages(shapes, "encoder.down_blocks.")
    dec_widths, dec_layers, dec_norms = _dc_stages(shapes, "decoder.up_blocks.")
    conv_in = shapes.get("encoder.conv_in.weight") or shapes["encoder.conv_in.conv.weight"]
    downs = [key for key in shapes if key.startswith("encoder.down_blocks.") and key.endswith(".conv.weight")]
    unshuffle = all(4 * shapes[key][0] in enc_widths for key in downs)
    ups = [key for key in shapes if key.startswith("decoder.up_blocks.") and key.endswith(".conv.weight")]
    shuffle = all(shapes[key][0] % 4 == 0 and shapes[key][0] // 4 in dec_widths for key in ups)
    params = {"in_channels": conv_in[1], "latent_channels": shapes["encoder.conv_out.weight"][0],
              "encoder_block_types": "ResBlock", "decoder_block_types": "ResBlock",
              "encoder_block_out_channels": enc_widths, "decoder_block_out_channels": dec_widths,
              "encoder_layers_per_block": enc_layers, "decoder_layers_per_block": dec_layers,
              "downsample_block_type": "pixel_unshuffle" if unshuffle else "conv",
              "upsample_block_type": "pixel_shuffle" if shuffle else "interpolate",
              "decoder_norm_types": dec_norms if len(set(dec_norms)) > 1 else dec_norms[0]}
    return {"target": DC_TARGET, "params": params}


# ---- cond stage -----------------------------------------------------------------------------


def detect_cond_stage(shapes: Shapes) -> Optional[dict]:
    """`cond_stage_config` of the `cond_stage_model.*` keys (prefix removed); None when there are none."""
    if not shapes:
        return None
    if "transformer.text_model.final_layer_norm.weight" in shapes:
        return {"target": CLIP_TARGET}
    if "model.token_embedding.weight" in shapes:
        return {"target": OPENCLIP_TARGET, "params": {"freeze": True, "layer": "penultimate"}}
    if "transformer.token_emb.weight" in shapes:
        vocab_size, n_embed = shapes["transformer.token_emb.weight"]
        layers = indices(shapes, "transformer.attn_layers.layers.")  # x-transformers: attention, feed-forward, ...
        params: dict[str, Any] = {"n_embed": n_embed, "n_layer": len(layers) // 2}
        if vocab_size != 30522:
            params["vocab_size"] = vocab_size
        max_seq_len = shapes.get("transformer.pos_emb.emb.weight", (77,))[0]
        if max_seq_len != 77:
            params["max_seq_len"] = max_seq_len
        return {"target": BERT_TARGET, "params": params}
    if set(shapes) == {"embedding.weight"}:
        n_classes, embed_dim = shapes["embedding.weight"]
        params = {"embed_dim": embed_dim, "key": "class_label"}
        if n_classes != 1000:
            params = {"n_classes": n_classes, **params}
        return {"target": CLASS_TARGET, "params": params}
    first = sorted(shapes)[0]
    raise LatentgenError(f"unrecognised conditioning model (first key: 'cond_stage_model.{first}'); pass --config")


# ---- the whole model ------------------------------------------------------------------------


def target_name(config: Any) -> Optional[str]:
    """The class name a config's `target` names ("FrozenCLIPEmbedder"), or the special string itself."""
    if isinstance(config, str):
        return config
    if isinstance(config, Mapping):
        return str(config.get("target", "")).rsplit(".", 1)[-1] or None
    return None


def wants_v_prediction(name_hint: str, metadata: Mapping[str, str]) -> bool:
    """SD 2.x 768 checkpoints predict v; only their metadata or file name tells them apart."""
    declared = str(metadata.get("modelspec.prediction_type") or metadata.get("parameterization") or "").lower()
    if declared:
        return declared in ("v", "v_prediction", "v-prediction")
    stem = Path(name_hint).name.lower()
    return "768" in stem or re.search(r"(^|[-_.])v([-_.]|$)", stem) is not None


def _schedule_and_scale(family: str, first_stage: dict) -> dict:
    kl = target_name(first_stage) == "AutoencoderKL"
    if family == X4_UPSCALER:
        return {"linear_start": 1e-4, "linear_end": 2e-2, "scale_factor": 0.08333}
    if family.startswith("sd") or (family == "ldm-txt2img" and kl):
        return {"linear_start": 0.00085, "linear_end": 0.012, "scale_factor": 0.18215}
    if family == "ldm-inpaint":
        end = 0.0205
    elif family == "ldm-sr" or kl:
        end = 0.0155
    else:
        end = 0.0195
    return {"linear_start": 0.0015, "linear_end": end, "scale_factor": 1.0}


def _conditioning_key(unet: dict, cond: Any) -> Optional[str]:
    concat = unet["in_channels"] != unet["out_channels"]
    if target_name(cond) not in (None, UNCONDITIONAL, FIRST_STAGE, "Identity"):
        if concat and unet.get("num_classes") is not None:
            return "hybrid-adm"  # CompVis: concat + cross-attention + y (the x4 upscaler's noise level)
        return "hybrid" if concat else "crossattn"
    if concat:
        return "concat"
    if unet.get("num_classes") is not None:
        return "adm"
    return None


def _weightless_cond_stage(unet: dict, embed_dim: int) -> Any:
    """The conditioning of a model without cond_stage_model weights: the masked image + mask
    (inpainting: extra channels = latent + 1), the low-res image (super-resolution: other extra
    channels), class labels fed to the UNet as `y` (adm), or nothing."""
    extra = unet["in_channels"] - unet["out_channels"]
    if extra == embed_dim + 1:
        return FIRST_STAGE
    if extra or unet.get("num_classes") is not None:
        return {"target": IDENTITY_TARGET}
    return UNCONDITIONAL


def _native_latent_size(family: str, parameterization: str, f: int) -> int:
    """SD was trained at 512 px (SD 2.x v-models at 768, the x4 upscaler at 128 -> 512), every other LDM at 256 px."""
    if family == X4_UPSCALER:
        return 128
    if family.startswith("sd"):
        return 96 if parameterization == "v" else 64
    return 256 // f


def _merged(detected: dict, override: Optional[Mapping]) -> dict:
    """A sub-config with an override's params laid over the detected ones."""
    if not override:
        return detected
    return {**detected, **override, "params": {**detected.get("params", {}), **override.get("params", {})}}


SUB_CONFIGS = ("unet_config", "first_stage_config", "cond_stage_config", "low_scale_config")


def detect_config(state_dict: Mapping[str, Any], name_hint: str = "", metadata: Optional[Mapping[str, str]] = None,
                  prediction: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None) -> dict:
    """The `model.params` an official YAML would give for this state dict (see the module docstring).

    `overrides` is a partial config (our bundled `config.json`), applied with one fixed precedence:
    1. its sub-configs (unet_config, first_stage_config, low_scale_config params laid over the
       detected ones; cond_stage_config replacing the detected one) before anything is derived
       from them, so family, heads and native size follow them;
    2. the parameterization: `prediction`, else the overrides' `parameterization`, else the family's;
    3. its other top-level values replace the derived ones.
    """
    shapes = shapes_of(state_dict)
    metadata, overrides = metadata or {}, dict(overrides or {})
    sub = {key: overrides.pop(key) for key in SUB_CONFIGS if key in overrides}
    if is_standalone_autoencoder(shapes):
        first_stage = _merged(detect_first_stage(shapes), sub.get("first_stage_config"))
        return {"first_stage_config": first_stage, "cond_stage_config": None, "scale_factor": 1.0, **overrides}
    unet_shapes = sub_shapes(shapes, UNET_PREFIX)
    first_shapes = sub_shapes(shapes, FIRST_STAGE_PREFIX)
    if not unet_shapes or not first_shapes:
        sample = ", ".join(sorted(shapes)[:3])
        raise LatentgenError(
            "not a CompVis LDM / Stable Diffusion checkpoint: no model.diffusion_model.* and first_stage_model.* "
            f"keys (first keys: {sample})"
        )
    if any(has_prefix(shapes, p) for p in ("embedder.", "depth_model.", "noise_augmentor.")):
        raise LatentgenError("SD 2 unCLIP / depth checkpoints are not supported")
    unet = detect_unet(unet_shapes)
    low_scale = _low_scale_config(shapes, unet, sub.get("low_scale_config"))
    first_stage = _merged(detect_first_stage(first_shapes), sub.get("first_stage_config"))
    cond = sub["cond_stage_config"] if "cond_stage_config" in sub else detect_cond_stage(sub_shapes(shapes, COND_STAGE_PREFIX))
    if cond is None:
        cond = _weightless_cond_stage(unet, first_stage["params"]["embed_dim"])
    if low_scale is not None:
        unet.update(num_heads=8, legacy=False)  # as x4-upscaling.yaml says
    else:
        unet.update(official_head_layout(unet, cond.get("target") if isinstance(cond, Mapping) else None))
    if unet.get("use_spatial_transformer") and unet["model_channels"] == 320:
        unet["legacy"] = False  # as the SD / 1.45B YAMLs say; it changes no computation
    conditioning_key = _conditioning_key(unet, cond)
    family = family_of({"unet_config": {"params": unet}, "cond_stage_config": cond, "conditioning_key": conditioning_key,
                        "low_scale_config": low_scale})
    if prediction is not None or "parameterization" in overrides:
        parameterization = normalize_prediction(prediction if prediction is not None else overrides.pop("parameterization"))
    else:
        v = family == X4_UPSCALER or (family == "sd2" and wants_v_prediction(name_hint, metadata))
        parameterization = "v" if v else "eps"
    unet["image_size"] = _native_latent_size(family, parameterization, first_stage_factor(first_stage))
    unet_override = sub.get("unet_config") or {}
    if {"num_heads", "num_head_channels"} & set(unet_override.get("params", {})):
        unet.pop("num_heads", None), unet.pop("num_head_channels", None)  # a head layout replaces the guessed one
    unet_config = _merged({"target": UNET_TARGET, "params": unet}, unet_override)
    params: dict[str, Any] = {
        "timesteps": 1000,
        **_schedule_and_scale(family, first_stage),
        "conditioning_key": conditioning_key,
        "image_size": unet_config["params"]["image_size"],
        "channels": unet["out_channels"],
        "unet_config": unet_config,
        "first_stage_config": first_stage,
        "cond_stage_config": cond,
    }
    if low_scale is not None:
        params["low_scale_config"] = low_scale
    if shapes.get("scale_factor") == ():
        params["scale_factor"] = float(state_dict["scale_factor"])
    return normalize_params({**params, **overrides, "parameterization": parameterization})


def _low_scale_config(shapes: Shapes, unet: dict, override: Optional[dict]) -> Optional[dict]:
    """The noise augmentation of an x4 upscaler (whose checkpoint stores that schedule's buffers
    under `low_scale_model.`: 7 = 4 latent + 3 RGB input channels, the noise level as class label),
    or None for any other model."""
    if not has_prefix(shapes, LOW_SCALE_PREFIX):
        return None
    if unet["in_channels"] - unet["out_channels"] != 3 or not isinstance(unet.get("num_classes"), int):
        raise LatentgenError("this checkpoint has low_scale_model.* keys but not the SD 2 x4 upscaler's UNet "
                             "(4 latent + 3 image input channels, noise level as class label): not supported")
    return override or X4_LOW_SCALE_CONFIG


def normalize_prediction(prediction: str) -> str:
    value = {"epsilon": "eps", "eps": "eps", "v": "v", "v_prediction": "v"}.get(str(prediction).lower())
    if value is None:
        raise LatentgenError(f"unknown prediction type {prediction!r}; use eps or v")
    return value


def normalize_params(params: Mapping[str, Any]) -> dict:
    """An official YAML's `model.params` with CompVis' defaults filled in and `conditioning_key` resolved."""
    full = {**COMPVIS_DEFAULTS, **params}
    full["parameterization"] = normalize_prediction(full["parameterization"])
    cond = full.get("cond_stage_config")
    if full.get("conditioning_key") is None:
        full["conditioning_key"] = "concat" if full["concat_mode"] else "crossattn"
    if cond == UNCONDITIONAL:
        full["conditioning_key"] = None
    full.pop("concat_mode")
    unet = full.get("unet_config", {}).get("params", {})
    full.setdefault("image_size", unet.get("image_size", 64))
    full.setdefault("channels", unet.get("out_channels", 4))
    return full


def family_of(params: Mapping[str, Any]) -> str:
    """A short name for what the model does: sd1, sd2(-inpaint), sd2-x4-upscaler, ldm-txt2img, ldm-class,
    ldm-sr, ldm-inpaint, ldm-uncond, or autoencoder-kl / autoencoder-vq for a lone first stage."""
    if not params.get("unet_config"):
        if target_name(params["first_stage_config"]) == "AutoencoderDC":
            return "autoencoder-dc"
        vq = target_name(params["first_stage_config"]) in ("VQModel", "VQModelInterface")
        return "autoencoder-vq" if vq else "autoencoder-kl"
    if params.get("low_scale_config"):
        return X4_UPSCALER
    cond = target_name(params.get("cond_stage_config"))
    hybrid = "-inpaint" if params.get("conditioning_key") == "hybrid" else ""
    if cond == "FrozenCLIPEmbedder":
        return "sd1" + hybrid
    if cond == "FrozenOpenCLIPEmbedder":
        return "sd2" + hybrid
    if cond in ("BERTEmbedder", "MiniLMEmbedder"):
        return "ldm-txt2img"
    if cond == "ClassEmbedder" or params.get("conditioning_key") == "adm":
        return "ldm-class"
    if cond == FIRST_STAGE:
        return "ldm-inpaint"
    if params.get("conditioning_key") in ("concat", "hybrid"):
        return "ldm-sr"
    return "ldm-uncond"


# ---- the facts a loaded model carries ------------------------------------------------------

TEXT_ENCODERS = ("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder", "BERTEmbedder", "MiniLMEmbedder")


def _is_dc(first_stage_config: Mapping[str, Any]) -> bool:
    return target_name(first_stage_config) == "AutoencoderDC"


def first_stage_factor(first_stage_config: Mapping[str, Any]) -> int:
    """Downsampling factor f of a first stage: one halving per resolution level (stage) after the first."""
    params = first_stage_config["params"]
    levels = params["encoder_block_out_channels"] if _is_dc(first_stage_config) else params["ddconfig"]["ch_mult"]
    return 2 ** (len(levels) - 1)


def _latent_channels(first_stage_config: Mapping[str, Any]) -> int:
    params = first_stage_config["params"]
    return params["latent_channels"] if _is_dc(first_stage_config) else params["embed_dim"]


def _decoder_width(first_stage_config: Mapping[str, Any]) -> int:
    """Channels of the decoder's full-resolution features (what a decode's memory grows with)."""
    params = first_stage_config["params"]
    if _is_dc(first_stage_config):
        return params["decoder_block_out_channels"][0]
    return params["ddconfig"]["ch"] * max(params["ddconfig"]["ch_mult"][:2])


def _concat_layout(unet: Mapping[str, Any], latent_channels: int, conditioning_key: Optional[str]) -> Optional[str]:
    extra = unet["in_channels"] - unet["out_channels"]
    if extra == 0:
        return None
    if extra == latent_channels + 1:
        return MASK_THEN_MASKED_IMAGE if conditioning_key == "hybrid" else MASKED_IMAGE_THEN_MASK
    return LOW_RES_IMAGE


def model_spec(params: Mapping[str, Any]) -> ModelSpec:
    """The `ModelSpec` of complete `model.params` (as `detect_config` or `normalize_params` return)."""
    first_stage = params["first_stage_config"]
    common = {
        "family": family_of(params), "factor": first_stage_factor(first_stage),
        "latent_channels": _latent_channels(first_stage), "decoder_width": _decoder_width(first_stage),
        "scale_factor": float(params.get("scale_factor", 1.0)),
        "preview_projection": tuple(map(tuple, params["preview_projection"])) if params.get("preview_projection") else None,
        "default_steps": int(params["default_steps"]) if params.get("default_steps") else None,
        "default_strength": float(params["default_strength"]) if params.get("default_strength") is not None else None,
    }
    if not params.get("unet_config"):
        return ModelSpec(**common)
    unet = params["unet_config"]["params"]
    cond, key = target_name(params.get("cond_stage_config")), params.get("conditioning_key")
    conditioning = "text" if cond in TEXT_ENCODERS else "class" if cond == "ClassEmbedder" or key == "adm" else "none"
    mults = tuple(unet["channel_mult"])
    layout = UNetLayout(
        model_channels=unet["model_channels"], channel_mult=mults, num_res_blocks=unet["num_res_blocks"],
        attention_levels=frozenset(i for i in range(len(mults)) if 2**i in unet.get("attention_resolutions", ())),
        spatial_transformer=bool(unet.get("use_spatial_transformer")),
    )
    schedule = TrainingSchedule(params["beta_schedule"], int(params["timesteps"]), float(params["linear_start"]),
                                float(params["linear_end"]), float(params["cosine_s"]), bool(params["zero_terminal_snr"]))
    concat = _concat_layout(unet, common["latent_channels"], key)
    return ModelSpec(**common, parameterization=params["parameterization"], conditioning=conditioning, concat=concat,
                     native_latent=int(unet.get("image_size", 64)), unet=layout, schedule=schedule)
