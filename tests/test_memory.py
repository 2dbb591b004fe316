"""Memory estimate: size parsing, monotonicity, accuracy against measured CPU peaks, and the
CLI's refusal to start a run that would not fit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from latentgen import detect, memory, tasks
from latentgen.cli import app
from latentgen.errors import LatentgenError
from latentgen.ldm import LatentDiffusion
from latentgen.loader import load_model
from latentgen.models.autoencoder import AutoencoderKL
from latentgen.models.unet import UNetModel

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402

runner = CliRunner()

# Held-out shapes (the constants were calibrated on others): an SD-like transformer UNet with a
# 4-level f8 VAE, and an LDM-like UNet with legacy pixel attention and an f4 decoder.
SD_LIKE = {
    "unet": {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": 2,
             "attention_resolutions": [4, 2, 1], "channel_mult": [1, 2, 4, 4], "num_head_channels": 16,
             "use_spatial_transformer": True, "context_dim": 64, "legacy": False},
    "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                 "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0},
    "batch": 2, "size": [256, 192], "guided": True,
}
LDM_LIKE = {
    "unet": {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 64, "num_res_blocks": 2,
             "attention_resolutions": [2, 4, 8], "channel_mult": [1, 2, 3, 4], "num_heads": 4},
    "ddconfig": {**SD_LIKE["ddconfig"], "ch": 64, "ch_mult": [1, 2, 4]},
    "batch": 1, "size": [192, 256], "guided": False,
}

# Run in a fresh process: peak resident memory (VmHWM, reset through /proc/self/clear_refs) grown
# over building the model, over one UNet forward and over one decode.
MEASURE = r"""
import json, re, sys
import torch
sys.path.insert(0, sys.argv[2])
import test_memory

def rss(field):
    return int(re.search(rf"^{field}:\s+(\d+) kB", open("/proc/self/status").read(), re.M).group(1)) * 1024

def growth(make):
    open("/proc/self/clear_refs", "w").write("5")
    base = rss("VmRSS")
    with torch.no_grad():
        kept = make()
    return rss("VmHWM") - base, kept

results = []
for case in json.loads(sys.argv[1]):
    weights, model = growth(lambda: test_memory.build(case))
    b, (h, w), f = case["batch"], case["size"], test_memory.factor(case)
    batch = b * (2 if case["guided"] else 1)
    x, t = torch.randn(batch, 4, h // f, w // f), torch.full((batch,), 500.0)
    context = torch.randn(batch, 77, 64) if case["unet"].get("context_dim") else None
    with torch.no_grad():  # warm-up at a small size: one-time allocations are not the run's
        model.unet(x[:1, :, :8, :8], t[:1], None if context is None else context[:1])
        model.first_stage.decode(x[:1, :, :4, :4])
    unet, _ = growth(lambda: model.unet(x, t, context))
    decode, _ = growth(lambda: model.first_stage.decode(x[:b]))
    results.append({"weights": weights, "unet": unet, "decode": decode})
print(json.dumps(results))
"""


def factor(case: dict) -> int:
    return 2 ** (len(case["ddconfig"]["ch_mult"]) - 1)


def build(case: dict) -> LatentDiffusion:
    torch.manual_seed(0)
    params = detect.normalize_params({"unet_config": {"params": case["unet"]}, "conditioning_key": "crossattn",
                                      "first_stage_config": {"params": {"ddconfig": case["ddconfig"], "embed_dim": 4}}})
    return LatentDiffusion(UNetModel(**case["unet"]).eval(), AutoencoderKL(case["ddconfig"], 4).eval(), None,
                           detect.model_spec(params), torch.zeros(1000), params, "test")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_models.diffusion_model(tmp_path_factory.mktemp("models") / "txt2img", "txt2img")


@pytest.mark.parametrize("text, size", [
    ("8GB", 8 * 10**9), ("512MiB", 512 * 2**20), ("512M", 512 * 2**20), ("1.5 GiB", 3 * 2**29),
    ("2048", 2048), ("64kb", 64_000), ("1TiB", 2**40),
])
def test_parse_size(text, size):
    assert memory.parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "8 parsecs", "-1GB", "GB", "1e9", ""])
def test_parse_size_rejects_nonsense_in_one_line(text):
    with pytest.raises(LatentgenError, match="cannot read memory size"):
        memory.parse_size(text)


def test_estimate_grows_with_batch_size_guidance_and_precision():
    model = build(SD_LIKE)
    base = memory.estimate(model, 1, (128, 128), False)
    assert memory.estimate(model, 2, (128, 128), False).activations > base.activations
    assert memory.estimate(model, 1, (128, 128), True).unet == 2 * base.unet
    assert memory.estimate(model, 1, (256, 128), False).total > base.total
    assert memory.estimate(model, 1, (256, 256), False).decode == 4 * base.decode
    assert memory.estimate(model, 2, (128, 128), False).weights == base.weights
    half = memory.estimate(model, 1, (128, 128), False, dtype=torch.float16)
    assert half.total * 2 == pytest.approx(base.total, rel=1e-6)
    assert memory.estimate(model, 1, (128, 128), False, dtype=torch.bfloat16) == half
    exact = sum(t.numel() for m in model.modules() for t in [*m.parameters(), *m.buffers()]) * 4
    assert base.weights == exact


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc peak-RSS reset")
def test_estimate_is_within_a_factor_of_two_of_the_measured_cpu_peak():
    cases = [SD_LIKE, LDM_LIKE]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors leave RSS
    done = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(cases), str(Path(__file__).parent)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    for case, measured in zip(cases, json.loads(done.stdout)):
        estimate = memory.estimate(build(case), case["batch"], tuple(case["size"]), case["guided"])
        for part in ("weights", "unet", "decode"):
            ratio = measured[part] / getattr(estimate, part)
            assert 0.5 < ratio < 2, (part, measured[part], getattr(estimate, part))
        peak = measured["weights"] + max(measured["unet"], measured["decode"])
        assert 0.5 < peak / estimate.total < 2


def test_txt2img_refuses_to_start_over_max_memory(tiny, tmp_path):
    result = runner.invoke(app, ["txt2img", "cat", "--ckpt", str(tiny), "-n", "4", "--batch-size", "4",
                                 "--max-memory", "1MiB", "--out", str(tmp_path)])
    assert result.exit_code == 1
    line = " ".join(result.output.split())  # rich wraps the one line at the terminal's width
    assert line.startswith("error: this run needs about ") and "more than --max-memory 1MiB" in line
    assert "--batch-size" in line and "--height/--width" in line and "--dtype fp16" in line
    assert "Traceback" not in result.output
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.slow
def test_txt2img_reports_the_estimate_and_runs_within_the_limit(tiny, tmp_path):
    result = runner.invoke(app, ["--json", "txt2img", "cat", "--ckpt", str(tiny), "--steps", "1", "-n", "2",
                                 "--batch-size", "2", "--max-memory", "4GiB", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    model = tasks.prepare(load_model(tiny), "cpu", "fp32")
    expected = memory.estimate(model, 2, (64, 64), guided=True)
    assert summary["memory_estimate"] == expected.total
    assert len(summary["outputs"]) == 2


def test_refuses_when_the_device_has_too_little_free_memory(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available", lambda device: 1000)
    result = runner.invoke(app, ["txt2img", "cat", "--ckpt", str(tiny), "--out", str(tmp_path)])
    assert result.exit_code == 1
    line = " ".join(result.output.split())
    assert "more than the 1000 B free on cpu" in line and "--batch-size" not in line


def test_inpaint_and_upscale_take_max_memory(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), "gray").save(tmp_path / "img.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    mask.save(tmp_path / "mask.png")
    for task, args in (("inpaint", [tmp_path / "img.png", tmp_path / "mask.png"]), ("upscale", [tmp_path / "img.png"])):
        folder = tiny_models.diffusion_model(tmp_path / task, task)
        result = runner.invoke(app, [task, *map(str, args), "--ckpt", str(folder), "--max-memory", "100KB",
                                     "--out", str(tmp_path / "out")])
        assert result.exit_code == 1 and "more than --max-memory 100KB" in " ".join(result.output.split())


def test_available_cpu_memory_is_read():
    free = memory.available(torch.device("cpu"))
    assert free is not None and 0 < free < 2**50
