"""The regression estimators an LDM-SR or inpainting model refines: they start as their baseline
(bicubic, push-pull fill), learn and resume exactly, are stored inside a model folder of their
kind, and `upscale` / `inpaint` start from them at strength < 1."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from latentgen import images, tasks
from latentgen.cli import app
from latentgen.errors import LatentgenError
from latentgen.loader import load_model
from latentgen.models.estimator import ResidualInpainter, ResidualUpscaler, push_pull_fill, zero_init_residuals
from latentgen.train.data import ImageBatches, downsample, random_mask
from latentgen.train.estimator import EstimatorConfig, EstimatorTrainer, attach, train_estimator

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402


def photos() -> ImageBatches:
    """Smooth random crops: 4x4 blocks of colour, bilinearly enlarged (something bicubic gets wrong)."""
    base = torch.from_numpy(np.random.default_rng(0).random((8, 3, 4, 4), dtype=np.float32))
    smooth = F.interpolate(base, size=32, mode="bilinear", align_corners=False)
    return ImageBatches((smooth.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8), crop=32)


def config(steps: int, task: str = "sr") -> EstimatorConfig:
    """All steps in the warm-up: the learning rate does not depend on `steps`, so 6 then 12 is 12."""
    return EstimatorConfig(task=task, channels=8, blocks=2, crop=32, batch=4, lr=3e-3, steps=steps, warmup=20,
                           checkpoint_every=2, device="cpu")


def test_the_untrained_estimator_is_bicubic_upsampling():
    model = ResidualUpscaler(4, 8, 2)
    zero_init_residuals(model)
    low = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(low), F.interpolate(low, scale_factor=4, mode="bicubic"), rtol=0, atol=0)


def test_push_pull_fills_holes_smoothly_and_keeps_known_pixels():
    image = torch.rand(1, 3, 20, 28) * 2 - 1
    known = (torch.rand(1, 1, 20, 28) > 0.7).float()
    filled = push_pull_fill(image, known)
    torch.testing.assert_close(filled * known, image * known, rtol=0, atol=0)
    assert torch.isfinite(filled).all() and filled.abs().max() <= 1
    flat = torch.full((1, 3, 20, 28), 0.25)
    torch.testing.assert_close(push_pull_fill(flat, known), flat)  # a constant image is filled with itself


def test_the_untrained_inpainter_is_the_push_pull_fill():
    model = ResidualInpainter(8, 2)
    zero_init_residuals(model)
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    hole = torch.stack([random_mask(32, 32, torch.Generator().manual_seed(i)) for i in range(2)])
    with torch.no_grad():
        torch.testing.assert_close(model(torch.cat([image * (1 - hole), hole], 1)), push_pull_fill(image, 1 - hole),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("task", ["sr", "inpaint"])
def test_the_estimator_learns_resumes_exactly_and_exports(tmp_path, task):
    straight = train_estimator(config(12, task), photos(), tmp_path / "straight", quiet=True)
    untrained = EstimatorTrainer.build(config(12, task))
    x = photos().sample(4, torch.Generator().manual_seed(7))[0]
    straight.generator.manual_seed(8)
    inputs = straight.inputs(x)
    with torch.no_grad():
        errors = [straight.loss(x, model(inputs), straight.loss_weight(inputs))[1]["mse"]
                  for model in (untrained, straight.model)]
    assert errors[1] < errors[0]  # better than its baseline on fixed inputs
    train_estimator(config(6, task), photos(), tmp_path / "resumed", quiet=True)
    resumed = train_estimator(config(12, task), photos(), tmp_path / "resumed", quiet=True)
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)
    exported = json.loads((tmp_path / "straight" / "export" / "config.json").read_text())
    params = {"factor": 4, "channels": 8, "blocks": 2} if task == "sr" else {"channels": 8, "blocks": 2}
    assert exported["model"]["params"] == params


def folders_with_estimator(root: Path, kind: str, task: str) -> tuple[Path, Path]:
    """(a tiny `kind` model folder, a copy of it with a `task` estimator trained for 4 steps attached)."""
    plain = tiny_models.diffusion_model(root / "plain", kind)
    train_estimator(config(4, task), photos(), root / "run", quiet=True)
    shutil.copytree(plain, root / "with")
    attach(root / "with", root / "run" / "export")
    return plain, root / "with"


@pytest.fixture(scope="module")
def sr_with_estimator(tmp_path_factory):
    """(a tiny LDM-SR folder without, and a copy with, a trained estimator)."""
    return folders_with_estimator(tmp_path_factory.mktemp("estimator"), "upscale", "sr")


def test_upscale_starts_from_the_estimate_below_strength_one(sr_with_estimator):
    plain, with_estimator = (tasks.prepare(load_model(p), "cpu", "fp32") for p in sr_with_estimator)
    assert plain.estimator is None and with_estimator.estimator is not None
    low = downsample(photos().sample(1, torch.Generator().manual_seed(3))[0], 4)
    options = tasks.Sampling(steps=4, seed=1)
    with torch.no_grad():
        estimate = with_estimator.estimator(low).clamp(-1, 1)
    torch.testing.assert_close(tasks.upscale(with_estimator, low, options, strength=0), estimate, rtol=0, atol=0)
    # strength 1: the estimate is unused, the UNet and first stage sample from noise as without it
    torch.testing.assert_close(tasks.upscale(with_estimator, low, options, strength=1),
                               tasks.upscale(plain, low, options), rtol=0, atol=1e-6)  # float noise only
    refined = tasks.upscale(with_estimator, low, options, strength=0.5)
    assert torch.isfinite(refined).all() and not torch.equal(refined, estimate)
    assert tasks.refine_strength(with_estimator, None) == 1.0  # no default_strength in its config
    with pytest.raises(LatentgenError, match="no regression estimator"):
        tasks.refine_strength(plain, 0.5)
    with pytest.raises(LatentgenError, match="between 0 and 1"):
        tasks.refine_strength(with_estimator, 1.5)


def test_upscale_command_records_the_strength(sr_with_estimator, tmp_path):
    low = tmp_path / "low.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(low)
    result = CliRunner().invoke(app, ["-q", "upscale", str(low), "--ckpt", str(sr_with_estimator[1]), "--steps", "2",
                                      "--strength", "0.5", "--out", str(tmp_path / "up.png")])
    assert result.exit_code == 0, result.output
    parameters = images.parse_parameters(images.read_parameters(tmp_path / "up.png"))
    assert parameters["Denoising strength"] == "0.5"


@pytest.fixture(scope="module")
def inpaint_with_estimator(tmp_path_factory):
    """(a tiny inpainting folder without, and a copy with, a trained inpainter)."""
    return folders_with_estimator(tmp_path_factory.mktemp("inpainter"), "inpaint", "inpaint")


def test_inpaint_starts_from_the_estimate_below_strength_one(inpaint_with_estimator):
    plain, with_estimator = (tasks.prepare(load_model(p), "cpu", "fp32") for p in inpaint_with_estimator)
    assert plain.estimator is None and with_estimator.estimator is not None
    image = photos().sample(1, torch.Generator().manual_seed(3))[0][..., :30, :]  # padded to 32 inside
    hole = random_mask(30, 32, torch.Generator().manual_seed(5))[None]
    options = tasks.Sampling(steps=3, seed=1)
    with torch.no_grad():
        padded = F.pad(image, (0, 0, 0, 2), mode="reflect")
        padded_hole = F.pad(hole, (0, 0, 0, 2), mode="reflect")
        estimate = with_estimator.estimator(torch.cat([padded * (1 - padded_hole), padded_hole], 1))
    filled = tasks.inpaint(with_estimator, image, hole, options=options, feather=0, strength=0)
    torch.testing.assert_close(filled, estimate.clamp(-1, 1)[..., :30, :] * hole + image * (1 - hole), rtol=0, atol=0)
    torch.testing.assert_close(tasks.inpaint(with_estimator, image, hole, options=options, strength=1),
                               tasks.inpaint(plain, image, hole, options=options), rtol=0, atol=1e-6)
    refined = tasks.inpaint(with_estimator, image, hole, options=options, feather=0, strength=0.5)
    assert torch.isfinite(refined).all() and not torch.equal(refined, filled)
    torch.testing.assert_close(refined * (1 - hole), image * (1 - hole), rtol=0, atol=0)  # kept pixels exact
    with pytest.raises(LatentgenError, match="no regression estimator"):
        tasks.inpaint(plain, image, hole, options=options, strength=0)


def test_inpaint_command_records_the_strength(inpaint_with_estimator, tmp_path):
    picture, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(picture)
    hole = np.zeros((32, 32), np.uint8)
    hole[8:20, 4:28] = 255
    Image.fromarray(hole).save(mask)
    result = CliRunner().invoke(app, ["-q", "inpaint", str(picture), str(mask), "--ckpt", str(inpaint_with_estimator[1]),
                                      "--strength", "0", "--out", str(tmp_path / "filled.png")])
    assert result.exit_code == 0, result.output
    parameters = images.parse_parameters(images.read_parameters(tmp_path / "filled.png"))
    assert parameters["Denoising strength"] == "0"


def test_attach_refuses_a_model_of_another_kind(tmp_path, sr_with_estimator, inpaint_with_estimator):
    inpaint = tiny_models.diffusion_model(tmp_path / "inpaint", "inpaint")
    with pytest.raises(LatentgenError, match="not an x4 LDM-SR model folder"):
        attach(inpaint, sr_with_estimator[1].parent / "run" / "export")
    with pytest.raises(LatentgenError, match="not an inpainting model folder"):
        attach(sr_with_estimator[0], inpaint_with_estimator[1].parent / "run" / "export")


def test_the_loader_refuses_an_estimator_of_another_kind(tmp_path, sr_with_estimator):
    folder = shutil.copytree(sr_with_estimator[1], tmp_path / "odd")
    config = json.loads((folder / "config.json").read_text())
    params = config["model"]["params"] if "model" in config else config
    params["estimator_config"]["target"] = "latentgen.models.estimator.ResidualInpainter"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LatentgenError, match="does not fit"):
        load_model(folder)


def test_train_estimator_command_stores_it_into_an_sr_folder(tmp_path):
    plain = tiny_models.diffusion_model(tmp_path / "sr", "upscale")
    crops = photos()
    np.save(tmp_path / "photos.npy", (crops.sample(8, torch.Generator().manual_seed(0))[0].permute(0, 2, 3, 1)
                                      .add(1).mul(127.5).round().byte().numpy()))
    result = CliRunner().invoke(app, ["train", "estimator", "--run", str(tmp_path / "run"), "--into", str(plain),
                                      "--channels", "8", "--blocks", "1", "--crop", "32", "--batch", "2",
                                      "--steps", "2", "--photos", str(tmp_path / "photos.npy"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert load_model(plain).estimator is not None
