"""The regression upscaler an LDM-SR model refines: it starts as bicubic, learns and resumes
exactly, is stored inside an SR model folder, and `upscale` starts from it at strength < 1."""

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
from latentgen.models.estimator import ResidualUpscaler, zero_init_residuals
from latentgen.train.data import ImageBatches, downsample
from latentgen.train.estimator import EstimatorConfig, attach, train_estimator

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402


def photos() -> ImageBatches:
    """Smooth random crops: 4x4 blocks of colour, bilinearly enlarged (something bicubic gets wrong)."""
    base = torch.from_numpy(np.random.default_rng(0).random((8, 3, 4, 4), dtype=np.float32))
    smooth = F.interpolate(base, size=32, mode="bilinear", align_corners=False)
    return ImageBatches((smooth.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8), crop=32)


def config(steps: int) -> EstimatorConfig:
    """All steps in the warm-up: the learning rate does not depend on `steps`, so 6 then 12 is 12."""
    return EstimatorConfig(channels=8, blocks=2, crop=32, batch=4, lr=3e-3, steps=steps, warmup=20,
                           checkpoint_every=2, device="cpu")


def test_the_untrained_estimator_is_bicubic_upsampling():
    model = ResidualUpscaler(4, 8, 2)
    zero_init_residuals(model)
    low = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(low), F.interpolate(low, scale_factor=4, mode="bicubic"), rtol=0, atol=0)


def test_the_estimator_learns_resumes_exactly_and_exports(tmp_path):
    logs = []
    straight = train_estimator(config(12), photos(), tmp_path / "straight", quiet=True,
                               on_step=lambda step, log: logs.append(log["mse"]))
    assert sum(logs[-3:]) < sum(logs[:3])
    train_estimator(config(6), photos(), tmp_path / "resumed", quiet=True)
    resumed = train_estimator(config(12), photos(), tmp_path / "resumed", quiet=True)
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)
    exported = json.loads((tmp_path / "straight" / "export" / "config.json").read_text())
    assert exported["model"]["params"] == {"factor": 4, "channels": 8, "blocks": 2}


@pytest.fixture(scope="module")
def sr_with_estimator(tmp_path_factory):
    """(a tiny LDM-SR folder without, and a copy with, a trained estimator)."""
    root = tmp_path_factory.mktemp("estimator")
    plain = tiny_models.diffusion_model(root / "plain", "upscale")
    train_estimator(config(4), photos(), root / "run", quiet=True)
    shutil.copytree(plain, root / "with")
    attach(root / "with", root / "run" / "export")
    return plain, root / "with"


def test_upscale_starts_from_the_estimate_below_strength_one(sr_with_estimator):
    plain, with_estimator = (tasks.prepare(load_model(p), "cpu", "fp32") for p in sr_with_estimator)
    assert plain.sr_estimator is None and with_estimator.sr_estimator is not None
    low = downsample(photos().sample(1, torch.Generator().manual_seed(3))[0], 4)
    options = tasks.Sampling(steps=4, seed=1)
    with torch.no_grad():
        estimate = with_estimator.sr_estimator(low).clamp(-1, 1)
    torch.testing.assert_close(tasks.upscale(with_estimator, low, options, strength=0), estimate, rtol=0, atol=0)
    # strength 1: the estimate is unused, the UNet and first stage sample from noise as without it
    torch.testing.assert_close(tasks.upscale(with_estimator, low, options, strength=1),
                               tasks.upscale(plain, low, options), rtol=0, atol=1e-6)  # float noise only
    refined = tasks.upscale(with_estimator, low, options, strength=0.5)
    assert torch.isfinite(refined).all() and not torch.equal(refined, estimate)
    assert tasks.upscale_strength(with_estimator, None) == 1.0  # no default_strength in its config
    with pytest.raises(LatentgenError, match="no regression estimator"):
        tasks.upscale_strength(plain, 0.5)
    with pytest.raises(LatentgenError, match="between 0 and 1"):
        tasks.upscale_strength(with_estimator, 1.5)


def test_upscale_command_records_the_strength(sr_with_estimator, tmp_path):
    low = tmp_path / "low.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(low)
    result = CliRunner().invoke(app, ["-q", "upscale", str(low), "--ckpt", str(sr_with_estimator[1]), "--steps", "2",
                                      "--strength", "0.5", "--out", str(tmp_path / "up.png")])
    assert result.exit_code == 0, result.output
    parameters = images.parse_parameters(images.read_parameters(tmp_path / "up.png"))
    assert parameters["Denoising strength"] == "0.5"


def test_attach_refuses_a_model_that_is_not_ldm_sr(tmp_path, sr_with_estimator):
    inpaint = tiny_models.diffusion_model(tmp_path / "inpaint", "inpaint")
    with pytest.raises(LatentgenError, match="not an x4 LDM-SR model folder"):
        attach(inpaint, sr_with_estimator[1].parent / "run" / "export")


def test_train_estimator_command_stores_it_into_an_sr_folder(tmp_path):
    plain = tiny_models.diffusion_model(tmp_path / "sr", "upscale")
    crops = photos()
    np.save(tmp_path / "photos.npy", (crops.sample(8, torch.Generator().manual_seed(0))[0].permute(0, 2, 3, 1)
                                      .add(1).mul(127.5).round().byte().numpy()))
    result = CliRunner().invoke(app, ["train", "estimator", "--run", str(tmp_path / "run"), "--into", str(plain),
                                      "--channels", "8", "--blocks", "1", "--crop", "32", "--batch", "2",
                                      "--steps", "2", "--photos", str(tmp_path / "photos.npy"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert load_model(plain).sr_estimator is not None
