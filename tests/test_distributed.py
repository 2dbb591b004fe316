"""Generation under torchrun, two ranks on the CPU (gloo): the files of a single process, one
manifest, resume after a killed rank with another number of ranks, and one-line errors naming
the rank."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentgen.distributed import Rank
from latentgen.jobs import Manifest

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_shares_cover_every_job_once():
    jobs = list(range(7))
    shares = [Rank(r, 3).share(jobs) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]] and sorted(sum(shares, [])) == jobs
    assert Rank().share(jobs) == jobs and Rank(1, 2, 1).device("auto") in ("cpu", "cuda:1")


def run(args, ranks: int, timeout: int = 300) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                "-m", "latentgen"] if ranks > 1 else [sys.executable, "-m", "latentgen"]
    return subprocess.run([*launcher, *map(str, args)], env=ENV, capture_output=True, text=True, timeout=timeout)


def pixels(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    model = tiny_models.diffusion_model(root / "txt2img", "txt2img")
    prompts = root / "prompts.txt"
    prompts.write_text("a cat\na dog\na red heart\n")
    args = ["-q", "txt2img", "--prompts", prompts, "-n", 2, "--steps", 3, "--ckpt", model, "--device", "cpu"]
    single = run([*args, "--out", root / "single"], 1)
    assert single.returncode == 0, single.stderr
    return args, root


@pytest.mark.slow
def test_two_ranks_write_what_one_process_writes(setup):
    args, root = setup
    result = run([*args, "--out", root / "two"], 2)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (root / "single").glob("*.png"))
    assert names == sorted(p.name for p in (root / "two").glob("*.png")) and len(names) == 6
    for name in names:
        np.testing.assert_array_equal(pixels(root / "single" / name), pixels(root / "two" / name))
        assert Image.open(root / "single" / name).info == Image.open(root / "two" / name).info
    entries = json.loads((root / "two" / Manifest.NAME).read_text())
    assert sorted(Path(f).name for f in entries.values()) == names
    assert not list((root / "two").glob(Manifest.SHARDS))  # folded into the one manifest


@pytest.mark.slow
def test_a_killed_rank_then_resume_with_another_rank_count(setup):
    args, root = setup
    out = root / "killed"
    # rank 1 dies after its first image is complete and recorded; torchrun then ends the job
    dying = ("import os, signal, sys\nfrom latentgen import cli, jobs\n"
             "real = jobs.Manifest.record\n"
             "def record(self, job, file):\n"
             "    real(self, job, file)\n"
             "    if os.environ.get('RANK') == '1':\n"
             "        os.kill(os.getpid(), signal.SIGKILL)\n"
             "jobs.Manifest.record = record\n"
             "sys.argv = ['latentgen', *sys.argv[1:]]\ncli.app()\n")
    script = root / "dying.py"
    script.write_text(dying)
    killed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script), *map(str, [*args, "--out", out])], env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode != 0
    assert len(list(out.glob("*.png"))) < 6
    resumed = run([*args, "--out", out, "--resume"], 1)  # one process finishes what two began
    assert resumed.returncode == 0, resumed.stderr
    names = sorted(p.name for p in (root / "single").glob("*.png"))
    assert sorted(p.name for p in out.glob("*.png")) == names
    for name in names:
        np.testing.assert_array_equal(pixels(root / "single" / name), pixels(out / name))


@pytest.mark.slow
def test_a_rank_failing_at_start_ends_the_job_with_one_line(setup, tmp_path):
    result = run(["txt2img", "x", "--ckpt", tmp_path / "missing.safetensors", "--out", tmp_path / "o"], 2)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert lines and all(line.startswith("error (rank ") and "does not exist" in line for line in lines)
