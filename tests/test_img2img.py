"""img2img (SDEdit) and the hires fix: parity with diffusers' StableDiffusionImg2ImgPipeline on
random weights, the strength ends, masks, and the CLI with the bundled model."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from latentgen import images, tasks
from latentgen.cli import app
from latentgen.loader import load_model
from latentgen.reference import first_stage_to_diffusers, transformer_unet_to_diffusers

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny SD 1.x single-file checkpoint (4-channel UNet, tiny CLIP, KL f8), loaded."""
    root = tmp_path_factory.mktemp("sd")
    path = tiny_models.official_checkpoint(root / "tiny-sd.safetensors", "sd")
    config = tiny_models.tiny_clip_config(root / "tiny-sd.yaml")
    return path, config, tasks.prepare(load_model(path, config=config), "cpu", "fp32")


def photo(shape=(1, 3, 64, 96), seed=1) -> torch.Tensor:
    coarse = torch.rand(shape[0], 3, shape[2] // 16, shape[3] // 16, generator=torch.Generator().manual_seed(seed))
    return (torch.nn.functional.interpolate(coarse, size=shape[2:], mode="bicubic") * 2 - 1).clamp(-1, 1)


@torch.no_grad()
def test_img2img_matches_diffusers_img2img_pipeline(sd, monkeypatch):
    """Same weights, prompt, negative prompt, guidance, DDIM eta 0, strength 0.6, the same noise:
    diffusers encodes with the posterior's mode here (ours is the mean; diffusers' default draws a sample)."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_module

    _, _, model = sd
    monkeypatch.setattr(img2img_module, "retrieve_latents",
                        lambda output, generator=None, sample_mode="sample": output.latent_dist.mode())
    vae = first_stage_to_diffusers(model.first_stage, model.params["first_stage_config"]["params"])
    vae.register_to_config(scaling_factor=model.scale_factor)
    unet = transformer_unet_to_diffusers(model.unet, model.params["unet_config"]["params"])
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = photo()
    ours = tasks.img2img(model, image, "a cat", "blurry", tasks.Sampling(steps=10, scale=7.5, seed=3), strength=0.6)
    theirs = pipe(prompt_embeds=model.cond_stage(["a cat"]), negative_prompt_embeds=model.cond_stage(["blurry"]),
                  image=(image + 1) / 2, strength=0.6, num_inference_steps=10, guidance_scale=7.5,
                  generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert ours.shape == theirs.shape == (1, 3, 64, 96)
    error = ((ours + 1) / 2 - theirs).abs().max().item()
    assert error <= 1e-4, error


def test_strength_ends_mask_and_sizes(sd):
    _, _, model = sd
    image = photo((1, 3, 40, 72))  # no multiple of 16: padded, then cropped back
    options = tasks.Sampling(steps=4, scale=3.0, seed=5)
    round_trip = tasks.img2img(model, image, "a cat", options=options, strength=0)
    torch.testing.assert_close(round_trip, tasks.reconstruct(model, image).image)
    pure = tasks.img2img(model, photo((1, 3, 48, 80)), "a cat", options=options, strength=1)
    txt = tasks.txt2img(model, ["a cat"], options=options, size=(48, 80))
    torch.testing.assert_close(pure, txt, rtol=0, atol=1e-6)  # strength 1 forgets the image
    mask = torch.zeros(1, 1, 40, 72)
    mask[..., 8:24, 16:48] = 1
    masked = tasks.img2img(model, image, "a cat", options=options, strength=0.8, mask=mask)
    assert masked.shape == image.shape and torch.equal(masked[..., mask[0, 0] == 0], image[..., mask[0, 0] == 0])
    with pytest.raises(Exception, match="strength"):
        tasks.img2img(model, image, options=options, strength=1.5)


def test_hires_fix_doubles_the_size_and_is_recorded(sd, tmp_path):
    path, config, model = sd
    for upscaler in ("latent", "image"):
        result = tasks.txt2img(model, ["a cat"], options=tasks.Sampling(steps=3, seed=1), size=(32, 48),
                               hires=tasks.Hires(2, 0.5, 3, upscaler))
        assert result.shape == (1, 3, 64, 96) and torch.isfinite(result).all()
    args = ["txt2img", "a cat", "--ckpt", str(path), "--config", str(config), "--steps", "3", "-H", "32", "-W", "48",
            "--hires-scale", "2", "--hires-strength", "0.5", "--hires-steps", "3"]
    first = runner.invoke(app, [*args, "--out", str(tmp_path / "a.png")])
    assert first.exit_code == 0, first.output
    assert Image.open(tmp_path / "a.png").size == (96, 64)
    fields = images.parse_parameters(images.read_parameters(tmp_path / "a.png"))
    assert (fields["Size"], fields["Hires upscale"], fields["Denoising strength"], fields["Hires upscaler"]) == \
        ("48x32", "2", "0.5", "Latent")
    again = runner.invoke(app, ["txt2img", "--from-png", str(tmp_path / "a.png"), "--ckpt", str(path), "--config",
                                str(config), "--out", str(tmp_path / "b.png")])
    assert again.exit_code == 0, again.output
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "a.png")), np.array(Image.open(tmp_path / "b.png")))


def test_img2img_cli_with_the_bundled_model(tmp_path):
    Image.fromarray((np.random.default_rng(0).random((96, 112, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    result = runner.invoke(app, ["img2img", str(tmp_path / "in.png"), "-p", "a red heart", "--strength", "0.5",
                                 "--steps", "10", "--out", str(tmp_path / "out.png")])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "out.png").size == (112, 96)
    assert "Denoising strength: 0.5" in images.read_parameters(tmp_path / "out.png")
    refused = runner.invoke(app, ["img2img", str(tmp_path / "in.png"), "--ckpt", "inpaint", "--out",
                                  str(tmp_path / "x.png")])
    assert refused.exit_code == 1 and "use inpaint" in refused.output
