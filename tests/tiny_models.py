"""Tiny random-weight model folders in the bundled layout (model.safetensors + config.json)."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from latentgen.models.autoencoder import AutoencoderKL, VQModel
from latentgen.models.unet import UNetModel

KL_F8 = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
         "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
VQ_F4 = {"double_z": False, "z_channels": 3, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
         "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


def _unet_params(in_channels: int, out_channels: int, context_dim=None) -> dict:
    params = {"image_size": 8, "in_channels": in_channels, "out_channels": out_channels, "model_channels": 32,
              "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 16}
    if context_dim:
        params.update(use_spatial_transformer=True, context_dim=context_dim, transformer_depth=1, legacy=False)
    return params


def _randomise(module: torch.nn.Module, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return module.state_dict()


def _save(folder: Path, state: dict, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def autoencoder(folder: Path, kind: str = "vq") -> Path:
    if kind == "vq":
        model, config = VQModel(VQ_F4, n_embed=64, embed_dim=3), {"model": {
            "target": "ldm.models.autoencoder.VQModel", "params": {"ddconfig": VQ_F4, "n_embed": 64, "embed_dim": 3}}}
    else:
        model, config = AutoencoderKL(KL_F8, embed_dim=4), {"model": {
            "target": "ldm.models.autoencoder.AutoencoderKL", "params": {"ddconfig": KL_F8, "embed_dim": 4}}}
    return _save(folder, _randomise(model, 1), config)


def diffusion_model(folder: Path, task: str) -> Path:
    """task: "txt2img" (MiniLM text, KL f8), "inpaint" (VQ f4, masked image + mask concat), "upscale" (VQ f4, low-res concat)."""
    if task == "txt2img":
        first, first_cfg = AutoencoderKL(KL_F8, embed_dim=4), {
            "target": "ldm.models.autoencoder.AutoencoderKL", "params": {"ddconfig": KL_F8, "embed_dim": 4}}
        unet_params, extra = _unet_params(4, 4, context_dim=384), {"conditioning_key": "crossattn", "cond_stage": "minilm"}
    else:
        first, first_cfg = VQModel(VQ_F4, n_embed=64, embed_dim=3), {
            "target": "ldm.models.autoencoder.VQModelInterface", "params": {"ddconfig": VQ_F4, "n_embed": 64, "embed_dim": 3}}
        unet_params = _unet_params(7 if task == "inpaint" else 6, 3)
        cond = "__is_first_stage__" if task == "inpaint" else {"target": "torch.nn.Identity"}  # as training exports
        extra = {"conditioning_key": "concat", "cond_stage_config": cond}
    unet = UNetModel(**unet_params)
    state = {f"model.diffusion_model.{k}": v for k, v in _randomise(unet, 2).items()}
    state.update({f"first_stage_model.{k}": v for k, v in _randomise(first, 3).items()})
    config = {"unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params},
              "first_stage_config": first_cfg, "linear_start": 0.0015, "linear_end": 0.0205, "timesteps": 1000,
              "scale_factor": 1.0, "parameterization": "eps", **extra}
    return _save(folder, state, config)


TINY_CLIP = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2, "max_position_embeddings": 77}


def official_checkpoint(path: Path, kind: str, n_classes: int = 11) -> Path:
    """A single checkpoint file in the official CompVis key layout, at tiny widths: safetensors, or a
    plain torch pickle when `path` ends in .ckpt.

    kind: "cin" (class-conditional like cin256-v2: ClassEmbedder with `n_classes` - 1 classes and a
    null class, cross-attention, VQ f4) or "sd-inpaint" (SD 1.x inpainting: 9-channel hybrid UNet,
    CLIP text, KL f8; its CLIP is tiny, so loading needs the `cond_stage_config` of `TINY_CLIP` as
    --config).
    """
    from latentgen.models.text import ClassEmbedder, FrozenCLIPEmbedder

    if kind == "cin":
        unet, first, cond = UNetModel(**_unet_params(3, 3, context_dim=32)), VQModel(VQ_F4, n_embed=64, embed_dim=3), \
            ClassEmbedder(32, n_classes=n_classes)
    else:
        in_channels = 9 if kind == "sd-inpaint" else 4
        unet, first, cond = UNetModel(**_unet_params(in_channels, 4, context_dim=32)), \
            AutoencoderKL(KL_F8, embed_dim=4), FrozenCLIPEmbedder(TINY_CLIP)
    state = {f"model.diffusion_model.{k}": v for k, v in _randomise(unet, 4).items()}
    state.update({f"first_stage_model.{k}": v for k, v in _randomise(first, 5).items()})
    state.update({f"cond_stage_model.{k}": v for k, v in _randomise(cond, 6).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".ckpt":
        torch.save({"state_dict": state}, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def tiny_clip_config(path: Path) -> Path:
    """The partial config that tells the loader the tiny CLIP's sizes (everything else is detected)."""
    path.write_text(json.dumps({"cond_stage_config": {
        "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder", "params": {"config": TINY_CLIP}}}))
    return path


def lora_for(checkpoint: Path, path: Path, rank: int = 2) -> Path:
    """A random kohya-format LoRA for the "sd" official checkpoint: its first transformer's q
    projection (diffusers naming) and a CLIP layer's q projection."""
    from safetensors.torch import load_file

    state = load_file(str(checkpoint))
    targets = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q":
               state["model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight"].shape,
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
               state["cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"].shape}
    generator = torch.Generator().manual_seed(9)
    lora = {}
    for name, (out_features, in_features) in targets.items():
        lora[f"{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * 0.1
        lora[f"{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.1
        lora[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(lora, str(path))
    return path
