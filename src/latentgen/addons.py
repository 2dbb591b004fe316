"""What users add to a loaded model: LoRA files merged into its weights, another first stage
(`--vae`), and CLIP skip. Each changes the loaded modules in place; CompVis names stay intact.

LoRA files come in two layouts, both read here:
- kohya / AUTOMATIC1111: `lora_unet_<path>.lora_down.weight`, `.lora_up.weight`, `.alpha`, with
  `<path>` the diffusers module path (or, in some files, the CompVis one) with `_` for `.`, and
  `lora_te_<path>` for the text encoder; LoCon files add the convolutions;
- diffusers / PEFT: `unet.<path>.lora_A.weight` / `.lora_B.weight` (and `text_encoder.`).
The merge is W += weight * alpha / rank * up @ down, as both tools fuse them.
"""

import re
from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .devices import pick_memory_format
from .errors import LatentgenError
from .ldm import LatentDiffusion, UNetLayout
from .loader import file_sha256, load_model, load_state_dict, read_tensors
from .models.text import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from .models.unet import Upsample

RESNET_PARTS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
TOP_LEVEL = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


def _resnet(prefix: str, rest: str) -> str:
    for ours, theirs in RESNET_PARTS.items():
        if rest == ours or rest.startswith(ours + "."):
            return f"{prefix}.{theirs}{rest[len(ours):]}"
    return f"{prefix}.{rest}"


def diffusers_unet_path(path: str, layout: UNetLayout, upsampler: bool = False) -> Optional[str]:
    """The diffusers `UNet2DConditionModel` path of a module of our (CompVis) UNet, or None."""
    for ours, theirs in TOP_LEVEL.items():
        if path == ours or path.startswith(ours + "."):
            return theirs + path[len(ours):]
    blocks = layout.num_res_blocks + 1
    match = re.fullmatch(r"(input_blocks|middle_block|output_blocks)\.(\d+)(?:\.(\d+))?(?:\.(.+))?", path)
    if match is None:
        return None
    kind, index, part, rest = match.group(1), int(match.group(2)), match.group(3), match.group(4) or ""
    part = int(part) if part is not None else None
    if kind == "middle_block":
        name = ["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"][index]
        rest = ".".join(p for p in (str(part) if part is not None else "", rest) if p)
        return _resnet(name, rest) if index != 1 else f"{name}.{rest}".rstrip(".")
    if part is None:
        return None
    if kind == "input_blocks":
        level, j = divmod(index - 1, blocks)
        if j == layout.num_res_blocks:
            return f"down_blocks.{level}.downsamplers.0.conv" + rest.removeprefix("op")
        name = f"down_blocks.{level}.resnets.{j}" if part == 0 else f"down_blocks.{level}.attentions.{j}"
    else:
        level, j = divmod(index, blocks)
        if upsampler:
            return f"up_blocks.{level}.upsamplers.0.conv" + rest.removeprefix("conv")
        name = f"up_blocks.{level}.resnets.{j}" if part == 0 else f"up_blocks.{level}.attentions.{j}"
    return _resnet(name, rest) if part == 0 else f"{name}.{rest}".rstrip(".")


Target = tuple[nn.Parameter, slice]
"""A weight a LoRA adds to, and its rows (all of them, or q, k or v of a packed projection)."""
ALL = slice(None)


def _text_names(path: str) -> list[str]:
    """The names LoRA files give a text-encoder layer (transformers path `text_model.encoder...`)."""
    names = []
    for variant in (path, path.removeprefix("text_model.")):  # transformers 5 dropped that level
        names += ["lora_te_" + variant.replace(".", "_"), "text_encoder." + variant]
    return names


def _openclip_targets(stage: FrozenOpenCLIPEmbedder) -> dict[str, Target]:
    """OpenCLIP's layers under the CLIPTextModel names diffusers converts them to (and LoRA files use):
    q/k/v are row blocks of the packed `in_proj_weight`."""
    targets: dict[str, Target] = {}
    for i, block in enumerate(stage.model.transformer.resblocks):
        width = block.attn.out_proj.in_features
        parts = {"self_attn.q_proj": (block.attn.in_proj_weight, slice(0, width)),
                 "self_attn.k_proj": (block.attn.in_proj_weight, slice(width, 2 * width)),
                 "self_attn.v_proj": (block.attn.in_proj_weight, slice(2 * width, 3 * width)),
                 "self_attn.out_proj": (block.attn.out_proj.weight, ALL),
                 "mlp.fc1": (block.mlp.c_fc.weight, ALL), "mlp.fc2": (block.mlp.c_proj.weight, ALL)}
        for part, target in parts.items():
            for name in _text_names(f"text_model.encoder.layers.{i}.{part}"):
                targets[name] = target
    return targets


def _targets(model: LatentDiffusion) -> dict[str, Target]:
    """Every name a LoRA file may use for a weight of the model -> that weight (and its rows)."""
    targets: dict[str, Target] = {}
    if model.unet is not None:
        upsamplers = {name for name, module in model.unet.named_modules() if isinstance(module, Upsample)}
        for name, module in model.unet.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            parent = name.rsplit(".", 1)[0]
            theirs = diffusers_unet_path(name, model.spec.unet, upsampler=parent in upsamplers)
            for path in {name, theirs} - {None}:
                targets["lora_unet_" + path.replace(".", "_")] = (module.weight, ALL)
                targets["unet." + path] = (module.weight, ALL)
    if isinstance(model.cond_stage, FrozenCLIPEmbedder):
        for name, module in model.cond_stage.named_modules():
            if isinstance(module, nn.Linear) and name.startswith("transformer."):
                for alias in _text_names(name.removeprefix("transformer.")):
                    targets[alias] = (module.weight, ALL)
    if isinstance(model.cond_stage, FrozenOpenCLIPEmbedder):
        targets.update(_openclip_targets(model.cond_stage))
    return targets


def read_lora(path: Union[str, Path]) -> dict[str, tuple[torch.Tensor, torch.Tensor, Optional[float]]]:
    """{module name as the file writes it: (up, down, alpha)} of a LoRA file in either layout."""
    state = load_state_dict(path)
    pairs: dict[str, dict] = {}
    for key, tensor in state.items():
        for suffix, part in ((".lora_up.weight", "up"), (".lora_down.weight", "down"), (".lora_B.weight", "up"),
                             (".lora_A.weight", "down"), (".lora.up.weight", "up"), (".lora.down.weight", "down"),
                             (".alpha", "alpha")):
            if key.endswith(suffix):
                pairs.setdefault(key[: -len(suffix)], {})[part] = tensor
                break
        else:
            raise LatentgenError(f"{path} is not a LoRA file: unexpected key {key!r}")
    lora = {}
    for name, parts in sorted(pairs.items()):
        if "up" not in parts or "down" not in parts:
            raise LatentgenError(f"{path}: LoRA module {name!r} lacks its {'up' if 'up' not in parts else 'down'} weights")
        alpha = float(parts["alpha"]) if "alpha" in parts else None
        lora[name] = (parts["up"], parts["down"], alpha)
    if not lora:
        raise LatentgenError(f"{path} holds no LoRA weights")
    return lora


def _delta(up: torch.Tensor, down: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """up @ down in the shape of the weight it adds to (Linear, 1x1 or kxk convolution)."""
    product = up.flatten(1).double() @ down.flatten(1).double()
    return product.reshape(shape) if product.numel() == shape.numel() else product


def merge_lora(model: LatentDiffusion, path: Union[str, Path], weight: float = 1.0) -> str:
    """Add a LoRA to the model's weights (UNet, and the CLIP or OpenCLIP text encoder); the file's
    12-digit sha256, AUTOMATIC1111's "Lora hashes" entry. A name the model lacks or a wrong shape is
    refused before any weight changes."""
    lora = read_lora(path)
    targets = _targets(model)
    plans = []
    for name, (up, down, alpha) in lora.items():
        if name not in targets:
            raise LatentgenError(f"{Path(path).name} names a module {model.name} lacks: {name!r}")
        parameter, rows = targets[name]
        shape = parameter[rows].shape
        delta = _delta(up, down, shape)
        if delta.shape != shape:
            raise LatentgenError(f"{Path(path).name}: {name!r} gives {list(delta.shape)}, the model's weight is "
                                 f"{list(shape)}")
        rank = down.shape[0]
        plans.append((parameter, rows, delta * (weight * (alpha if alpha is not None else rank) / rank)))
    with torch.no_grad():
        for parameter, rows, delta in plans:
            parameter[rows] += delta.to(parameter)
    return file_sha256(path)[:12]


def add_loras(model: LatentDiffusion, loras: list[tuple[Path, float]]) -> None:
    """Merge each (file, weight) and record them as AUTOMATIC1111 does (`Lora hashes: "name: hash, ..."`)."""
    entries = [f"{Path(path).stem}: {merge_lora(model, path, weight)}" for path, weight in loras]
    if entries:
        model.infotext["Lora hashes"] = ", ".join(entries)


EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")


def read_embedding(path: Union[str, Path], width: int) -> torch.Tensor:
    """The [n, width] vectors of a textual-inversion file: AUTOMATIC1111's .pt (`string_to_param`)
    or .safetensors (`emb_params`, or `clip_l` / `clip_h` / `clip_g`, the one of this width), or
    diffusers' {token: vector}."""
    content = read_tensors(path)
    if isinstance(content, dict) and isinstance(content.get("string_to_param"), dict):
        content = content["string_to_param"]
    candidates = [v for v in (content.values() if isinstance(content, dict) else [content])
                  if isinstance(v, torch.Tensor) and v.is_floating_point()]
    fitting = [v.reshape(-1, width) for v in candidates if v.shape[-1] == width]
    if len(fitting) != 1:
        widths = sorted({int(v.shape[-1]) for v in candidates}) or "none"
        raise LatentgenError(f"{Path(path).name} is not a textual-inversion embedding for a {width}-wide text "
                             f"encoder (vector widths found: {widths})")
    return fitting[0].detach().float()


def load_embeddings(model: LatentDiffusion, folder: Union[str, Path]) -> dict[str, Path]:
    """Make every embedding file in `folder` usable in prompts by its file name; {name: file}."""
    stage = model.cond_stage
    if not isinstance(stage, (FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder)):
        raise LatentgenError(f"{model.name} has no CLIP text encoder: textual-inversion embeddings do not apply")
    folder = Path(folder)
    if not folder.is_dir():
        raise LatentgenError(f"embeddings folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in EMBEDDING_SUFFIXES)
    stage.embeddings = {p.stem: read_embedding(p, stage.context_dim) for p in files}
    return {p.stem: p for p in files}


def record_embeddings(model: LatentDiffusion, files: dict[str, Path], texts: list[str]) -> None:
    """AUTOMATIC1111's `TI hashes: "name: hash, ..."` for the embeddings the prompts use."""
    used = [name for name in files if any(re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", t) for t in texts)]
    if used:
        model.infotext["TI hashes"] = ", ".join(f"{name}: {file_sha256(files[name])[:12]}" for name in used)


def set_clip_skip(model: LatentDiffusion, skip: int) -> None:
    """AUTOMATIC1111's CLIP skip: 1 reads the text encoder's last layer (as trained), 2 the one
    before, ... (the final layer norm applied); for SD 2.x counted from its penultimate layer."""
    stage = model.cond_stage
    if not isinstance(stage, (FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder)):
        raise LatentgenError(f"{model.name} has no CLIP text encoder: clip skip does not apply")
    if not 1 <= skip <= stage.layers:
        raise LatentgenError(f"clip skip must be between 1 and {stage.layers}, got {skip}")
    stage.clip_skip = skip
    model.infotext["Clip skip"] = skip if skip > 1 else None


def swap_vae(model: LatentDiffusion, path: Union[str, Path]) -> str:
    """Decode and encode with another first stage (an official VAE such as SD's ft-MSE, a bundled
    autoencoder, or a full checkpoint's first stage); it must share the latent channels and factor.
    Returns its 10-digit hash (A1111's "VAE hash")."""
    other = load_model(path)
    mine, theirs = model.spec, other.spec
    if (theirs.latent_channels, theirs.factor) != (mine.latent_channels, mine.factor):
        raise LatentgenError(f"{Path(path).name} has {theirs.latent_channels} latent channels at f={theirs.factor}; "
                             f"{model.name} needs {mine.latent_channels} at f={mine.factor}")
    reference = next(model.first_stage.parameters())
    model.first_stage = other.first_stage.to(reference.device, reference.dtype,
                                             memory_format=pick_memory_format(reference.device, reference.dtype)).eval()
    model.spec = replace(mine, decoder_width=theirs.decoder_width)
    model.infotext.update({"VAE hash": other.sha256[:10], "VAE": Path(path).name})
    return other.sha256[:10]
