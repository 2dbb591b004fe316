"""LoRA (kohya/A1111 and diffusers/PEFT files) against diffusers' load_lora_weights + fuse_lora,
the refusals, `<lora:name:weight>` tags, --vae and --clip-skip."""

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from latentgen import addons, images, tasks
from latentgen.cli import app
from latentgen.errors import LatentgenError
from latentgen.loader import load_model
from latentgen.reference import first_stage_to_diffusers, transformer_unet_to_diffusers

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402

runner = CliRunner()
RANK = 4


@pytest.fixture
def sd(tmp_path):
    path = tiny_models.official_checkpoint(tmp_path / "tiny-sd.safetensors", "sd")
    config = tiny_models.tiny_clip_config(tmp_path / "tiny-sd.yaml")
    return path, config


def load(sd):
    return tasks.prepare(load_model(sd[0], config=sd[1]), "cpu", "fp32")


def kohya_lora(model, generator: torch.Generator, text: bool = True, convs: bool = False) -> dict:
    """Random kohya-format LoRA weights in diffusers naming for every attention projection of the
    UNet (LoCon: also the ResBlock convolutions) and, with `text`, the CLIP layers' projections."""
    unet = transformer_unet_to_diffusers(model.unet, model.params["unet_config"]["params"])
    state = {}
    modules = [("lora_unet_", name, module) for name, module in unet.named_modules()
               if isinstance(module, torch.nn.Linear) and ".attn" in name
               or (convs and isinstance(module, torch.nn.Conv2d) and "resnets" in name)]
    if text:
        modules += [("lora_te_text_model_", name.removeprefix("transformer.text_model."), module)
                    for name, module in model.cond_stage.named_modules()
                    if isinstance(module, torch.nn.Linear) and "self_attn" in name]
    for prefix, name, module in modules:
        key = prefix + name.replace(".", "_")
        out_features, in_features = module.weight.shape[:2]
        kernel = module.weight.shape[2:]
        state[f"{key}.lora_down.weight"] = torch.randn(RANK, in_features, *kernel, generator=generator) * 0.1
        state[f"{key}.lora_up.weight"] = torch.randn(out_features, RANK, *(1,) * len(kernel), generator=generator) * 0.1
        state[f"{key}.alpha"] = torch.tensor(2.0)
    return state


def diffusers_pipeline(model):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = first_stage_to_diffusers(model.first_stage, model.params["first_stage_config"]["params"])
    unet = transformer_unet_to_diffusers(model.unet, model.params["unet_config"]["params"])
    text = CLIPTextModel(CLIPTextConfig(**tiny_models.TINY_CLIP, hidden_act="quick_gelu")).eval()
    state = {k.removeprefix("transformer."): v for k, v in model.cond_stage.state_dict().items()}
    if not any(k.startswith("text_model.") for k in text.state_dict()):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    text.load_state_dict(state, strict=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet, scheduler=DDIMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def outputs(unet_call, text_call, generator_seed: int = 0):
    g = torch.Generator().manual_seed(generator_seed)
    x, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    tokens = torch.randint(0, 49407, (1, 77), generator=g)
    with torch.no_grad():
        return unet_call(x, torch.tensor([500.0]), context), text_call(tokens)


@pytest.mark.slow
def test_kohya_lora_matches_diffusers_fuse_lora(sd, tmp_path):
    model = load(sd)
    lora = kohya_lora(model, torch.Generator().manual_seed(1), convs=True)  # LoCon too
    save_file(lora, str(tmp_path / "style.safetensors"))
    pipe = diffusers_pipeline(copy.deepcopy(model))  # the conversion shares tensors with the model it reads
    pipe.load_lora_weights({k: v.clone() for k, v in lora.items()})
    pipe.fuse_lora(lora_scale=0.8)
    theirs = outputs(lambda x, t, c: pipe.unet(x, t, encoder_hidden_states=c).sample,
                     lambda ids: pipe.text_encoder(ids).last_hidden_state)
    before = outputs(lambda x, t, c: model.unet(x, t, context=c), lambda ids: model.cond_stage.encode_tokens(ids))
    addons.add_loras(model, [(tmp_path / "style.safetensors", 0.8)])
    ours = outputs(lambda x, t, c: model.unet(x, t, context=c), lambda ids: model.cond_stage.encode_tokens(ids))
    for mine, reference, old in zip(ours, theirs, before):
        scale = reference.abs().max()
        assert (mine - reference).abs().max() / scale <= 1e-4
        assert (old - reference).abs().max() / scale > 1e-2  # the LoRA did change the model
    assert model.infotext["Lora hashes"].startswith("style: ") and len(model.infotext["Lora hashes"]) == 19


def test_peft_and_locon_files_merge_as_up_times_down(sd, tmp_path):
    model = load(sd)
    target = model.unet.input_blocks[1][0].in_layers[2]  # a ResBlock conv: LoCon
    attention = model.unet.input_blocks[3][1].transformer_blocks[0].attn1.to_q  # level 1: the one with attention
    g = torch.Generator().manual_seed(2)
    down, up = torch.randn(2, target.in_channels, 3, 3, generator=g), torch.randn(target.out_channels, 2, 1, 1, generator=g)
    a, b = torch.randn(3, attention.in_features, generator=g), torch.randn(attention.out_features, 3, generator=g)
    save_file({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": down,
               "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": up,
               "lora_unet_down_blocks_0_resnets_0_conv1.alpha": torch.tensor(1.0)}, str(tmp_path / "locon.safetensors"))
    save_file({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": a,
               "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": b},
              str(tmp_path / "peft.safetensors"))
    conv_before, q_before = target.weight.clone(), attention.weight.clone()
    addons.add_loras(model, [(tmp_path / "locon.safetensors", 1.0), (tmp_path / "peft.safetensors", 0.5)])
    expected_conv = conv_before + 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(conv_before.shape)  # alpha 1 / rank 2
    torch.testing.assert_close(target.weight, expected_conv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention.weight, q_before + 0.5 * b @ a, rtol=1e-5, atol=1e-6)  # PEFT: alpha = rank


def test_bad_lora_files_are_refused_with_nothing_changed(sd, tmp_path):
    model = load(sd)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    good = {"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.ones(2, 64),
            "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": torch.ones(64, 2)}
    cases = {
        "missing module": {**good, "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.ones(2, 64),
                           "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight": torch.ones(64, 2)},
        "wrong shape": {"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.ones(2, 63),
                        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": torch.ones(64, 2)},
        "not a lora": {"model.diffusion_model.out.2.weight": torch.ones(1)},
    }
    messages = {"missing module": "down_blocks_9", "wrong shape": "gives", "not a lora": "not a LoRA"}
    for name, state in cases.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(LatentgenError, match=messages[name]):
            addons.merge_lora(model, tmp_path / f"{name}.safetensors")
    (tmp_path / "truncated.safetensors").write_bytes((tmp_path / "wrong shape.safetensors").read_bytes()[:40])
    with pytest.raises(LatentgenError):
        addons.merge_lora(model, tmp_path / "truncated.safetensors")
    for key, value in model.unet.state_dict().items():
        assert torch.equal(value, before[key]), key
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"lora_unet_x.lora_down.weight": Evil()}, tmp_path / "evil.pt")
    result = runner.invoke(app, ["txt2img", "x", "--ckpt", str(sd[0]), "--config", str(sd[1]), "--steps", "1",
                                 "--lora", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "refused" in result.output and not marker.exists()
    assert not (tmp_path / "x.png").exists()


def test_lora_tags_in_prompts_and_cli_flags(sd, tmp_path):
    model = load(sd)
    (tmp_path / "loras").mkdir()
    save_file(kohya_lora(model, torch.Generator().manual_seed(3), text=False), str(tmp_path / "loras" / "style.safetensors"))
    common = ["txt2img", "--ckpt", str(sd[0]), "--config", str(sd[1]), "--steps", "2", "--seed", "1"]
    tagged = runner.invoke(app, [*common, "a cat <lora:style:0.7>", "--lora-dir", str(tmp_path / "loras"),
                                 "--out", str(tmp_path / "tag.png")])
    flagged = runner.invoke(app, [*common, "a cat", "--lora", f"{tmp_path / 'loras' / 'style.safetensors'}:0.7",
                                  "--out", str(tmp_path / "flag.png")])
    plain = runner.invoke(app, [*common, "a cat", "--out", str(tmp_path / "plain.png")])
    assert tagged.exit_code == flagged.exit_code == plain.exit_code == 0, tagged.output
    pixels = {name: np.array(images.to_pil(images.load_image(tmp_path / f"{name}.png"))) for name in ("tag", "flag", "plain")}
    np.testing.assert_array_equal(pixels["tag"], pixels["flag"])  # the tag is dropped from the text itself
    assert not np.array_equal(pixels["tag"], pixels["plain"])
    info = images.read_parameters(tmp_path / "tag.png")
    assert "<lora:style:0.7>" in info and 'Lora hashes: "style: ' in info
    missing = runner.invoke(app, [*common, "a cat <lora:nothere>", "--out", str(tmp_path / "m.png")])
    assert missing.exit_code == 1 and "<lora:nothere> not found" in missing.output


def test_vae_swap_and_clip_skip(sd, tmp_path):
    model = load(sd)
    tiny_models.autoencoder(tmp_path / "other-kl", "kl")
    tiny_models.autoencoder(tmp_path / "vq", "vq")
    z = torch.randn(1, 4, 8, 8)
    before = tasks.decode(model, z)
    addons.swap_vae(model, tmp_path / "other-kl")
    after = tasks.decode(model, z)
    assert not torch.equal(before, after) and model.infotext["VAE"] == "other-kl"
    with pytest.raises(LatentgenError, match="3 latent channels at f=4"):
        addons.swap_vae(model, tmp_path / "vq")
    tokens = model.cond_stage.tokenize(["a cat"])
    last = model.cond_stage.encode_tokens(tokens)
    addons.set_clip_skip(model, 2)
    penultimate = model.cond_stage.encode_tokens(tokens)
    text_model = model.cond_stage.transformer.text_model
    torch.testing.assert_close(penultimate, text_model.final_layer_norm(text_model.hidden_states(tokens)[-2]))
    assert not torch.equal(last, penultimate) and model.infotext["Clip skip"] == 2
    with pytest.raises(LatentgenError, match="clip skip must be between"):
        addons.set_clip_skip(model, 9)
    result = runner.invoke(app, ["txt2img", "a cat", "--ckpt", str(sd[0]), "--config", str(sd[1]), "--steps", "1",
                                 "--clip-skip", "2", "--vae", str(tmp_path / "other-kl"), "--out", str(tmp_path / "v.png")])
    assert result.exit_code == 0, result.output
    info = images.read_parameters(tmp_path / "v.png")
    assert "Clip skip: 2" in info and "VAE: other-kl" in info and "VAE hash: " in info
    bundled = runner.invoke(app, ["txt2img", "a cat", "--steps", "1", "--clip-skip", "2", "--out", str(tmp_path / "b.png")])
    assert bundled.exit_code == 1 and "no CLIP text encoder" in bundled.output


# ---- textual inversion --------------------------------------------------------------------------


def test_embeddings_in_a1111_formats_stand_for_their_vectors(sd, tmp_path):
    model = load(sd)
    stage = model.cond_stage
    token_table = stage.transformer.text_model.embeddings.token_embedding.weight
    dog, red = (token_table[stage.token_ids(word)[0]].clone() for word in ("dog", "red"))
    folder = tmp_path / "embeddings"
    folder.mkdir()
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.stack([red, dog])}, "name": "reddog",
                "step": 500}, folder / "reddog.pt")  # AUTOMATIC1111's .pt
    save_file({"emb_params": dog[None]}, str(folder / "doggo.safetensors"))
    save_file({"clip_l": dog[None], "clip_g": torch.zeros(1, 64)}, str(folder / "pair.safetensors"))  # the 32-wide one
    files = addons.load_embeddings(model, folder)
    assert sorted(files) == ["doggo", "pair", "reddog"]
    from latentgen import prompts

    for text, same in (("a doggo on grass", "a dog on grass"), ("a reddog, pair", "a red dog, dog")):
        torch.testing.assert_close(prompts.encode(stage, [text]), prompts.encode(stage, [same]), rtol=0, atol=1e-6)
    addons.record_embeddings(model, files, ["a doggo"])
    assert model.infotext["TI hashes"].startswith("doggo: ") and "reddog" not in model.infotext["TI hashes"]


def test_bad_embedding_files_are_refused(sd, tmp_path):
    model = load(sd)
    folder = tmp_path / "bad"
    folder.mkdir()
    save_file({"emb_params": torch.zeros(2, 768)}, str(folder / "sd-other.safetensors"))
    with pytest.raises(LatentgenError, match="not a textual-inversion embedding for a 32-wide"):
        addons.load_embeddings(model, folder)
    (folder / "sd-other.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"string_to_param": {"*": Evil()}}, folder / "evil.pt")
    with pytest.raises(LatentgenError, match="refused"):
        addons.load_embeddings(model, folder)
    assert not marker.exists()
    result = runner.invoke(app, ["txt2img", "x", "--steps", "1", "--embeddings", str(folder), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "no CLIP text encoder" in result.output and not (tmp_path / "x.png").exists()


def test_lora_on_the_openclip_text_encoder_matches_its_split_projections(tmp_path):
    """SD 2.x: a kohya LoRA names diffusers' split q/k/v projections of the CLIPTextModel that
    diffusers converts OpenCLIP into; merged into our packed in_proj rows, the text encoder must
    give what that CLIPTextModel gives with the same LoRA fused into its Linear layers."""
    from test_text import diffusers_openclip, randomize

    from latentgen.ldm import LatentDiffusion, ModelSpec
    from latentgen.models.text import FrozenOpenCLIPEmbedder

    ours = randomize(FrozenOpenCLIPEmbedder(width=64, layers=3, heads=4, embed_dim=32))
    theirs = diffusers_openclip(copy.deepcopy(ours), layers=3)
    model = LatentDiffusion(None, torch.nn.Identity(), ours, ModelSpec("sd2", 8, 4, 128), torch.zeros(1000))
    g = torch.Generator().manual_seed(4)
    lora, fused = {}, {}
    for name, module in theirs.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            key = "lora_te_" + ("text_model." + name.removeprefix("text_model.")).replace(".", "_")
            down, up = torch.randn(2, module.in_features, generator=g) * 0.1, torch.randn(module.out_features, 2, generator=g) * 0.1
            lora.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(1.0)})
            fused[module] = 0.5 * up @ down
    assert len(fused) == 3 * 6
    with torch.no_grad():
        for module, delta in fused.items():
            module.weight += delta
    save_file(lora, str(tmp_path / "sd2-lora.safetensors"))
    addons.merge_lora(model, tmp_path / "sd2-lora.safetensors")
    tokens = ours.tokenize(["a cat", "a photo of a red heart"])
    with torch.no_grad():
        mine = ours.encode_tokens(tokens)
        reference = theirs.final_layer_norm(theirs(input_ids=tokens, output_hidden_states=True).hidden_states[-2])
    assert (mine - reference).abs().max() / reference.abs().max() <= 1e-4
