"""Injected faults: a `--prompts` run SIGKILLed at its worst moments then resumed, and out-of-memory
during sampling (smaller batches, same images; at batch 1 a one-line error)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from latentgen import jobs, tasks
from latentgen.cli import app
from latentgen.errors import LatentgenError
from latentgen.loader import load_model

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402

PROMPTS = ["a cat", "a dog", "a red heart"]
NUM = 2
EXPECTED = [f"{i:05d}-{i}.png" for i in range(len(PROMPTS) * NUM)]  # seeds count up from 0
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# The CLI with a SIGKILL at an exact point: "rename" kills just before the second image's atomic
# rename (its name is reserved as an empty file, its data sits in a hidden temp file); "record"
# kills after the second image is complete but before the manifest lists it.
FAULTY_CLI = r"""
import os, signal, sys
from latentgen import cli, files, jobs

point, args = sys.argv[1], sys.argv[2:]
count = [0]

def dies_second_time(real, counts):
    def wrapper(*a, **k):
        if counts(*a):
            count[0] += 1
            if count[0] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    return wrapper

if point == "rename":
    files.os.replace = dies_second_time(os.replace, lambda src, dst: str(dst).endswith(".png"))
else:
    jobs.Manifest.record = dies_second_time(jobs.Manifest.record, lambda self, job, file: True)
sys.argv = ["latentgen", *args]
cli.app()
"""


def cli_args(model: Path, prompts: Path, out: Path, *extra) -> list[str]:
    return ["-q", "txt2img", "--prompts", str(prompts), "--num", str(NUM), "--batch-size", "2", "--steps", "12",
            "--ckpt", str(model), "--out", str(out), *extra]


def latentgen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "latentgen.cli", *args], env=ENV, capture_output=True, text=True,
                          timeout=300)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    model = tiny_models.diffusion_model(root / "txt2img", "txt2img")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    done = latentgen(*cli_args(model, prompts, root / "uninterrupted"))
    assert done.returncode == 0, done.stderr
    return model, prompts, root / "uninterrupted"


def assert_same_complete_run(folder: Path, reference: Path) -> None:
    """Exactly the expected images, each complete and equal to the uninterrupted run's; no leftovers."""
    assert sorted(p.name for p in folder.iterdir()) == sorted([*EXPECTED, jobs.Manifest.NAME])
    for name in EXPECTED:
        np.testing.assert_array_equal(pixels(folder / name), pixels(reference / name))
    manifest = json.loads((folder / jobs.Manifest.NAME).read_text())
    assert sorted(Path(file).name for file in manifest.values()) == EXPECTED


def resume(model: Path, prompts: Path, out: Path) -> None:
    done = latentgen(*cli_args(model, prompts, out, "--resume"))
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_images(setup, tmp_path):
    model, prompts, reference = setup
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "latentgen.cli", *cli_args(model, prompts, out)], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while process.poll() is None and not (out / EXPECTED[0]).exists():
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL  # killed, not finished
    assert len(list(out.glob("*.png"))) < len(EXPECTED)
    resume(model, prompts, out)
    assert_same_complete_run(out, reference)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["rename", "record"])
def test_sigkill_while_writing_then_resume_leaves_no_partial_or_duplicate(setup, tmp_path, point):
    model, prompts, reference = setup
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", FAULTY_CLI, point, *cli_args(model, prompts, out)], env=ENV,
                            capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    second = out / EXPECTED[1]
    if point == "rename":  # the reserved name is empty, the data in a hidden temp file
        assert second.stat().st_size == 0 and list(out.glob(f".{EXPECTED[1]}.*.tmp"))
    else:  # complete on disk, but the manifest does not know it
        pixels(second)
        assert EXPECTED[1] not in (out / jobs.Manifest.NAME).read_text()
    resume(model, prompts, out)
    assert_same_complete_run(out, reference)


# ---- out of memory during sampling ------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tiny_models.diffusion_model(tmp_path_factory.mktemp("oom") / "txt2img", "txt2img")
    return tasks.prepare(load_model(folder), "cpu", "fp32")


def make(model, n: int, options, one_by_one: bool = False) -> torch.Tensor:
    """n images of alternating prompts and seeds 100, 101, ... at 64 x 64, in one call or one call each."""
    prompts, seeds = [f"prompt {i % 2}" for i in range(n)], [100 + i for i in range(n)]
    if one_by_one:
        return torch.cat([tasks.txt2img(model, [p], "", options, (64, 64), seeds=[s]) for p, s in zip(prompts, seeds)])
    return tasks.txt2img(model, prompts, "", options, (64, 64), seeds=seeds)


def fail_batches_over(model, monkeypatch, limit: int) -> list[int]:
    """Make the UNet raise OutOfMemoryError on more than `limit` images (x2 with guidance); record sizes."""
    real, seen = model.unet.forward, []

    def forward(x, *args, **kwargs):
        seen.append(x.shape[0])
        if x.shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(x, *args, **kwargs)

    monkeypatch.setattr(model.unet, "forward", forward)
    return seen


@pytest.mark.slow
def test_oom_falls_back_to_smaller_batches_with_the_same_images(model, monkeypatch):
    options = tasks.Sampling(steps=3, scale=5.0)
    one_by_one = make(model, 5, options, one_by_one=True)
    seen = fail_batches_over(model, monkeypatch, limit=4)  # guided: 2 images per forward at most
    fallen_back = make(model, 5, options)
    # 5 jobs (10 rows) fail -> [0, 1] runs; [2, 3, 4] (6 rows) fails -> [2] and [3, 4] run, 3 steps each
    assert seen == [10] + [4] * 3 + [6] + [2] * 3 + [4] * 3
    torch.testing.assert_close(fallen_back, one_by_one, rtol=0, atol=1e-5)


def test_oom_at_batch_one_is_a_one_line_error(model, monkeypatch):
    fail_batches_over(model, monkeypatch, limit=0)
    with pytest.raises(LatentgenError, match="out of device memory even at batch size 1") as caught:
        make(model, 2, tasks.Sampling(steps=2))
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_oom_at_batch_one_through_the_cli_prints_one_line(tmp_path, monkeypatch):
    def always_oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(tasks, "_txt2img_batch", always_oom)
    folder = tiny_models.diffusion_model(tmp_path / "txt2img", "txt2img")
    result = CliRunner().invoke(app, ["txt2img", "cat", "-n", "3", "--batch-size", "2", "--ckpt", str(folder),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    line = " ".join(result.output.split())
    assert line.startswith("error: out of device memory even at batch size 1") and "Traceback" not in result.output
    assert not list((tmp_path / "out").glob("*.png"))
