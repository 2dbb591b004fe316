"""Held-out evaluation (`latentgen train evaluate`): scores against hand computations on tiny models."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from latentgen import metrics, tasks
from latentgen.cli import app
from latentgen.errors import LatentgenError
from latentgen.images import load_image
from latentgen.loader import load_model
from latentgen.train import evaluate

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two tiny 'datasets' laid out like photos-eval."""
    root = tmp_path_factory.mktemp("photos-eval")
    rng = np.random.default_rng(0)
    for dataset, sizes in (("set5", [(40, 36)]), ("set14", [(32, 48), (44, 44)])):
        (root / dataset).mkdir()
        for i, (w, h) in enumerate(sizes):
            smooth = rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
            Image.fromarray(smooth).save(root / dataset / f"{i}.png")
    return root


def test_center_crop_is_central_square_rounded_to_the_multiple():
    image = torch.arange(50 * 70, dtype=torch.float32).view(1, 1, 50, 70)
    crop = evaluate.center_crop(image, 128, 8)
    assert crop.shape[-2:] == (48, 48)
    assert torch.equal(crop, image[..., 1:49, 11:59])


def test_center_crop_zero_keeps_the_whole_image_rounded_to_the_multiple():
    image = torch.arange(50 * 70, dtype=torch.float32).view(1, 1, 50, 70)
    assert torch.equal(evaluate.center_crop(image, 0, 8), image[..., 1:49, 3:67])


def test_gradient_energy_by_hand_and_blur_lowers_it():
    image = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]).view(1, 1, 2, 3)
    # horizontal differences 1, -1, 0, 0 -> mean 0.5; vertical -> 0, -1, 0 -> mean 1/3
    assert metrics.gradient_energy(image) == pytest.approx(0.5 + 1 / 3)
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert metrics.gradient_energy(F.avg_pool2d(noise, 3, 1, 1)) < 0.3 * metrics.gradient_energy(noise)


def test_telea_baseline_fills_the_hole_from_its_border_and_keeps_the_rest():
    image = torch.linspace(-1, 1, 24).view(1, 1, 1, 24).expand(1, 3, 24, 24).contiguous()
    hole = torch.zeros(1, 1, 24, 24)
    hole[..., 8:16, 8:16] = 1
    filled = evaluate.telea_inpaint(image, hole)
    outside = (hole == 0).expand_as(image)
    assert (filled - image)[outside].abs().max() <= 1 / 127.5 + 1e-6  # 8-bit round trip only
    kept = 1 - hole
    mean_fill = image * kept + hole * (image * kept).sum((-2, -1), keepdim=True) / kept.sum()
    telea, flat = evaluate.hole_psnr(filled, image, hole), evaluate.hole_psnr(mean_fill, image, hole)
    assert telea > flat + 5, (telea, flat)  # continues the ramp from the hole's border


def test_hole_psnr_counts_only_the_hole():
    a = torch.full((1, 3, 8, 8), -1.0)  # level 0
    b = a.clone()
    hole = torch.zeros(1, 1, 8, 8)
    hole[..., :2, :] = 1
    b[..., :2, :] = -1 + 2 * 51 / 255  # 51 levels off inside the hole (0.2 in [0, 1])
    b[..., 4:, :] = 1.0  # far off outside it: ignored
    assert evaluate.hole_psnr(b, a, hole) == pytest.approx(-10 * math.log10(0.2**2), abs=1e-4)
    assert evaluate.hole_psnr(a, a, hole) == math.inf


def test_autoencoder_scores_match_reconstruct_and_bicubic(tmp_path, photos):
    model = load_model(tiny_models.autoencoder(tmp_path / "vq", "vq"))
    scores = evaluate.evaluate(model, photos, ("set5", "set14"), crop=32)
    assert [(s.dataset, s.image) for s in scores] == [("set5", "0.png"), ("set14", "0.png"), ("set14", "1.png")]
    image = evaluate.center_crop(load_image(photos / "set14" / "1.png"), 32, 4)
    want = tasks.reconstruct(model, image)
    low = F.interpolate(image, size=(8, 8), mode="bicubic", antialias=True).clamp(-1, 1)
    bicubic = F.interpolate(low, size=(32, 32), mode="bicubic").clamp(-1, 1)
    assert scores[2].psnr == pytest.approx(want.psnr) and scores[2].ssim == pytest.approx(want.ssim)
    assert scores[2].baseline_psnr == pytest.approx(metrics.psnr(bicubic, image))
    means = evaluate.summarize(scores)
    assert list(means) == ["set5", "set14", "all"] and means["set14"]["images"] == 2
    assert means["all"]["psnr"] == pytest.approx(sum(s.psnr for s in scores) / 3)


@pytest.mark.parametrize("task, family", [("inpaint", "inpaint"), ("upscale", "sr")])
def test_diffusion_tasks_are_scored_against_their_baselines(tmp_path, photos, task, family):
    model = load_model(tiny_models.diffusion_model(tmp_path / task, task))
    assert evaluate.task_of(model) == family
    scores = evaluate.evaluate(model, photos, ("set5",), crop=32, options=tasks.Sampling(steps=2, seed=3))
    again = evaluate.evaluate(model, photos, ("set5",), crop=32, options=tasks.Sampling(steps=2, seed=3))
    assert scores == again  # seeded: noise and inpainting masks
    image = evaluate.center_crop(load_image(photos / "set5" / "0.png"), 32, 4)
    if family == "sr":
        low = F.interpolate(image, size=(8, 8), mode="bicubic", antialias=True).clamp(-1, 1)
        bicubic = F.interpolate(low, size=(32, 32), mode="bicubic").clamp(-1, 1)
        assert scores[0].baseline_psnr == pytest.approx(metrics.psnr(bicubic, image))
        truth = metrics.gradient_energy(image)
        assert scores[0].baseline_gradient_ratio == pytest.approx(metrics.gradient_energy(bicubic) / truth)
        assert 0 < scores[0].baseline_gradient_ratio < 1 and scores[0].gradient_ratio > 0
    else:
        hole = evaluate.random_mask(32, 32, torch.Generator().manual_seed(3))[None]
        telea = evaluate.telea_inpaint(image, hole)
        assert scores[0].baseline_psnr == pytest.approx(evaluate.hole_psnr(telea, image, hole))
        assert scores[0].gradient_ratio is None
    assert math.isfinite(scores[0].psnr) and 0 < scores[0].ssim < 1


def test_emoji_round_trip_measures_colour_kept(tmp_path):
    model = load_model(tiny_models.autoencoder(tmp_path / "kl", "kl"))
    red = np.zeros((5, 16, 16, 3), dtype=np.uint8)
    red[..., 0] = 255
    trip = evaluate.emoji_round_trip(model, red, count=3, size=32)
    assert trip.images == 3
    assert trip.original_saturation == pytest.approx(8 / 9, abs=1e-5)  # (1, -1, -1): |4/3| + 2 |2/3|, over 3
    x = evaluate.emoji_at(red[:1], 32)
    reconstruction = tasks.reconstruct(model, x)
    made = reconstruction.image.float().mean((2, 3))
    assert trip.psnr == pytest.approx(reconstruction.psnr)
    assert trip.colour_error == pytest.approx((made - x.mean((2, 3))).abs().mean().item(), abs=1e-4)
    assert trip.saturation == pytest.approx((made - made.mean()).abs().mean().item(), abs=1e-4)


def test_class_and_unconditional_models_are_refused_with_the_reason(tmp_path, photos):
    tiny_models.official_checkpoint(tmp_path / "cin.safetensors", "cin")
    with pytest.raises(LatentgenError, match="no held-out evaluation for a ldm-class model"):
        evaluate.task_of(load_model(tmp_path / "cin.safetensors"))


def _picture(colour, background=(255, 255, 255)) -> torch.Tensor:
    pixels = np.full((16, 16, 3), background, dtype=np.uint8)
    pixels[4:12, 4:12] = colour
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1


@pytest.mark.parametrize("colour, name", [((220, 30, 40), "red"), ((240, 20, 50), "red"), ((30, 60, 220), "blue"),
                                          ((40, 180, 60), "green"), ((250, 220, 30), "yellow"),
                                          ((140, 50, 200), "purple"), ((250, 140, 20), "orange")])
def test_dominant_colour_names_the_hue_and_ignores_white_and_grey(colour, name):
    assert metrics.dominant_colour(_picture(colour)) == name
    assert metrics.dominant_colour(_picture(colour, background=(128, 128, 128))) == name


def test_dominant_colour_of_a_colourless_image_is_none():
    assert metrics.dominant_colour(_picture((90, 90, 90))) is None
    assert metrics.dominant_colour(_picture((20, 0, 0), background=(0, 0, 0))) is None  # too dark to tell


def test_txt2img_models_are_scored_on_colour_prompts(tmp_path):
    folder = tiny_models.diffusion_model(tmp_path / "t2i", "txt2img")
    result = CliRunner().invoke(app, ["train", "evaluate", str(folder), "--seeds", "2", "--steps", "2",
                                      "--json", str(tmp_path / "colours.json")])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "colours.json").read_text())
    assert written["task"] == "txt2img" and len(written["images"]) == 2 * len(evaluate.COLOUR_PROMPTS)
    assert {image["seed"] for image in written["images"]} == {0, 1}
    right = sum(image["found"] == image["expected"] for image in written["images"])
    assert written["accuracy"] == pytest.approx(right / len(written["images"]))
    assert "a red heart" in result.output and "colour prompts" in result.output


def test_cli_prints_table_and_writes_json(tmp_path, photos):
    folder = tiny_models.autoencoder(tmp_path / "kl", "kl")
    result = CliRunner().invoke(app, ["train", "evaluate", str(folder), "--data", str(photos), "--datasets", "set14",
                                      "--crop", "32", "--json", str(tmp_path / "scores.json")], env={"COLUMNS": "240"})
    assert result.exit_code == 0, result.output
    assert "set14" in result.output and "baseline PSNR" in result.output
    written = json.loads((tmp_path / "scores.json").read_text())
    assert written["task"] == "autoencoder" and len(written["images"]) == 2
    assert written["means"]["all"]["psnr"] == pytest.approx(np.mean([s["psnr"] for s in written["images"]]))
