"""`latentgen bench` on a toy architecture: what it measures and that both runners compute the same
thing (no wall-clock assertions: the numbers themselves are only checked to be sane)."""

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from latentgen import bench

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402

CPU = torch.device("cpu")
PARITY = 1e-4


class FakeClock:
    """perf_counter that advances by a given number of milliseconds per call of the timed function."""

    def __init__(self, durations_ms):
        self.now, self.durations, self.calls = 0.0, list(durations_ms), 0

    def perf_counter(self):
        return self.now

    def work(self):
        self.now += self.durations[self.calls] / 1000
        self.calls += 1


def test_time_ms_is_the_median_of_the_timed_calls_after_warmup(monkeypatch):
    clock = FakeClock([100.0, 100.0, 5.0, 1.0, 3.0, 9.0, 2.0])
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    assert bench.time_ms([clock.work], CPU, repeats=5, warmup=2) == [pytest.approx(3.0)]
    assert clock.calls == 7


def test_time_ms_without_warmup_calls_exactly_repeats_times():
    calls = []
    assert bench.time_ms([lambda: calls.append(1)], CPU, repeats=4, warmup=0)[0] >= 0
    assert len(calls) == 4


def test_time_ms_interleaves_the_runners_so_drift_weighs_on_both():
    calls = []
    medians = bench.time_ms([lambda: calls.append("a"), lambda: calls.append("b")], CPU, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4 and len(medians) == 2


def test_random_state_dict_is_scaled_per_role_in_tensors_of_their_own():
    with torch.device("meta"):
        module = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.LayerNorm(64))
    state = bench.random_state_dict(module, CPU, torch.float32, seed=3)
    weight, bias, gain = state["0.weight"], state["0.bias"], state["1.weight"]
    assert weight.untyped_storage().data_ptr() != gain.untyped_storage().data_ptr()
    assert weight.std().item() == pytest.approx(256**-0.5, rel=0.1)
    assert gain.mean().item() == pytest.approx(1.0, abs=0.05) and bias.abs().max().item() < 0.2
    again = bench.random_state_dict(module, CPU, torch.float32, seed=3)
    assert torch.equal(again["0.weight"], weight)


def test_random_convolutions_come_channels_last_when_asked():
    with torch.device("meta"):
        module = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.GroupNorm(2, 8))
    state = bench.random_state_dict(module, CPU, torch.bfloat16, memory_format=torch.channels_last)
    weight = state["0.weight"]
    assert weight.shape == (8, 4, 3, 3) and weight.is_contiguous(memory_format=torch.channels_last)
    assert state["1.weight"].is_contiguous()
    unet, vae = bench.build_latentgen(bench.architecture("tiny"), CPU, torch.bfloat16)
    assert unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert vae.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.fixture(scope="module")
def tiny_rows():
    return bench.run(CPU, torch.float32, latent=8, steps=2, repeats=1, arch="tiny", warmup=1, channels_last=True,
                     cuda_graph_step=True)


def test_run_times_both_runners_on_the_same_weights(tiny_rows):
    rows = {row.name: row for row in tiny_rows}
    compared = ["UNet step, batch 1", "UNet step, batch 2", "2-step guided DDIM image + decode", "decode",
                "UNet step, batch 2, channels_last", "2-step guided image, channels_last"]
    for name in compared:
        row = rows[name]
        assert math.isfinite(row.latentgen_ms) and row.latentgen_ms > 0
        assert math.isfinite(row.diffusers_ms) and row.diffusers_ms > 0
        assert row.ratio == pytest.approx(row.latentgen_ms / row.diffusers_ms)
        assert row.extra["rel_diff"] < PARITY, name
    assert rows["UNet step, batch 2, channels_last"].extra["rel_eager"] < PARITY
    assert rows["peak RSS of the process (MB)"].latentgen_ms > 0
    assert not any("CUDA graph" in name for name in rows)  # needs a GPU: skipped, not faked


def test_run_without_diffusers_has_only_latentgen_numbers():
    rows = bench.run(CPU, torch.float32, latent=8, steps=1, repeats=1, arch="tiny", warmup=0, with_diffusers=False)
    assert [row.diffusers_ms for row in rows] == [None] * len(rows)
    assert all(row.latentgen_ms > 0 for row in rows)


def test_diffusers_runner_shares_our_tensors():
    unet, vae = bench.build_latentgen(bench.ARCHITECTURES["tiny"], CPU, torch.float32)
    theirs_unet, theirs_vae = bench.diffusers_models(unet, vae, bench.ARCHITECTURES["tiny"].params())
    assert theirs_unet.conv_in.weight.data_ptr() == unet.input_blocks[0][0].weight.data_ptr()
    assert theirs_vae.post_quant_conv.weight.data_ptr() == vae.post_quant_conv.weight.data_ptr()


def test_json_round_trips(tmp_path, tiny_rows):
    context = bench.environment(CPU, torch.float32)
    (tmp_path / "bench.json").write_text(bench.to_json(tiny_rows, context))
    assert bench.read_json(tmp_path / "bench.json") == (context, tiny_rows)


def test_bundled_mode_skips_models_that_are_not_installed(monkeypatch, tmp_path):
    monkeypatch.setattr(bench.catalog, "weights_dirs", lambda: [tmp_path])
    notes = []
    assert bench.run_bundled(CPU, torch.float32, repeats=1, report=notes.append) == []
    assert len(notes) == len(set(bench.catalog.DEFAULTS.values()))
    assert bench.cold_start_rows(CPU, notes.append) == [] and "not installed" in notes[-1]


@pytest.mark.slow  # loading a model folder imports the text-encoder stack
def test_bundled_mode_compares_an_installed_model_folder(monkeypatch, tmp_path):
    arch = bench.ARCHITECTURES["tiny"]
    unet, vae = bench.build_latentgen(arch, CPU, torch.float32, seed=5)
    state = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    state.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    folder = tmp_path / "tiny-model"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    params = {**arch.params(), "cond_stage_config": "__is_unconditional__"}
    (folder / "config.json").write_text(json.dumps({"model": {"params": params}}))
    monkeypatch.setattr(bench.catalog, "weights_dirs", lambda: [tmp_path])
    rows = bench.run_bundled(CPU, torch.float32, repeats=1, warmup=0, names=["tiny-model"], steps=2)
    assert [row.name for row in rows] == ["tiny-model: UNet step, batch 2", "tiny-model: decode",
                                          "tiny-model: 2-step image + decode"]
    for row in rows:
        assert row.latentgen_ms > 0 and row.diffusers_ms > 0 and row.extra["rel_diff"] < PARITY


@pytest.mark.parametrize("task", ["inpaint", "upscale"])
def test_bundled_mode_compares_concat_models_with_unet2d_and_vqmodel(monkeypatch, tmp_path, task):
    """The transformer-free concat UNets and VQ first stages meet diffusers' UNet2DModel and VQModel."""
    tiny_models.diffusion_model(tmp_path / f"tiny-{task}", task)
    monkeypatch.setattr(bench.catalog, "weights_dirs", lambda: [tmp_path])
    rows = bench.run_bundled(CPU, torch.float32, repeats=1, warmup=0, names=[f"tiny-{task}"], steps=3)
    assert [row.name for row in rows] == [f"tiny-{task}: UNet step, batch 1", f"tiny-{task}: decode",
                                          f"tiny-{task}: 3-step image + decode"]
    for row in rows:
        assert row.latentgen_ms > 0 and row.diffusers_ms > 0 and row.extra["rel_diff"] < PARITY


def test_cli_bench_writes_a_table_and_json(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from latentgen.cli import app

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--arch", "tiny", "--device", "cpu", "--latent", "8", "--steps", "2", "--repeats", "1",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    context, rows = bench.read_json(out)
    assert context["device"] == "cpu"
    assert rows[1].name == "UNet step, batch 2" and rows[1].extra["rel_diff"] < PARITY


FAKE_SD_CPP = '''#!{python}
"""A stand-in for stable-diffusion.cpp's sd: checks the file is an SD 1.x single-file checkpoint,
records its arguments, holds some memory and writes a W x H PNG, as the real binary would."""
import json, sys
from PIL import Image
from safetensors import safe_open
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
with safe_open(value("-m"), "pt") as f:
    keys = set(f.keys())
assert "model.diffusion_model.input_blocks.0.0.weight" in keys
assert "first_stage_model.decoder.conv_out.weight" in keys
assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
ballast = bytearray(64 * 2**20)
json.dump(args, open({record!r}, "w"))
Image.new("RGB", (int(value("-W")), int(value("-H")))).save(value("-o"))
'''


@pytest.mark.slow
def test_bench_processes_times_latentgen_diffusers_and_sd_cpp_on_one_checkpoint(tmp_path):
    """--processes --peer sd-cpp PATH: three cold processes on one file, side by side, and nothing
    in-process; diffusers' own pipeline loads the file offline from the config folder we write."""
    from typer.testing import CliRunner

    from latentgen.cli import app

    fake = tmp_path / "sd"
    fake.write_text(FAKE_SD_CPP.format(python=sys.executable, record=str(tmp_path / "args.json")))
    fake.chmod(0o755)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--arch", "tiny", "--latent", "8", "--steps", "2", "--repeats", "1",
                                      "--processes", "--device", "cpu", "--peer", "sd-cpp", str(fake),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {row.name: row for row in bench.read_json(out)[1]}
    assert set(rows) == {"2-step 64 px image, cold process (ms)", "peak RSS of that process (MB)"}
    cold, memory = rows["2-step 64 px image, cold process (ms)"], rows["peak RSS of that process (MB)"]
    assert cold.latentgen_ms > 0 and cold.diffusers_ms > 0 and cold.sdcpp_ms > 0
    assert cold.sdcpp_ratio == cold.latentgen_ms / cold.sdcpp_ms and cold.ratio == cold.latentgen_ms / cold.diffusers_ms
    assert memory.sdcpp_ms >= 64 and memory.latentgen_ms > memory.sdcpp_ms  # the ballast; torch weighs more
    assert memory.diffusers_ms > memory.sdcpp_ms
    args = json.loads((tmp_path / "args.json").read_text())
    assert args[args.index("--sampling-method") + 1] == "euler" and args[args.index("--steps") + 1] == "2"
    assert args[args.index("-W") + 1] == "64" and args[args.index("--cfg-scale") + 1] == "7.5"
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(bench.table(list(rows.values()), "peer"))
    text = console.export_text()
    assert "ratio sd.cpp" in text and "diffusers" in text


def test_the_diffusers_process_makes_the_image_latentgen_makes_from_the_same_file(tmp_path):
    """Both cold processes read one checkpoint and sample Euler with guidance from seed 0's noise:
    the diffusers config folder describes the file's architecture, or the images would differ."""
    arch = bench.architecture("tiny")
    weights, config = bench.write_checkpoint(arch, tmp_path)
    folder = bench.write_diffusers_config(arch, tmp_path / "diffusers")
    for name, command in (("ours", bench.latentgen_command(weights, config, 64, 3, tmp_path / "ours.png", "fp32")),
                          ("theirs", bench.diffusers_command(weights, folder, 64, 3, tmp_path / "theirs.png"))):
        bench.run_process(command, tmp_path / f"{name}.log")
    ours, theirs = (np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.float64) for name in ("ours", "theirs"))
    assert ours.shape == theirs.shape == (64, 64, 3)
    assert ours.std() > 10 and np.abs(ours - theirs).max() <= 1  # rounding apart


def test_bench_peer_refuses_a_missing_binary_and_another_peer(tmp_path):
    from typer.testing import CliRunner

    from latentgen.cli import app

    missing = CliRunner().invoke(app, ["bench", "--arch", "tiny", "--latent", "8", "--steps", "1", "--repeats", "1",
                                       "--no-diffusers", "--peer", "sd-cpp", str(tmp_path / "nope"),
                                       "--out", str(tmp_path / "b.json")])
    assert missing.exit_code != 0 and "no stable-diffusion.cpp binary" in missing.output
    other = CliRunner().invoke(app, ["bench", "--peer", "comfy", str(tmp_path), "--out", str(tmp_path / "c.json")])
    assert other.exit_code != 0 and "--peer takes sd-cpp PATH" in other.output


def test_a_reduced_precision_run_says_how_far_its_image_is_from_float32():
    rows = {row.name: row for row in bench.run(CPU, torch.bfloat16, latent=8, steps=2, repeats=1, arch="tiny",
                                               with_diffusers=False, warmup=0)}
    row = rows["guided image vs float32: PSNR (dB)"]
    assert 15 < row.latentgen_ms < math.inf and 0 < row.extra["rel_diff"] < 0.2
    assert "guided image vs float32: PSNR (dB)" not in {r.name for r in bench.run(
        CPU, torch.float32, latent=8, steps=1, repeats=1, arch="tiny", with_diffusers=False, warmup=0)}
