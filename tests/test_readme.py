"""Every command of the README's "Using it" block and its Python example, run as written.

The official checkpoints the README names (cin256-v2.ckpt, bsr_sr.ckpt, sd-v1-5-inpainting.ckpt)
cannot be downloaded here: tiny random-weight stand-ins in the same file formats and key layouts
sit under those names (with a sibling .yaml where a tiny width needs saying). The bundled models
serve every line without --ckpt. `latentgen bench` builds SD 1.5 at full size, so its line is run
by tests/test_bench.py at a tiny size instead.
"""

import re
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from latentgen.cli import app

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402

README = Path(__file__).parents[1] / "README.md"
SLOW_ELSEWHERE = ("bench",)


def readme_block(heading: str, language: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def readme_commands() -> list[list[str]]:
    commands = []
    for line in readme_block("## Using it", "bash").splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "latentgen":
            commands.append(words[1:])
    return commands


def picture(path: Path, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    Image.fromarray(smooth).resize((size, size), Image.BICUBIC).save(path)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The files the README's commands name, in the current folder."""
    for name, size, seed in (("photo.png", 64, 1), ("img.png", 64, 2), ("more.png", 48, 3), ("low.png", 16, 4)):
        picture(tmp_path / name, size, seed)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[20:44, 16:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    (tmp_path / "prompts.txt").write_text("a red heart\na green tree\n")
    tiny_models.official_checkpoint(tmp_path / "cin256-v2.ckpt", "cin", n_classes=1001)
    shutil.copy(tmp_path / "cin256-v2.ckpt", tmp_path / "model.ckpt")
    tiny_models.official_checkpoint(tmp_path / "sd-v1-5-inpainting.ckpt", "sd-inpaint")
    tiny_models.tiny_clip_config(tmp_path / "sd-v1-5-inpainting.yaml")  # JSON is YAML
    sr = tiny_models.diffusion_model(tmp_path / "sr-folder", "upscale")
    from safetensors.torch import load_file
    torch.save({"state_dict": load_file(str(sr / "model.safetensors"))}, tmp_path / "bsr_sr.ckpt")
    shutil.copy(sr / "config.json", tmp_path / "bsr_sr.yaml")
    sd = tiny_models.official_checkpoint(tmp_path / "v1-5-pruned-emaonly.safetensors", "sd")
    tiny_models.tiny_clip_config(tmp_path / "v1-5-pruned-emaonly.yaml")
    (tmp_path / "loras").mkdir()
    tiny_models.lora_for(sd, tmp_path / "style.safetensors")
    shutil.copy(tmp_path / "style.safetensors", tmp_path / "loras" / "style.safetensors")
    (tmp_path / "embeddings").mkdir()
    save_file({"emb_params": torch.randn(2, 32) * 0.02}, str(tmp_path / "embeddings" / "doggo.safetensors"))
    vae = tiny_models.autoencoder(tmp_path / "kl-folder", "kl")
    shutil.copy(vae / "model.safetensors", tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_every_readme_command_runs_as_written(workdir):
    commands = readme_commands()
    assert len(commands) >= 12 and [c[0] for c in commands].count("txt2img") >= 4
    for args in commands:
        if args[0] in SLOW_ELSEWHERE:
            continue
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, f"latentgen {shlex.join(args)}\n{result.output}"
    assert sorted(p.name for p in (workdir / "outs").glob("*.png")) == [f"0000{i}-{42 + i}.png" for i in range(4)]
    assert len(list((workdir / "run").glob("*.png"))) == 2  # the --resume line added nothing
    assert (workdir / "filled.png").is_file() and (workdir / "r.png").is_file()
    assert (workdir / "model.safetensors").is_file() and (workdir / "small.png").is_file()
    assert (workdir / "small.safetensors").stat().st_size < 0.3 * (workdir / "model.safetensors").stat().st_size
    original, again = (np.array(Image.open(workdir / name)) for name in ("outs/00000-42.png", "again.png"))
    np.testing.assert_array_equal(original, again)
    assert len(list((workdir / "hearts").glob("grid-*.png"))) == 1 and len(list((workdir / "hearts").glob("0*.png"))) == 4
    assert Image.open(workdir / "tile.png").size == (256, 128) and (workdir / "preview.png").is_file()
    assert Image.open(workdir / "redrawn.png").size == (64, 64) and Image.open(workdir / "big.png").size == (256, 256)


@pytest.mark.slow
def test_readme_python_example_runs_as_written(workdir):
    code = readme_block("From Python", "python")
    exec(compile(code, "README.md", "exec"), {})
    assert Image.open(workdir / "heart.png").size == (128, 128)
    assert sorted(p.name for p in (workdir / "hearts").glob("*.png")) == [f"0000{i}-{1 + i}.png" for i in range(4)]
    result = CliRunner().invoke(app, ["info", "heart.png"])
    assert result.exit_code == 0 and "a red heart" in result.output and "Seed: 1" in result.output
