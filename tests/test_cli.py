"""End-to-end CLI tests on tiny random-weight models in every bundled layout."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from latentgen import catalog, images, loader, metrics, tasks
from latentgen.cli import app
from latentgen.loader import load_model
from latentgen.models.unet import UNetModel

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "txt2img": tiny_models.diffusion_model(root / "txt2img", "txt2img"),
        "inpaint": tiny_models.diffusion_model(root / "inpaint", "inpaint"),
        "upscale": tiny_models.diffusion_model(root / "upscale", "upscale"),
        "vq": tiny_models.autoencoder(root / "vq-f4", "vq"),
    }


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def pixels(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


def photo(path: Path, size=(40, 28), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_txt2img_writes_png_with_parameters_and_is_deterministic(models, tmp_path):
    common = ["txt2img", "a red heart", "--ckpt", models["txt2img"], "--steps", 3, "--seed", 7, "--negative", "blue, dark"]
    first = invoke("--json", *common, "--out", tmp_path / "a.png")
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    out = Path(summary["outputs"][0])
    image = Image.open(out)
    assert image.size == (64, 64) and image.mode == "RGB"
    second = invoke(*common, "--out", tmp_path / "b.png")
    assert second.exit_code == 0, second.output
    np.testing.assert_array_equal(pixels(out), pixels(tmp_path / "b.png"))
    params = images.parse_parameters(images.read_parameters(out))
    assert params["prompt"] == "a red heart" and params["negative_prompt"] == "blue, dark"
    assert params["Seed"] == "7" and params["Steps"] == "3" and params["Sampler"] == "DDIM"
    assert params["Model hash"] == summary["model_hash"]
    info = invoke("info", out)
    assert info.exit_code == 0 and "Negative prompt: blue, dark" in info.stdout


def test_the_parameters_name_a_precision_other_than_fp32(models, tmp_path):
    """--dtype auto may pick bf16 on a CPU; the pixels depend on it, so the PNG says so."""
    for dtype in ("fp32", "bf16"):
        result = invoke("-q", "txt2img", "a red heart", "--ckpt", models["txt2img"], "--steps", 2, "--dtype", dtype,
                        "--out", tmp_path / f"{dtype}.png")
        assert result.exit_code == 0, result.output
    assert "Precision" not in images.parse_parameters(images.read_parameters(tmp_path / "fp32.png"))
    assert images.parse_parameters(images.read_parameters(tmp_path / "bf16.png"))["Precision"] == "bf16"


def test_txt2img_never_overwrites_unless_asked(models, tmp_path):
    target = tmp_path / "x.png"
    for _ in range(2):
        assert invoke("txt2img", "cat", "--ckpt", models["txt2img"], "--steps", 2, "--out", target).exit_code == 0
    assert target.exists() and (tmp_path / "x-1.png").exists()
    before = target.read_bytes()
    assert invoke("txt2img", "dog", "--ckpt", models["txt2img"], "--steps", 2, "--out", target, "--overwrite").exit_code == 0
    assert target.read_bytes() != before and not (tmp_path / "x-2.png").exists()


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "ddpm"])
def test_seed_gives_same_image_in_any_batch(models, tmp_path, sampler):
    """Also for the samplers that add noise at every step (what the OOM fallback's half batches rely on)."""
    common = ("txt2img", "cat", "--ckpt", models["txt2img"], "--steps", 3, "-n", 2, "--sampler", sampler)
    invoke(*common, "--batch-size", 2, "--out", tmp_path / "b")
    invoke(*common, "--batch-size", 1, "--out", tmp_path / "s")
    for name in ("00000-0.png", "00001-1.png"):
        np.testing.assert_allclose(pixels(tmp_path / "b" / name), pixels(tmp_path / "s" / name), atol=1)
    assert not np.array_equal(pixels(tmp_path / "b" / "00000-0.png"), pixels(tmp_path / "b" / "00001-1.png"))


def test_prompts_file_run_interrupted_then_resumed(models, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\na red heart\n")
    out = tmp_path / "run"
    real, calls = tasks.txt2img, []

    def dies_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks, "txt2img", dies_on_second_batch)
    stopped = invoke("txt2img", "--prompts", prompts, "--ckpt", models["txt2img"], "--steps", 2, "--out", out)
    assert stopped.exit_code == 130
    assert sorted(p.name for p in out.glob("*.png")) == ["00000-0.png"]
    first_bytes = (out / "00000-0.png").read_bytes()
    monkeypatch.setattr(tasks, "txt2img", real)
    resumed = invoke("txt2img", "--prompts", prompts, "--ckpt", models["txt2img"], "--steps", 2, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert sorted(p.name for p in out.glob("*.png")) == ["00000-0.png", "00001-1.png", "00002-2.png"]
    assert (out / "00000-0.png").read_bytes() == first_bytes
    assert not list(out.glob("*.tmp*"))


def test_inpaint_keeps_unmasked_pixels_exactly(models, tmp_path):
    source = photo(tmp_path / "img.png", (44, 30))
    mask = np.zeros((30, 44), dtype=np.uint8)
    mask[8:20, 10:30] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    result = invoke("inpaint", source, tmp_path / "mask.png", "--ckpt", models["inpaint"], "--steps", 3,
                    "--out", tmp_path / "out.png")
    assert result.exit_code == 0, result.output
    before, after = pixels(source), pixels(tmp_path / "out.png")
    assert after.shape == before.shape
    keep = mask == 0
    np.testing.assert_array_equal(after[keep], before[keep])
    assert (after[~keep] != before[~keep]).any()


def test_inpaint_by_masked_sampling_with_a_text_model(models, tmp_path):
    source = photo(tmp_path / "img.png", (64, 64))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    result = invoke("inpaint", source, tmp_path / "mask.png", "-p", "a cat", "--ckpt", models["txt2img"], "--steps", 3,
                    "--out", tmp_path / "out.png")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(pixels(tmp_path / "out.png")[mask == 0], pixels(source)[mask == 0])


def test_sd_inpainting_checkpoint_gets_mask_then_masked_latent(tmp_path, monkeypatch):
    """SD 1.x inpainting (9-channel hybrid UNet) in the official layout, through the CLI: the UNet
    sees [latent | mask | masked-image latent] as runwayml trained it, and kept pixels stay exact."""
    ckpt = tiny_models.official_checkpoint(tmp_path / "sd-v1-5-inpainting.safetensors", "sd-inpaint")
    config = tiny_models.tiny_clip_config(tmp_path / "tiny-clip.json")
    source = photo(tmp_path / "img.png", (50, 36))  # not a multiple of 16 (8 * the UNet's 2): padded, cropped back
    mask = np.zeros((36, 50), dtype=np.uint8)
    mask[4:20, 8:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    model = load_model(ckpt, config)
    keep = torch.from_numpy(mask == 0)[None, None].float()
    image = torch.from_numpy(pixels(source)).permute(2, 0, 1)[None].float() / 127.5 - 1
    masked = images.pad_to_multiple(image, 16)[0] * images.pad_to_multiple(keep, 16)[0]  # reflected like the image
    with torch.no_grad():
        want_latent = model.first_stage.encode(masked) * model.scale_factor
    seen = []
    real_forward = UNetModel.forward

    def spy(unet, x, timesteps, context=None, y=None):
        seen.append(x.detach().clone())
        return real_forward(unet, x, timesteps, context, y)

    monkeypatch.setattr(UNetModel, "forward", spy)
    result = invoke("inpaint", source, tmp_path / "mask.png", "-p", "a cat", "--ckpt", ckpt, "--config", config,
                    "--steps", 2, "--scale", 3, "--device", "cpu", "--out", tmp_path / "out.png")
    assert result.exit_code == 0, result.output
    assert all(x.shape[1] == 9 for x in seen) and seen[0].shape[0] == 2  # guidance batched in one forward
    small_mask = seen[0][:, 4]
    assert set(small_mask.unique().tolist()) == {0.0, 1.0} and small_mask.shape[-2:] == (6, 8)
    assert small_mask[0, 1, 2] == 1 and small_mask[0, 4, 0] == 0  # 8x8 cells inside / outside the hole
    torch.testing.assert_close(seen[0][:1, 5:], want_latent, rtol=1e-4, atol=1e-4)
    after = pixels(tmp_path / "out.png")
    assert after.shape == (36, 50, 3)
    np.testing.assert_array_equal(after[mask == 0], pixels(source)[mask == 0])
    assert "Model: sd-v1-5-inpainting" in images.read_parameters(tmp_path / "out.png")


def test_class_conditional_checkpoint_samples_the_asked_classes(tmp_path):
    ckpt = tiny_models.official_checkpoint(tmp_path / "cin256-v2.safetensors", "cin")
    common = ["txt2img", "--ckpt", ckpt, "--steps", 3, "--scale", 2, "--seed", 5]
    result = invoke(*common, "--class", 3, "--class", 7, "--out", tmp_path / "classes")
    assert result.exit_code == 0, result.output
    written = sorted((tmp_path / "classes").glob("*.png"))
    assert [p.name for p in written] == ["00000-5.png", "00001-6.png"]  # seeds count up per image, as in A1111
    assert "Class: 3" in images.read_parameters(written[0]) and "Class: 7" in images.read_parameters(written[1])
    for label, seed, name in ((3, 5, "three.png"), (7, 5, "seven.png")):
        again = invoke("txt2img", "--ckpt", ckpt, "--steps", 3, "--scale", 2, "--seed", seed, "--class", label,
                       "--out", tmp_path / name)
        assert again.exit_code == 0, again.output
    np.testing.assert_array_equal(pixels(tmp_path / "three.png"), pixels(written[0]))  # same class + seed
    assert not np.array_equal(pixels(tmp_path / "seven.png"), pixels(written[0]))  # only the class differs
    for bad, message in (([], "give class ids"), (["--class", 11], "0..10")):
        refused = invoke(*common, *bad, "--out", tmp_path / "bad.png")
        assert refused.exit_code == 1 and message in refused.output and "Traceback" not in refused.output


@pytest.mark.parametrize("content, message", [(0, "all black"), (255, "all white")])
def test_inpaint_refuses_empty_and_full_masks(models, tmp_path, content, message):
    source = photo(tmp_path / "img.png", (32, 32))
    Image.fromarray(np.full((32, 32), content, dtype=np.uint8)).save(tmp_path / "mask.png")
    result = invoke("inpaint", source, tmp_path / "mask.png", "--ckpt", models["inpaint"])
    assert result.exit_code == 1 and message in result.output


def test_upscale_is_4x_and_tiles_large_inputs(models, tmp_path):
    source = photo(tmp_path / "low.png", (24, 20))
    result = invoke("upscale", source, "--ckpt", models["upscale"], "--steps", 2, "--out", tmp_path / "hi.png")
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "hi.png").size == (96, 80)
    tiled = invoke("upscale", source, "--ckpt", models["upscale"], "--steps", 2, "--tile", 16, "--out", tmp_path / "t.png")
    assert tiled.exit_code == 0, tiled.output
    assert Image.open(tmp_path / "t.png").size == (96, 80)


def test_reconstruct_reports_psnr_ssim_that_match_the_written_files(models, tmp_path):
    source = photo(tmp_path / "img.png", (37, 29))
    result = invoke("--json", "reconstruct", source, "--ckpt", models["vq"], "--out", tmp_path / "out", "--compare")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.strip().splitlines()[-1])["results"][0]
    written = Path(row["output"])
    a = torch.from_numpy(pixels(source)).double()
    b = torch.from_numpy(pixels(written)).double()
    mse = float(((a - b) ** 2).mean())
    assert row["psnr"] == pytest.approx(10 * np.log10(255**2 / mse), abs=1e-6)
    assert row["ssim"] == pytest.approx(metrics.ssim(images.load_image(source), images.load_image(written)), abs=1e-9)
    assert row["latent_shape"] == [3, 8, 10] and row["compression"] == pytest.approx(37 * 29 * 3 / (3 * 8 * 10))
    assert Image.open(tmp_path / "out" / "img-compare.png").size[0] > 3 * 37


@pytest.mark.parametrize("args, expected", [
    (["txt2img", "x", "--sampler", "nope"], "ddim"),
    (["txt2img", "x", "--steps", "0"], "steps"),
    (["txt2img", "x", "--height", "65"], "multiple of 16"),
    (["txt2img", "x", "-n", "0"], "images per prompt"),
])
def test_bad_arguments_are_one_clear_line(models, args, expected):
    result = invoke(*args, "--ckpt", models["txt2img"])
    assert result.exit_code == 1
    assert expected in result.output and "Traceback" not in result.output


def test_missing_and_corrupt_inputs_are_refused(models, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x80\x04garbage")
    result = invoke("txt2img", "x", "--ckpt", bad)
    assert result.exit_code == 1 and "Traceback" not in result.output
    missing = invoke("reconstruct", tmp_path / "none.png", "--ckpt", models["vq"])
    assert missing.exit_code == 1


def test_models_lists_folders_with_family_and_hash(models, monkeypatch):
    monkeypatch.setenv("LATENTGEN_MODELS", str(models["vq"].parent))

    def no_tensor_reads(path):
        raise AssertionError(f"listing read the tensors of {path}")

    monkeypatch.setattr(loader, "_read_safetensors", no_tensor_reads)
    result = invoke("--json", "models")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout.strip().splitlines()[-1])["models"]}
    assert rows["vq-f4"]["factor"] == 4 and len(rows["vq-f4"]["hash"]) == 10
    assert rows["vq-f4"]["family"] == "autoencoder-vq"
    assert rows["txt2img"]["factor"] == 8 and rows["txt2img"]["family"] == "ldm-txt2img"  # MiniLM: named in config.json
    assert rows["inpaint"]["family"] == "ldm-inpaint" and rows["upscale"]["family"] == "ldm-sr"


def test_decode_falls_back_to_tiles_on_out_of_memory(models, monkeypatch):
    model = tasks.prepare(load_model(models["vq"]), "cpu", "fp32")
    z = torch.randn(1, 3, 80, 80)
    expected = tasks.decode(model, z)
    real, calls = model.first_stage.decode, []

    def fails_on_big_latents(latent):
        calls.append(latent.shape[-1])
        if latent.shape[-1] > 64:
            raise torch.OutOfMemoryError("simulated")
        return real(latent)

    monkeypatch.setattr(model.first_stage, "decode", fails_on_big_latents)
    tiled = tasks.decode(model, z)
    assert calls[0] == 80 and max(calls[1:]) <= 64
    assert tiled.shape == expected.shape and torch.isfinite(tiled).all()


def test_half_precision_decode_retries_in_float32(models, monkeypatch):
    model = tasks.prepare(load_model(models["vq"]), "cpu", "bf16")
    real = type(model.first_stage).decode

    def overflows_in_half(self, latent):
        out = real(self, latent)
        return out * float("nan") if out.dtype != torch.float32 else out

    monkeypatch.setattr(type(model.first_stage), "decode", overflows_in_half)
    image = tasks.decode(model, torch.randn(1, 3, 8, 8))
    assert torch.isfinite(image).all()
    assert next(model.first_stage.parameters()).dtype == torch.bfloat16


# ---- the new user's first hour (issue 13): every item with a test ------------------------------


def test_out_with_an_image_suffix_is_a_file_and_several_images_get_their_run_index(models, tmp_path):
    jpeg = invoke("txt2img", "cat", "--ckpt", models["txt2img"], "--steps", 2, "--out", tmp_path / "x.jpg")
    assert jpeg.exit_code == 0, jpeg.output
    assert (tmp_path / "x.jpg").is_file() and Image.open(tmp_path / "x.jpg").format == "JPEG"
    several = invoke("txt2img", "cat", "--ckpt", models["txt2img"], "--steps", 2, "-n", 3, "--out", tmp_path / "cats.png")
    assert several.exit_code == 0, several.output
    names = sorted(p.name for p in tmp_path.glob("cats*.png"))
    assert names == ["cats-00000.png", "cats-00001.png", "cats-00002.png"]  # not cats-1.png: that means "existed"
    again = invoke("txt2img", "cat", "--ckpt", models["txt2img"], "--steps", 2, "--out", tmp_path / "x.jpg")
    assert again.exit_code == 0 and (tmp_path / "x-1.jpg").is_file()  # kept, numbered


def test_reconstruct_out_file_is_a_file_and_says_where_it_wrote(models, tmp_path):
    source = photo(tmp_path / "in.png")
    result = invoke("reconstruct", source, "--ckpt", models["vq"], "--out", tmp_path / "r.png", "--compare")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.png").is_file() and not (tmp_path / "r.png").is_dir()
    assert (tmp_path / "r-compare.png").is_file() and "r.png" in result.output
    refused = invoke("reconstruct", source, source, "--ckpt", models["vq"], "--out", tmp_path / "two.png")
    assert refused.exit_code == 1 and "names one file" in refused.output and not (tmp_path / "two.png").exists()


def test_reconstruct_offers_only_installed_factors(tmp_path):
    installed = catalog.installed_factors()
    help_text = " ".join(invoke("reconstruct", "--help").output.split())
    assert f"(installed: {', '.join(map(str, installed))})" in help_text
    missing = next(f for f in (2, 4, 8, 16, 32) if f not in installed)
    refused = invoke("reconstruct", photo(tmp_path / "a.png"), "--f", missing)
    assert refused.exit_code == 1 and f"no bundled autoencoder with f={missing}" in refused.output


def test_inputs_a_model_cannot_use_are_refused_not_recorded(models, tmp_path):
    source, mask = photo(tmp_path / "img.png", (32, 32)), tmp_path / "mask.png"
    Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), 12)).save(mask)
    prompted = invoke("inpaint", source, mask, "-p", "a wooden bench", "--ckpt", models["inpaint"], "--steps", 2,
                      "--out", tmp_path / "filled.png")
    assert prompted.exit_code == 1 and "not text-conditional" in prompted.output
    classed = invoke("txt2img", "--class", 207, "--ckpt", models["txt2img"], "--steps", 2, "--out", tmp_path / "c.png")
    assert classed.exit_code == 1 and "not class-conditional" in classed.output
    both = invoke("txt2img", "a cat", "--class", 3, "--ckpt", models["txt2img"], "--out", tmp_path / "d.png")
    assert both.exit_code == 1 and "not both" in both.output
    assert not list(tmp_path.glob("[fcd]*.png"))


def test_written_files_follow_the_umask(models, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        result = invoke("txt2img", "cat", "--ckpt", models["txt2img"], "--steps", 2, "--out", tmp_path / "run")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    for path in (tmp_path / "run").iterdir():
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_a_second_run_into_a_folder_keeps_the_first_runs_manifest(models, tmp_path):
    from latentgen.jobs import Manifest

    out, prompts = tmp_path / "run", tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    first = invoke("txt2img", "--prompts", prompts, "--ckpt", models["txt2img"], "--steps", 2, "--out", out)
    second = invoke("txt2img", "--prompts", prompts, "--ckpt", models["txt2img"], "--steps", 3, "--out", out)
    assert first.exit_code == 0 and second.exit_code == 0
    entries = json.loads((out / Manifest.NAME).read_text())
    assert len(entries) == 4 and len(set(entries.values())) == 4  # both runs, numbered names for the second
    resumed = invoke("txt2img", "--prompts", prompts, "--ckpt", models["txt2img"], "--steps", 2, "--out", out, "--resume")
    assert resumed.exit_code == 0 and "nothing left to do" in resumed.output
    assert len(list(out.glob("*.png"))) == 4
    fresh = invoke("txt2img", "--prompts", prompts, "--ckpt", models["txt2img"], "--out", tmp_path / "new", "--resume")
    assert fresh.exit_code == 1 and "nothing to resume" in fresh.output


def test_resumable_runs_from_python(models, tmp_path):
    import latentgen

    model = latentgen.prepare(latentgen.load_model(models["txt2img"]), "cpu", "fp32")
    jobs = latentgen.plan_jobs(["a cat", "a dog"], num=2, seed=3)
    options = latentgen.Sampling(steps=2)
    first = latentgen.run_txt2img(model, jobs[:3], out=tmp_path / "run", options=options)  # a stopped run, as it were
    (tmp_path / "run" / first[-1].name).unlink()
    rest = latentgen.run_txt2img(model, jobs[:3], out=tmp_path / "run", options=options, resume=True)
    assert [p.name for p in rest] == [first[-1].name]
    whole = latentgen.run_txt2img(model, jobs, out=tmp_path / "whole", options=options)
    for path in first:
        np.testing.assert_array_equal(pixels(path), pixels(tmp_path / "whole" / path.name))
    assert len(whole) == 4


def test_help_version_and_flags_read_as_usual():
    from latentgen import __version__

    short = invoke("-h")
    assert short.exit_code == 0 and "txt2img" in short.output
    assert invoke("txt2img", "-h").exit_code == 0
    version = invoke("--version")
    assert version.exit_code == 0 and version.output.strip() == f"latentgen {__version__}"
    for command in ("txt2img", "inpaint", "upscale", "reconstruct", "convert", "bench"):
        assert "<bool>" not in invoke(command, "--help").output


def test_errors_stay_on_one_line_when_piped(tmp_path):
    import subprocess

    missing = tmp_path / ("a-very-long-folder-name-" * 6) / "missing-checkpoint.safetensors"
    result = subprocess.run([sys.executable, "-m", "latentgen.cli", "txt2img", "x", "--ckpt", str(missing)],
                            capture_output=True, text=True, env={"PATH": "", "COLUMNS": "80"}, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint") and len(lines[0]) > 80


def test_float32_decode_retry_restores_the_dtype_even_on_error(models, monkeypatch):
    model = tasks.prepare(load_model(models["vq"]), "cpu", "bf16")

    def broken(z):
        raise RuntimeError("decoder failed")

    monkeypatch.setattr(model.first_stage, "decode", broken)
    with pytest.raises(RuntimeError):
        tasks._decode_in_float32(model.first_stage, torch.zeros(1, 3, 4, 4))
    assert next(model.first_stage.parameters()).dtype == torch.bfloat16


def test_convert_keeps_an_existing_target(models, tmp_path):
    source = tiny_models.official_checkpoint(tmp_path / "m.ckpt", "cin")
    for _ in range(2):
        assert invoke("convert", source, tmp_path / "m.safetensors").exit_code == 0
    assert (tmp_path / "m.safetensors").is_file() and (tmp_path / "m-1.safetensors").is_file()


# ---- prompts, seeds, grids, tiling and names as Stable Diffusion users know them (issue 16) -----


def test_random_seed_is_printed_and_recorded(models, tmp_path):
    result = invoke("--json", "txt2img", "cat", "--ckpt", models["txt2img"], "--steps", 2, "--seed", -1,
                    "--out", tmp_path / "r.png")
    assert result.exit_code == 0, result.output
    seed = json.loads(result.stdout.strip().splitlines()[-1])["seed"]
    assert 0 <= seed < 2**32 and f"Seed: {seed}," in images.read_parameters(tmp_path / "r.png")


def test_grid_of_the_run_with_the_first_images_parameters(models, tmp_path):
    result = invoke("txt2img", "cat", "--ckpt", models["txt2img"], "--steps", 2, "-n", 3, "--seed", 4, "--grid",
                    "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    grid = tmp_path / "run" / "grid-4.png"
    assert Image.open(grid).size == (128, 128)  # 3 images of 64 px: 2 x 2
    assert images.read_parameters(grid) == images.read_parameters(tmp_path / "run" / "00000-4.png")
    np.testing.assert_array_equal(pixels(grid)[64:, :64], pixels(tmp_path / "run" / "00002-6.png"))


def test_automatic1111_and_sdcpp_names_and_flags(models, tmp_path):
    common = ["txt2img", "--ckpt", models["txt2img"], "--steps", 2, "--seed", 3]
    a1111 = invoke(*common, "-p", "cat", "--negative-prompt", "dog", "--cfg-scale", 5, "-H", 64, "-W", 128,
                   "--sampler", "DPM++ 2M Karras", "--out", tmp_path / "a.png")
    ours = invoke(*common, "cat", "--negative", "dog", "--scale", 5, "--height", 64, "--width", 128,
                  "--sampler", "dpmpp_2m", "--karras", "--out", tmp_path / "b.png")
    sdcpp = invoke(*common, "cat", "--negative", "dog", "--scale", 5, "-H", 64, "-W", 128, "--sampler", "dpm++2m",
                   "--karras", "--out", tmp_path / "c.png")
    assert a1111.exit_code == ours.exit_code == sdcpp.exit_code == 0, a1111.output
    np.testing.assert_array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    np.testing.assert_array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "c.png"))
    fields = images.parse_parameters(images.read_parameters(tmp_path / "a.png"))
    assert (fields["Sampler"], fields["Schedule type"], fields["Size"], fields["CFG scale"]) == \
        ("DPM++ 2M", "Karras", "128x64", "5")
    unknown = invoke(*common, "cat", "--sampler", "LMS", "--out", tmp_path / "d.png")
    assert unknown.exit_code == 1 and "Euler a" in unknown.output


def test_txt2img_info_from_png_reproduces_the_image(models, tmp_path):
    first = invoke("txt2img", "a (red:1.3) heart", "--ckpt", models["txt2img"], "--steps", 3, "--seed", 11,
                   "--negative", "blue", "--scale", 4, "--sampler", "Euler a", "-W", 128, "--out", tmp_path / "a.png")
    assert first.exit_code == 0, first.output
    shown = invoke("info", tmp_path / "a.png")
    assert shown.exit_code == 0 and "Sampler: Euler a" in shown.output
    again = invoke("txt2img", "--from-png", tmp_path / "a.png", "--ckpt", models["txt2img"], "--out", tmp_path / "b.png")
    assert again.exit_code == 0, again.output
    np.testing.assert_array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    assert images.read_parameters(tmp_path / "a.png") == images.read_parameters(tmp_path / "b.png")
    other = invoke("txt2img", "--from-png", tmp_path / "a.png", "--seed", 12, "--ckpt", models["txt2img"],
                   "--out", tmp_path / "c.png")
    assert other.exit_code == 0 and "Seed: 12," in images.read_parameters(tmp_path / "c.png")  # flags win


def test_from_png_reads_automatic1111_parameters(models, tmp_path):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a castle, (masterpiece:1.2)\nNegative prompt: blurry\nSteps: 3, Sampler: Euler, "
                                "Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 64x64, Model hash: 6ce0161689, "
                                "Model: v1-5-pruned-emaonly, Version: v1.10.1")
    Image.new("RGB", (64, 64)).save(tmp_path / "a1111.png", pnginfo=info)
    result = invoke("txt2img", "--from-png", tmp_path / "a1111.png", "--ckpt", models["txt2img"], "--out",
                    tmp_path / "ours.png")
    assert result.exit_code == 0, result.output
    assert "hash 6ce0161689" in result.output  # made by another model: said, not hidden
    fields = images.parse_parameters(images.read_parameters(tmp_path / "ours.png"))
    assert fields["prompt"] == "a castle, (masterpiece:1.2)" and fields["negative_prompt"] == "blurry"
    assert (fields["Sampler"], fields["Schedule type"], fields["Seed"], fields["CFG scale"], fields["Steps"]) == \
        ("Euler", "Karras", "1234", "6.5", "3")


def test_seamless_images_continue_across_their_borders(models):
    """On a torus the networks commute with shifts: rolling the starting noise by one UNet cell
    rolls the image by f x that, so the image has no border at all, hence no seam."""
    from latentgen.guidance import Conditioning
    from latentgen.tiling import set_seamless

    model = tasks.prepare(load_model(models["txt2img"]), "cpu", "fp32")
    set_seamless(model.modules())
    context = tasks._condition(model, ["a cat"], None).context
    x_T = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(0))
    options = tasks.Sampling(steps=3)

    def image(noise):
        return tasks.decode(model, tasks._sample(model, Conditioning(context=context), None, options, noise, None, None))

    plain, rolled = image(x_T), image(x_T.roll(2, dims=-1))
    torch.testing.assert_close(rolled, plain.roll(16, dims=-1), rtol=0, atol=1e-4)
    set_seamless(model.modules(), False)
    assert not torch.allclose(image(x_T.roll(2, dims=-1)), plain.roll(16, dims=-1), atol=1e-3)


@pytest.mark.slow
def test_seamless_bundled_image_has_no_seam_where_it_wraps(tmp_path):
    result = invoke("txt2img", "a red heart", "--steps", 20, "--seamless", "--out", tmp_path / "tile.png")
    assert result.exit_code == 0, result.output
    x = pixels(tmp_path / "tile.png").astype(np.float64)
    interior = np.abs(np.diff(x, axis=1)).mean()
    wrap = np.abs(x[:, 0] - x[:, -1]).mean()
    interior_rows = np.abs(np.diff(x, axis=0)).mean()
    wrap_rows = np.abs(x[0] - x[-1]).mean()
    # measured: 1.7 vs 1.6 across columns, 4.5 vs 1.8 across rows; without --seamless 25 vs 3.4 and 22 vs 3.0
    assert wrap < 3 * interior + 1 and wrap_rows < 3 * interior_rows + 1, (wrap, interior, wrap_rows, interior_rows)


def test_vae_tiling_decodes_large_latents_in_tiles_without_seams(models, tmp_path):
    model = tasks.prepare(load_model(models["vq"]), "cpu", "fp32")
    z = torch.nn.functional.interpolate(torch.randn(1, 3, 12, 14), size=(100, 120), mode="bicubic")  # smooth
    whole = tasks.decode(model, z)
    model.vae_tiling = True
    tiled = tasks.decode(model, z)
    assert tiled.shape == whole.shape == (1, 3, 400, 480)
    assert (tiled - whole).abs().mean() < 0.02  # blended tiles: the same picture
    result = invoke("txt2img", "cat", "--ckpt", models["txt2img"], "--steps", 2, "--vae-tiling", "-H", 128, "-W", 576,
                    "--out", tmp_path / "wide.png")
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "wide.png").size == (576, 128)


# ---- runs over --inputs ----------------------------------------------------------------------


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for i, name in enumerate(("b.png", "a.jpg", "c.png")):
        photo(folder / name, (16, 16), seed=10 + i)
    (folder / "notes.txt").write_text("not an image\n")
    return folder


def test_upscale_over_inputs_writes_what_single_runs_write_and_resumes(models, inputs, tmp_path):
    """Inputs by name (a, b, c), image i with seed + i, outputs named as the inputs; --resume makes
    only what is missing."""
    run = tmp_path / "run"
    result = invoke("upscale", "--inputs", inputs, "--ckpt", models["upscale"], "--steps", 2, "--seed", 5, "--out", run)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in run.glob("*.png")) == ["a.png", "b.png", "c.png"]
    single = invoke("upscale", inputs / "b.png", "--ckpt", models["upscale"], "--steps", 2, "--seed", 6,
                    "--out", tmp_path / "b.png")
    assert single.exit_code == 0, single.output
    np.testing.assert_array_equal(pixels(run / "b.png"), pixels(tmp_path / "b.png"))
    assert images.parse_parameters(images.read_parameters(run / "c.png"))["Seed"] == "7"
    (run / "a.png").unlink()
    before = (run / "c.png").stat().st_mtime_ns
    resumed = invoke("upscale", "--inputs", inputs, "--ckpt", models["upscale"], "--steps", 2, "--seed", 5,
                     "--out", run, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert (run / "a.png").is_file() and (run / "c.png").stat().st_mtime_ns == before


def test_inpaint_and_img2img_over_inputs_take_masks_by_name_or_one_for_all(models, inputs, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    for stem in ("a", "b", "c"):
        hole = np.zeros((16, 16), dtype=np.uint8)
        hole[4:12, 4:12] = 255
        Image.fromarray(hole).save(masks / f"{stem}.png")
    filled = invoke("inpaint", "--inputs", inputs, "--masks", masks, "--ckpt", models["inpaint"], "--steps", 2,
                    "--out", tmp_path / "filled")
    assert filled.exit_code == 0, filled.output
    kept = pixels(tmp_path / "filled" / "a.png")[:4]
    np.testing.assert_array_equal(kept, np.array(Image.open(inputs / "a.jpg").convert("RGB"))[:4])
    redrawn = invoke("img2img", "--inputs", inputs, "--mask", masks / "a.png", "--ckpt", models["txt2img"],
                     "-p", "a cat", "--steps", 2, "--out", tmp_path / "redrawn")
    assert redrawn.exit_code == 0, redrawn.output
    assert len(list((tmp_path / "redrawn").glob("*.png"))) == 3
    (masks / "c.png").unlink()
    missing = invoke("inpaint", "--inputs", inputs, "--masks", masks, "--ckpt", models["inpaint"], "--steps", 2,
                     "--out", tmp_path / "again")
    assert missing.exit_code == 1 and "has no mask for c.png" in missing.output


@pytest.mark.parametrize("args, message", [
    (["IMG", "--inputs", "DIR"], "not both"),
    ([], "give an image or --inputs"),
    (["--inputs", "DIR", "--out", "one.png"], "writes a folder"),
    (["--inputs", "LIST"], "two inputs are named 'b'"),
])
def test_runs_over_inputs_refuse_what_they_cannot_do(models, inputs, tmp_path, args, message):
    listing = tmp_path / "list.txt"
    listing.write_text("inputs/b.png\ninputs/a.jpg\nother/b.png\n")
    (tmp_path / "other").mkdir()
    photo(tmp_path / "other" / "b.png", (16, 16))
    names = {"IMG": inputs / "b.png", "DIR": inputs, "LIST": listing}
    result = invoke("upscale", *[names.get(a, a) for a in args], "--ckpt", models["upscale"])
    assert result.exit_code == 1 and message in result.output, result.output


def test_cpu_bf16_models_run_channels_last_and_draw_what_nchw_draws(models, tmp_path):
    """bf16 on the CPU lays every 4-D weight out channels-last (oneDNN's fast path there), also a
    swapped VAE's; the image is the NCHW one to within bf16's rounding, and fp32 stays NCHW."""
    from latentgen import addons

    fast = tasks.prepare(load_model(models["txt2img"]), "cpu", "bf16")
    convs = [m.weight for m in (*fast.unet.modules(), *fast.first_stage.modules()) if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert any(not w.is_contiguous() for w in convs)  # 1x1 kernels are both
    plain = load_model(models["txt2img"]).to("cpu", torch.bfloat16).eval()
    options = tasks.Sampling(steps=4, scale=3.0, seed=1)
    ours, reference = (tasks.txt2img(model, ["a red heart"], options=options) for model in (fast, plain))
    assert (ours - reference).abs().max() < 0.05
    exact = tasks.prepare(load_model(models["txt2img"]), "cpu", "fp32")
    assert all(m.weight.is_contiguous() for m in exact.unet.modules() if isinstance(m, torch.nn.Conv2d))
    addons.swap_vae(fast, models["txt2img"])
    assert fast.first_stage.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)


def test_auto_dtype_takes_bf16_on_the_cpu_only_for_large_unets_with_native_bf16(monkeypatch):
    from latentgen import devices

    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "native_bf16", lambda: True)
    assert devices.pick_dtype("auto", cpu, 320) == torch.bfloat16
    assert devices.pick_dtype("auto", cpu, 64) == torch.float32 and devices.pick_dtype("auto", cpu) == torch.float32
    assert devices.pick_dtype("fp32", cpu, 320) == torch.float32
    monkeypatch.setattr(devices, "native_bf16", lambda: False)
    assert devices.pick_dtype("auto", cpu, 320) == torch.float32
