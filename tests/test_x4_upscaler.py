"""The SD 2 x4 upscaler (Stability-AI x4-upscaling.yaml, `LatentUpscaleDiffusion`): detection,
loading, the noise augmentation of the low-res image, and the UNet against diffusers' upscaler UNet
(UNet2DConditionModel with num_class_embeds=1000, the noise level as class label), on a tiny
random-weight checkpoint in the official key layout; then `upscale` and the CLI end to end."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from latentgen import detect, images, tasks
from latentgen.cli import app
from latentgen.errors import LatentgenError
from latentgen.loader import load_model, load_state_dict
from latentgen.models.autoencoder import AutoencoderKL
from latentgen.models.text import FrozenOpenCLIPEmbedder
from latentgen.models.unet import UNetModel
from latentgen.reference import transformer_unet_to_diffusers

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402
from test_detect import official_shapes  # noqa: E402
from test_unet import relative_error  # noqa: E402

runner = CliRunner()

# x4-upscaling.yaml's model.params, at full size.
X4_UNET = dict(use_checkpoint=True, num_classes=1000, image_size=128, in_channels=7, out_channels=4, model_channels=256,
               attention_resolutions=[2, 4, 8], num_res_blocks=2, channel_mult=[1, 2, 2, 4],
               disable_self_attentions=[True, True, True, False], disable_middle_self_attn=False, num_heads=8,
               use_spatial_transformer=True, transformer_depth=1, context_dim=1024, legacy=False,
               use_linear_in_transformer=True)
X4_VAE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4],
              num_res_blocks=2, attn_resolutions=[], dropout=0.0)
X4_YAML = {
    "parameterization": "v", "linear_start": 0.0001, "linear_end": 0.02, "timesteps": 1000, "scale_factor": 0.08333,
    "low_scale_config": {"target": "ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation",
                         "params": {"noise_schedule_config": {"linear_start": 0.0001, "linear_end": 0.02},
                                    "max_noise_level": 350}},
    "unet_config": {"target": detect.UNET_TARGET, "params": X4_UNET},
    "first_stage_config": {"target": detect.KL_TARGET, "params": {"embed_dim": 4, "ddconfig": X4_VAE}},
    "cond_stage_config": {"target": detect.OPENCLIP_TARGET, "params": {"freeze": True, "layer": "penultimate"}},
}

# The same structure at tiny widths; context 48 differs from every level's width, so that
# self-attention replaced by cross-attention (levels 1 and 2) shows in the weights' shapes.
TINY_UNET = {**X4_UNET, "image_size": 16, "model_channels": 32, "context_dim": 48, "use_checkpoint": False}
TINY_VAE = {**X4_VAE, "ch": 32, "num_res_blocks": 1}
TINY_OPENCLIP = {"width": 48, "layers": 2, "heads": 4, "embed_dim": 32}


def low_scale_buffers() -> dict:
    """CompVis AbstractLowScaleModel.register_schedule's buffers: numpy float64, stored as float32."""
    betas = np.linspace(1e-4**0.5, 2e-2**0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    buffers = {
        "betas": betas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": np.append(1.0, alphas_cumprod[:-1]),
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
    }
    return {f"low_scale_model.{k}": torch.tensor(v, dtype=torch.float32) for k, v in buffers.items()}


def randomised_state(module: torch.nn.Module, seed: int) -> dict:
    """Random weights at a scale that keeps activations O(1) (zero-initialised output layers too)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name == "label_emb.weight":
                p.copy_(noise)
            elif p.ndim > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_((1 if name.endswith("weight") else 0) + 0.05 * noise)
    return module.state_dict()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint, config) of a tiny x4 upscaler saved as the official checkpoint would be."""
    root = tmp_path_factory.mktemp("x4")
    parts = {detect.UNET_PREFIX: randomised_state(UNetModel(**TINY_UNET), 1),
             detect.FIRST_STAGE_PREFIX: randomised_state(AutoencoderKL(TINY_VAE, embed_dim=4), 2),
             detect.COND_STAGE_PREFIX: randomised_state(FrozenOpenCLIPEmbedder(**TINY_OPENCLIP), 3)}
    state = {prefix + k: v for prefix, part in parts.items() for k, v in part.items()}
    state.update(low_scale_buffers())
    state.update(ddpm_buffers())
    path = root / "x4-upscaler-ema.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    config = {"cond_stage_config": {"target": detect.OPENCLIP_TARGET, "params": {**TINY_OPENCLIP, "layer": "penultimate"}}}
    return path, config


def ddpm_buffers() -> dict:
    """A few of LatentDiffusion's own schedule buffers, which official checkpoints also carry."""
    betas = torch.linspace(1e-4**0.5, 2e-2**0.5, 1000, dtype=torch.float64) ** 2
    return {"betas": betas.float(), "alphas_cumprod": torch.cumprod(1 - betas, 0).float(), "logvar": torch.zeros(1000)}


def photo(path: Path, size=(20, 12), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def pixels(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


# ---- detection ------------------------------------------------------------------------------


def test_official_x4_upscaler_shapes_give_its_yaml():
    """Shapes of the full-size model (built on meta from x4-upscaling.yaml) detect back to that YAML."""
    shapes = official_shapes(X4_YAML)
    shapes.update({k: tuple(v.shape) for k, v in low_scale_buffers().items()})
    got = detect.detect_config(shapes, "x4-upscaler-ema.ckpt")
    assert detect.family_of(got) == "sd2-x4-upscaler"
    for key in ("parameterization", "linear_start", "linear_end", "timesteps", "scale_factor", "low_scale_config",
                "first_stage_config", "cond_stage_config"):
        assert got[key] == X4_YAML[key], key
    assert got["conditioning_key"] == "hybrid-adm"  # the YAML's: concat + cross-attention + y
    unet = got["unet_config"]["params"]
    want = {k: v for k, v in X4_UNET.items() if k not in ("use_checkpoint", "disable_self_attentions",
                                                          "disable_middle_self_attn", "attention_resolutions")}
    assert {k: unet[k] for k in want} == want
    assert sorted(unet["attention_resolutions"]) == [2, 4, 8]
    assert unet["disable_self_attentions"][1:] == [True, True, False]  # level 0 has no attention: its flag is moot
    assert not unet.get("disable_middle_self_attn", False)


def test_low_scale_keys_without_an_upscaler_unet_are_refused():
    shapes = official_shapes(X4_YAML)
    shapes.update({k: tuple(v.shape) for k, v in low_scale_buffers().items()})
    shapes[detect.UNET_PREFIX + "input_blocks.0.0.weight"] = (256, 4, 3, 3)
    with pytest.raises(LatentgenError, match="low_scale_model"):
        detect.detect_config(shapes, "odd.ckpt")


def test_tiny_checkpoint_is_detected_and_loaded(tiny):
    path, config = tiny
    model = load_model(path, config)
    assert model.family == "sd2-x4-upscaler" and model.parameterization == "v"
    assert (model.spec.conditioning, model.spec.concat) == ("text", "low-res-image") and model.scale_factor == 0.08333
    params = model.params["unet_config"]["params"]
    assert params["disable_self_attentions"] == [False, True, True, False] and params["num_heads"] == 8
    assert model.unet.label_emb.weight.shape == (1000, 4 * 32)
    # the low_scale_model.* buffers are accepted; the schedule rebuilt from low_scale_config equals them
    stored = load_state_dict(path)
    assert model.noise_augmentation.max_noise_level == 350
    torch.testing.assert_close(model.noise_augmentation.alphas_cumprod.float(), stored["low_scale_model.alphas_cumprod"],
                               rtol=0, atol=0)
    torch.testing.assert_close(model.alphas_cumprod.float(), stored["alphas_cumprod"], rtol=0, atol=0)
    for key, value in model.unet.state_dict().items():
        assert torch.equal(value, stored[detect.UNET_PREFIX + key]), key


def test_unknown_low_scale_keys_are_still_unexpected(tiny, tmp_path):
    path, config = tiny
    state = load_state_dict(path)
    state["low_scale_model.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "x4-extra.safetensors"))
    with pytest.raises(LatentgenError, match="unexpected key.*low_scale_model.weight"):
        load_model(tmp_path / "x4-extra.safetensors", config)


# ---- parity ---------------------------------------------------------------------------------


@torch.no_grad()
def test_unet_matches_diffusers_upscaler_unet_with_noise_level_class_labels(tiny):
    """The loaded UNet against diffusers' UNet2DConditionModel built by its single-file utilities from
    the same weights (num_class_embeds=1000, only_cross_attention per level, 8 heads, linear projections)."""
    model = load_model(*tiny)
    theirs = transformer_unet_to_diffusers(model.unet, model.params["unet_config"]["params"])
    assert theirs.config.num_class_embeds == 1000 and theirs.config.in_channels == 7
    assert list(theirs.config.only_cross_attention) == [False, True, True, False]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 16, 24, generator=generator)
    t = torch.tensor([999.0, 321.0])
    context = model.cond_stage(["a photo of a cat", ""])
    noise_level = torch.tensor([20, 350])
    ours = model.unet(x, t, context, noise_level)
    error = relative_error(ours, theirs(x, t, encoder_hidden_states=context, class_labels=noise_level).sample)
    assert error <= 1e-4, error
    other_level = model.unet(x, t, context, torch.tensor([0, 100]))
    assert relative_error(other_level, ours) > 1e-2  # the noise level does reach the UNet


def test_noise_augmentation_is_compvis_q_sample(tiny):
    """NoiseAugmentation against CompVis' ImageConcatWithNoiseAugmentation computed by hand from the
    float32 buffers the checkpoint stores, and against diffusers' low_res_scheduler.add_noise."""
    model = load_model(*tiny)
    stored = load_state_dict(tiny[0])
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 8, 12, generator=generator) * 2 - 1
    noise = torch.randn(image.shape, generator=generator)
    low_res_scheduler = DDPMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="scaled_linear")
    for level in (0, 20, 350):
        ours = model.noise_augmentation(image, level, noise)
        compvis = (stored["low_scale_model.sqrt_alphas_cumprod"][level] * image
                   + stored["low_scale_model.sqrt_one_minus_alphas_cumprod"][level] * noise)
        torch.testing.assert_close(ours, compvis, rtol=0, atol=1e-6)
        diffusers = low_res_scheduler.add_noise(image, noise, torch.tensor([level]))
        torch.testing.assert_close(ours, diffusers, rtol=0, atol=1e-5)  # diffusers builds its betas in float32


# ---- upscale --------------------------------------------------------------------------------


def test_upscale_feeds_the_unet_augmented_image_noise_level_and_both_prompts(tiny, monkeypatch):
    model = load_model(*tiny)
    low = torch.rand(1, 3, 12, 20, generator=torch.Generator().manual_seed(2)) * 2 - 1
    seen = []
    real_forward = UNetModel.forward

    def spy(unet, x, timesteps, context=None, y=None):
        seen.append((x.clone(), context.clone(), y.clone()))
        return real_forward(unet, x, timesteps, context, y)

    monkeypatch.setattr(UNetModel, "forward", spy)
    options = tasks.Sampling(steps=2, scale=9.0, seed=7)
    high = tasks.upscale(model, low, options, prompt="a cat", negative="blurry", noise_level=30)
    assert high.shape == (1, 3, 48, 80) and high.abs().max() <= 1
    x, context, y = seen[0]
    assert x.shape == (2, 7, 16, 24)  # guidance batched; 12x20 padded to multiples of 8 (the UNet's 3 halvings)
    assert y.tolist() == [30, 30]
    want_context = model.cond_stage(["blurry", "a cat"])
    torch.testing.assert_close(context, want_context)
    generator = torch.Generator().manual_seed(7)
    padded = images.pad_to_multiple(low, 8)[0]
    noise = torch.randn(padded.shape, generator=generator)
    x_T = torch.randn(1, 4, 16, 24, generator=generator)
    want = model.noise_augmentation(padded, 30, noise)
    torch.testing.assert_close(x[:, 4:], torch.cat([want, want]), rtol=0, atol=0)
    torch.testing.assert_close(x[:1, :4], x_T, rtol=0, atol=0)  # DDIM's first input is x_T itself


def diffusers_upscale_pipeline(model) -> StableDiffusionUpscalePipeline:
    """diffusers' upscale pipeline over the same weights (UNet and VAE through its single-file
    conversion), DDIM with CompVis' timesteps, v-prediction; no text encoder (embeddings are passed)."""
    unet = transformer_unet_to_diffusers(model.unet, model.params["unet_config"]["params"])
    checkpoint = {detect.FIRST_STAGE_PREFIX + k: v for k, v in model.first_stage.state_dict().items()}
    vae_config = create_vae_diffusers_config_from_ldm({"model": {"params": model.params}}, checkpoint,
                                                      scaling_factor=model.scale_factor)
    vae = DiffusersAutoencoderKL(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, vae_config))
    schedule = {"beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "scaled_linear"}
    scheduler = DDIMScheduler(**schedule, prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1,
                              clip_sample=False)
    pipe = StableDiffusionUpscalePipeline(vae=vae.eval(), text_encoder=None, tokenizer=None, unet=unet,
                                          low_res_scheduler=DDPMScheduler(**schedule), scheduler=scheduler,
                                          max_noise_level=350)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def test_upscale_matches_diffusers_upscale_pipeline(tiny):
    """Same seed, prompt, negative prompt, guidance 9, noise level 30, 4 DDIM steps: the same image
    (one generator draws the augmentation noise, then x_T, in both)."""
    model = load_model(*tiny)
    low = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    ours = tasks.upscale(model, low, tasks.Sampling(steps=4, scale=9.0, seed=7), prompt="a cat",
                             negative="blurry", noise_level=30)
    theirs = diffusers_upscale_pipeline(model)(
        prompt_embeds=model.cond_stage(["a cat"]), negative_prompt_embeds=model.cond_stage(["blurry"]),
        image=(low + 1) / 2, num_inference_steps=4, guidance_scale=9.0, noise_level=30,
        generator=torch.Generator().manual_seed(7), output_type="pt").images
    assert ours.shape == theirs.shape == (1, 3, 64, 96)
    error = ((ours + 1) / 2 - theirs).abs().max().item()
    assert error <= 1e-4, error


def test_upscale_is_4x_deterministic_and_tiled(tiny):
    model = load_model(*tiny)
    low = torch.rand(1, 3, 12, 20, generator=torch.Generator().manual_seed(3)) * 2 - 1
    options = tasks.Sampling(steps=2, scale=9.0, seed=5)
    first = tasks.upscale(model, low, options, prompt="x")
    assert first.shape == (1, 3, 48, 80)
    assert torch.equal(first, tasks.upscale(model, low, options, prompt="x"))
    other_seed = tasks.upscale(model, low, tasks.Sampling(steps=2, scale=9.0, seed=6), prompt="x")
    other_level = tasks.upscale(model, low, options, prompt="x", noise_level=300)
    assert not torch.equal(first, other_seed) and not torch.equal(first, other_level)
    tiled = tasks.upscale(model, low, options, prompt="x", tile=16)
    assert tiled.shape == first.shape and torch.isfinite(tiled).all()
    for bad in (-1, 351):
        with pytest.raises(LatentgenError, match="between 0 and 350"):
            tasks.upscale(model, low, options, noise_level=bad)


def test_cli_upscale_with_the_x4_upscaler(tiny, tmp_path):
    path, config = tiny
    config_file = tmp_path / "tiny-openclip.json"
    config_file.write_text(json.dumps(config))
    source = photo(tmp_path / "low.png")
    common = ["upscale", source, "--ckpt", path, "--config", config_file, "--steps", 2, "--device", "cpu",
              "-p", "a cat", "--negative", "blurry"]
    first = runner.invoke(app, [str(a) for a in [*common, "--out", tmp_path / "a.png"]])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, [str(a) for a in [*common, "--out", tmp_path / "b.png"]])
    assert again.exit_code == 0, again.output
    assert pixels(tmp_path / "a.png").shape == (48, 80, 3)
    np.testing.assert_array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    info = images.read_parameters(tmp_path / "a.png")
    assert "CFG scale: 9," in info and "Negative prompt: blurry" in info and "Noise level: 20" in info
    level = runner.invoke(app, [str(a) for a in [*common, "--noise-level", 200, "--scale", 1,
                                                 "--out", tmp_path / "c.png"]])
    assert level.exit_code == 0, level.output
    assert not np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "c.png"))
    assert "Noise level: 200" in images.read_parameters(tmp_path / "c.png")
    refused = runner.invoke(app, [str(a) for a in [*common, "--noise-level", 351, "--out", tmp_path / "d.png"]])
    assert refused.exit_code == 1 and "between 0 and 350" in refused.output and "Traceback" not in refused.output


def test_noise_level_is_refused_for_ldm_sr(tmp_path):
    folder = tiny_models.diffusion_model(tmp_path / "sr", "upscale")
    source = photo(tmp_path / "low.png", (8, 8))
    result = runner.invoke(app, ["upscale", str(source), "--ckpt", str(folder), "--noise-level", "20",
                                 "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "SD 2 x4" in result.output
    for option in (["--scale", "7"], ["--prompt", "a cat"], ["--negative", "blurry"]):
        result = runner.invoke(app, ["upscale", str(source), "--ckpt", str(folder), *option, "--out", str(tmp_path / "x.png")])
        assert result.exit_code == 1 and "not text-conditional" in result.output, option
    assert not (tmp_path / "x.png").exists()
