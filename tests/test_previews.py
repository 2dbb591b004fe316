"""Previews while sampling: the fitted latent-to-RGB projection, TAESD files, and that neither
changes the final image."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from latentgen import previews, tasks
from latentgen.cli import app
from latentgen.loader import load_model

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return tiny_models.diffusion_model(tmp_path_factory.mktemp("preview") / "txt2img", "txt2img")


def test_projection_reproduces_the_probe_colours(model_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTGEN_CACHE", str(tmp_path))
    model = tasks.prepare(load_model(model_folder), "cpu", "fp32")
    matrix = previews.projection(model)
    assert matrix.shape == (5, 3) and (tmp_path / "previews.json").is_file()
    assert torch.equal(previews.projection(model), matrix)  # from the cache, the same numbers
    probes = previews._probe_images(torch.Generator().manual_seed(0))
    shown = previews.project(tasks.encode(model, probes), matrix, model.spec.factor)
    assert shown.shape == probes.shape
    blocks = torch.nn.functional.avg_pool2d(probes, 8)
    fitted = torch.nn.functional.avg_pool2d(shown, 8)
    assert (fitted - blocks).abs().mean() < (blocks - blocks.mean()).abs().mean()  # better than one flat colour


def test_preview_is_written_and_the_image_is_unchanged(model_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTGEN_CACHE", str(tmp_path / "cache"))
    common = ["txt2img", "a cat", "--ckpt", str(model_folder), "--steps", "4"]
    plain = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "plain.png")])
    shown = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "shown.png"), "--preview",
                                     str(tmp_path / "preview.png"), "--preview-every", "2"])
    assert plain.exit_code == 0 and shown.exit_code == 0, shown.output
    assert Image.open(tmp_path / "preview.png").size == (64, 64)
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "plain.png")),
                                  np.array(Image.open(tmp_path / "shown.png")))


def test_taesd_decoder_files_load_strictly(model_folder, tmp_path):
    decoder = previews.taesd_decoder(4)
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(tmp_path / "taesd_decoder.safetensors"))
    torch.save(decoder.state_dict(), tmp_path / "taesd_decoder.pth")
    for name in ("taesd_decoder.safetensors", "taesd_decoder.pth"):
        loaded = previews.load_taesd(tmp_path / name, 4)
        assert loaded(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 64, 64)
    result = CliRunner().invoke(app, ["txt2img", "x", "--ckpt", str(model_folder), "--steps", "2", "--out",
                                      str(tmp_path / "a.png"), "--preview", str(tmp_path / "p.png"),
                                      "--taesd", str(tmp_path / "taesd_decoder.pth")])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "p.png").size == (64, 64)
    wrong = CliRunner().invoke(app, ["txt2img", "x", "--ckpt", str(model_folder), "--steps", "2", "--out",
                                     str(tmp_path / "b.png"), "--preview", str(tmp_path / "q.png"),
                                     "--taesd", str(model_folder / "model.safetensors")])
    assert wrong.exit_code == 1 and "not a TAESD decoder" in wrong.output and not (tmp_path / "b.png").exists()


def test_bundled_models_store_their_projection(tmp_path, monkeypatch):
    from latentgen import catalog

    monkeypatch.setenv("LATENTGEN_CACHE", str(tmp_path))
    model = load_model(catalog.default_model("txt2img"))
    stored = model.spec.preview_projection
    assert stored is not None and len(stored) == model.spec.latent_channels + 1
    assert torch.equal(previews.projection(model), torch.tensor(stored)) and not (tmp_path / "previews.json").exists()
    refit = previews.fit_projection(model.first_stage, model.spec.scale_factor, model.spec.factor)
    torch.testing.assert_close(refit, torch.tensor(stored), rtol=0, atol=1e-5)  # what fit-preview wrote
