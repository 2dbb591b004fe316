"""Our CompVis-layout networks as diffusers models holding the very same tensors: the reference
that the parity tests and `latentgen bench` compare against.

diffusers is optional (a test extra) and imported only inside these functions. Transformer UNets
and KL/VQ first stages are converted by diffusers' own single-file utilities; transformer-free
UNets (LDM inpainting, super-resolution, LSUN, CelebA, our concat defaults) by a mapping of our
own into `UNet2DModel`, as diffusers ships that one only in a conversion script.
"""

import re

import torch
from torch import nn

from .models import adopt

PREFIX = "model.diffusion_model."


def unet_to_diffusers(unet: nn.Module, params: dict) -> nn.Module:
    """A diffusers UNet2DConditionModel (transformer UNets) or UNet2DModel (the others) holding
    `unet`'s weights; `params` is the UNet's CompVis `unet_config.params`."""
    if params.get("use_spatial_transformer"):
        return transformer_unet_to_diffusers(unet, params)
    return plain_unet_to_diffusers(unet, params)


# ---- transformer UNets ---------------------------------------------------------------------------


def single_file_gaps(params: dict) -> dict:
    """Hyper-parameters that diffusers' single-file config reader leaves out (it targets the SD YAMLs)."""
    widths = [params["model_channels"] * m for m in params["channel_mult"]]
    gaps = {}
    if params.get("num_head_channels", -1) != -1 and not params.get("use_linear_in_transformer"):
        gaps["attention_head_dim"] = [w // params["num_head_channels"] for w in widths]  # a head count
    if params.get("use_scale_shift_norm"):
        gaps["resnet_time_scale_shift"] = "scale_shift"
    return gaps


def transformer_unet_to_diffusers(unet: nn.Module, params: dict) -> nn.Module:
    """UNet2DConditionModel, through diffusers' single-file utilities."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    checkpoint = {PREFIX + k: v for k, v in unet.state_dict().items()}
    original = {"model": {"params": {"unet_config": {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    config = {**create_unet_diffusers_config_from_ldm(original, checkpoint), **single_file_gaps(params)}
    if config.get("only_cross_attention") is None:  # CompVis' "not set" is diffusers' default
        config.pop("only_cross_attention", None)
    return adopt(lambda: UNet2DConditionModel(**config), convert_ldm_unet_checkpoint(checkpoint, config))


# ---- transformer-free UNets ----------------------------------------------------------------------


def plain_unet_config(params: dict) -> dict:
    """UNet2DModel hyper-parameters of a transformer-free CompVis UNet (heads are set after loading)."""
    widths = [params["model_channels"] * m for m in params["channel_mult"]]
    attends = [2**i in params["attention_resolutions"] for i in range(len(widths))]
    updown = params.get("resblock_updown", False)
    plain = "Resnet{}sample" if updown else "{}"
    return dict(sample_size=params["image_size"], in_channels=params["in_channels"],
                out_channels=params["out_channels"], block_out_channels=widths,
                layers_per_block=params["num_res_blocks"],
                down_block_types=["AttnDownBlock2D" if a else plain.format("Down") + "Block2D" for a in attends],
                up_block_types=["AttnUpBlock2D" if a else plain.format("Up") + "Block2D" for a in attends[::-1]],
                downsample_type="resnet" if updown else "conv", upsample_type="resnet" if updown else "conv",
                attention_head_dim=8, attn_norm_num_groups=32, num_class_embeds=params.get("num_classes"),
                resnet_time_scale_shift="scale_shift" if params.get("use_scale_shift_norm") else "default")


def legacy_attention_heads(channels: int, params: dict, upsampling: bool) -> int:
    """Heads of an openaimodel AttentionBlock, by the CompVis rules (derived here a second time, on
    purpose, rather than read from our module)."""
    if params.get("num_head_channels", -1) != -1:
        return channels // params["num_head_channels"]
    if not params.get("legacy", True):
        return channels // (channels // params["num_heads"])
    upsample_heads = params.get("num_heads_upsample", -1)
    return upsample_heads if upsampling and upsample_heads != -1 else params["num_heads"]


def split_qkv(qkv: torch.Tensor, heads: int, new_order: bool) -> tuple[torch.Tensor, ...]:
    """The fused qkv conv1d weight or bias as separate q, k, v (legacy order: heads outermost)."""
    width = qkv.shape[0] // 3
    if new_order:
        return qkv.reshape(3, width, -1).squeeze(-1).unbind(0)
    return qkv.reshape(heads, 3, width // heads, -1).transpose(0, 1).reshape(3, width, -1).squeeze(-1).unbind(0)


def _plain_prefixes(state: dict, levels: int, per_level: int) -> dict[str, str]:
    """CompVis module prefix -> diffusers module prefix, block by block."""
    prefixes = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
                "label_emb": "class_embedding", "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out",
                "out.2": "conv_out", "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
                "middle_block.2": "mid_block.resnets.1"}
    block = 1
    for level in range(levels):
        for j in range(per_level):
            prefixes[f"input_blocks.{block}.0"] = f"down_blocks.{level}.resnets.{j}"
            prefixes[f"input_blocks.{block}.1"] = f"down_blocks.{level}.attentions.{j}"
            block += 1
        if level < levels - 1:
            prefixes[f"input_blocks.{block}.0"] = f"down_blocks.{level}.downsamplers.0"
            block += 1
    for block in range(levels * (per_level + 1)):
        up, j = divmod(block, per_level + 1)
        prefixes[f"output_blocks.{block}.0"] = f"up_blocks.{up}.resnets.{j}"
        attends = f"output_blocks.{block}.1.qkv.weight" in state
        if attends:
            prefixes[f"output_blocks.{block}.1"] = f"up_blocks.{up}.attentions.{j}"
        prefixes[f"output_blocks.{block}.{1 + attends}"] = f"up_blocks.{up}.upsamplers.0"
    return prefixes


def plain_unet_to_diffusers(unet: nn.Module, params: dict) -> nn.Module:
    """UNet2DModel: ResBlocks through diffusers' resnet renamer, legacy attention split into q/k/v."""
    from diffusers import UNet2DModel
    from diffusers.loaders.single_file_utils import update_unet_resnet_ldm_to_diffusers
    from diffusers.models.attention_processor import Attention

    state = unet.state_dict()
    prefixes = _plain_prefixes(state, len(params["channel_mult"]), params["num_res_blocks"])

    def diffusers_prefix(key: str) -> tuple[str, str]:
        parts = key.split(".")
        return next((prefixes[".".join(parts[:n])], ".".join(parts[n:])) for n in (3, 2, 1)
                    if ".".join(parts[:n]) in prefixes)

    converted = {}
    for key, value in state.items():
        new_prefix, rest = diffusers_prefix(key)
        if rest.startswith("qkv."):
            heads = legacy_attention_heads(value.shape[0] // 3, params, new_prefix.startswith("up_blocks"))
            for name, part in zip("qkv", split_qkv(value, heads, params.get("use_new_attention_order", False))):
                converted[f"{new_prefix}.to_{name}.{rest[4:]}"] = part
        elif rest.startswith(("norm.", "proj_out.")):
            module = "group_norm" if rest.startswith("norm.") else "to_out.0"
            converted[f"{new_prefix}.{module}.{rest.split('.')[-1]}"] = value.squeeze(-1)
        elif rest.startswith("op."):
            converted[f"{new_prefix}.conv.{rest[3:]}"] = value
        else:
            update_unet_resnet_ldm_to_diffusers([key], converted, state, {"old": key[:-len(rest)], "new": new_prefix + "."})
    reference = adopt(lambda: UNet2DModel(**plain_unet_config(params)), converted)
    for name, module in reference.named_modules():
        if isinstance(module, Attention):
            channels = module.to_q.in_features
            module.heads = legacy_attention_heads(channels, params, name.startswith("up_blocks"))
            module.scale = (channels // module.heads) ** -0.5
    return reference


# ---- first stages --------------------------------------------------------------------------------


def _attention_levels(ddconfig: dict) -> list[int]:
    """Which encoder levels (== decoder `up` indices) hold attention blocks, as CompVis decides."""
    if ddconfig.get("attn_type", "vanilla") == "none":
        return []
    return [i for i in range(len(ddconfig["ch_mult"])) if ddconfig["resolution"] // 2**i in ddconfig["attn_resolutions"]]


def _remap_level_attention(converted: dict, num_levels: int) -> None:
    """diffusers' VAE conversion knows only mid-block attention; it leaves per-level `attn` keys as they are."""
    from diffusers.loaders.single_file_utils import update_vae_attentions_ldm_to_diffusers

    leftovers = [k for k in converted if re.match(r"(encoder\.down|decoder\.up)\.\d+\.attn\.", k)]
    original = {k: converted.pop(k) for k in leftovers}
    for key in leftovers:
        part, level, index = re.match(r"(encoder\.down|decoder\.up)\.(\d+)\.attn\.(\d+)\.", key).groups()
        new_level = int(level) if part == "encoder.down" else num_levels - 1 - int(level)
        block = "down_blocks" if part == "encoder.down" else "up_blocks"
        mapping = {"old": f"{part}.{level}.attn.{index}",
                   "new": f"{part.split('.')[0]}.{block}.{new_level}.attentions.{index}"}
        update_vae_attentions_ldm_to_diffusers([key], converted, original, mapping)


def first_stage_to_diffusers(first_stage: nn.Module, params: dict) -> nn.Module:
    """A diffusers AutoencoderKL, VQModel or AutoencoderDC holding `first_stage`'s weights; `params`
    is the first stage's `first_stage_config.params` (CompVis': ddconfig, embed_dim, and n_embed for
    VQ; a DC-AE's are diffusers' own config, as its keys are)."""
    import inspect

    from diffusers import AutoencoderDC, AutoencoderKL, VQModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    state = first_stage.state_dict()
    if "ddconfig" not in params:
        accepted = inspect.signature(AutoencoderDC).parameters
        return adopt(lambda: AutoencoderDC(**{k: v for k, v in params.items() if k in accepted}), state)
    ddconfig = params["ddconfig"]
    original = {"model": {"params": {"first_stage_config": {"params": params}}}}
    config = create_vae_diffusers_config_from_ldm(original, state, image_size=ddconfig["resolution"])
    levels, attention = len(ddconfig["ch_mult"]), _attention_levels(ddconfig)
    config["down_block_types"] = [("Attn" if i in attention else "") + "DownEncoderBlock2D" for i in range(levels)]
    config["up_block_types"] = [("Attn" if levels - 1 - i in attention else "") + "UpDecoderBlock2D"
                                for i in range(levels)]
    config["mid_block_add_attention"] = ddconfig.get("attn_type", "vanilla") != "none"
    converted = convert_ldm_vae_checkpoint(state, config)
    _remap_level_attention(converted, levels)
    if "quantize.embedding.weight" not in state:
        return adopt(lambda: AutoencoderKL(**config), converted)
    del config["scaling_factor"]
    converted["quantize.embedding.weight"] = state["quantize.embedding.weight"]
    return adopt(lambda: VQModel(**config, num_vq_embeddings=params["n_embed"], vq_embed_dim=params["embed_dim"]),
                 converted)
