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

from latentgen import images
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


def test_rank_zero_counts_what_every_rank_records(tmp_path):
    """The whole run's progress on rank 0: other ranks' manifest entries with a new file count,
    an earlier run's file for the same job counts once it is written again."""
    import time

    from latentgen.jobs import Job, _RunWatcher

    run_jobs = [Job(i, "p", i) for i in range(3)]
    old = tmp_path / "old.png"
    old.write_bytes(b"earlier")
    rank0 = Manifest.open(tmp_path, "fp", False, Rank(0, 2))
    rank1 = Manifest.open(tmp_path, "fp", False, Rank(1, 2))
    rank1.record(run_jobs[2], old)  # as if an earlier run had made it
    rank0.entries = Manifest.read(tmp_path)
    reports = []
    watcher = _RunWatcher(rank0, [rank0.key(job) for job in run_jobs], 3, lambda done, total: reports.append(done))
    fresh = tmp_path / "new.png"
    fresh.write_bytes(b"new")
    rank1.record(run_jobs[1], fresh)
    time.sleep(1.2)
    assert reports and reports[-1] == 1
    time.sleep(0.01)
    old.write_bytes(b"made again")
    assert watcher.finished() == 2
    watcher.stop()


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
    """... and rank 0 speaks for the whole run: progress, every rank's files, the run's grid."""
    args, root = setup
    listening = ("import os, sys\nfrom latentgen import cli, jobs\n"
                 "real = jobs.run_txt2img\n"
                 "def run_txt2img(*args, on_progress, **kwargs):\n"
                 "    def heard(done, total):\n"
                 "        with open(os.environ['PROGRESS_LOG'], 'a') as log:\n"
                 "            log.write(f\"{os.environ['RANK']} {done} {total}\\n\")\n"
                 "        on_progress(done, total)\n"
                 "    return real(*args, on_progress=heard, **kwargs)\n"
                 "jobs.run_txt2img = run_txt2img\n"
                 "sys.argv = ['latentgen', *sys.argv[1:]]\ncli.app()\n")
    script, heard = root / "listening.py", root / "progress.log"
    script.write_text(listening)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script), *map(str, [*args[1:], "--out", root / "two", "--grid"])],  # not quiet
                            env={**ENV, "PROGRESS_LOG": str(heard)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (root / "single").glob("*.png"))
    assert names + ["grid-0.png"] == sorted(p.name for p in (root / "two").glob("*.png")) and len(names) == 6
    reports = [line.split() for line in heard.read_text().splitlines()]
    assert {rank for rank, _, _ in reports} == {"0"}  # rank 0 alone hears the progress, of the whole run
    done = [int(count) for _, count, _ in reports]
    assert done[0] == 0 and done[-1] == 6 and done == sorted(done) and {total for _, _, total in reports} == {"6"}
    wrote = [Path(line.split()[-1]).name for line in result.stderr.splitlines() if line.startswith("wrote ")]
    assert wrote == names + ["grid-0.png"]  # every rank's images, in job order, then the grid
    grid = images.grid([images.load_image(root / "single" / name) for name in names])  # job order
    np.testing.assert_array_equal(pixels(root / "two" / "grid-0.png"), np.array(images.to_pil(grid).convert("RGB")))
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


# ---- data-parallel training ------------------------------------------------------------------

DC_ARGS = ["--kind", "dc", "--widths", "8,8,16", "--encoder-layers", "0,1,1", "--decoder-layers", "0,1,1",
           "--z-channels", "4", "--crop", "16", "--batch", "4", "--lr", "1e-3", "--warmup", "1",
           "--checkpoint-every", "2", "--device", "cpu"]


def checkpoint_weights(run_dir: Path, key: str) -> dict:
    import torch

    return torch.load(run_dir / "checkpoint.pt", weights_only=True)[key]


def assert_same_weights(a: dict, b: dict, tolerance: float = 1e-5) -> None:
    import torch

    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=tolerance, atol=tolerance, msg=name)


def losses_of(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 256, (24, 4, 4, 3)).astype(np.uint8).repeat(4, 1).repeat(4, 2)
    np.save(root / "photos-16.npy", smooth)
    return root


@pytest.mark.slow
def test_two_rank_autoencoder_training_matches_one_process_and_resumes_with_another_count(photos, tmp_path):
    """--batch is the global batch: two ranks train the same steps on the same data as one
    process (gradients averaged by DDP; float summation order aside), and a run stopped with two
    ranks continues with one as if never stopped."""
    args = ["train", "autoencoder", *DC_ARGS, "--photos", photos / "photos-16.npy"]
    for run_dir, ranks, steps in ((tmp_path / "one", 1, 4), (tmp_path / "two", 2, 4), (tmp_path / "mixed", 2, 2),
                                  (tmp_path / "mixed", 1, 4)):
        result = run([*args, "--run-dir", run_dir, "--steps", steps], ranks)
        assert result.returncode == 0, result.stderr
    one = checkpoint_weights(tmp_path / "one", "model")
    assert_same_weights(one, checkpoint_weights(tmp_path / "two", "model"))
    assert_same_weights(one, checkpoint_weights(tmp_path / "mixed", "model"))
    np.testing.assert_allclose(losses_of(tmp_path / "two"), losses_of(tmp_path / "one"), rtol=1e-5)
    assert (tmp_path / "two" / "export" / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_rank_ldm_training_matches_one_process(photos, tmp_path):
    first = tmp_path / "ae"
    result = run(["train", "autoencoder", *DC_ARGS, "--photos", photos / "photos-16.npy", "--run-dir", first,
                  "--steps", 2], 1)
    assert result.returncode == 0, result.stderr
    args = ["train", "ldm", "--first-stage", first / "export", "--task", "inpaint", "--data", photos,
            "--photos", "photos-16.npy", "--image-size", 16, "--model-channels", 32, "--channel-mult", "1,1",
            "--attention-resolutions", "", "--num-head-channels", 8, "--batch", 4, "--steps", 3, "--device", "cpu",
            "--prediction", "v", "--zero-terminal-snr", "--min-snr-gamma", 5, "--ema-half-life", 10]
    for run_dir, ranks in ((tmp_path / "one", 1), (tmp_path / "two", 2)):
        result = run([*args, "--run-dir", run_dir], ranks)
        assert result.returncode == 0, result.stderr
    assert_same_weights(checkpoint_weights(tmp_path / "one", "ema"), checkpoint_weights(tmp_path / "two", "ema"))
    assert "exported" in result.stderr and result.stderr.count("exported") == 1  # rank 0 alone speaks


@pytest.mark.slow
def test_a_training_rank_failing_at_start_ends_the_job_with_one_line(photos, tmp_path):
    result = run(["train", "ldm", "--run-dir", tmp_path / "run", "--first-stage", tmp_path / "missing.safetensors",
                  "--task", "inpaint", "--data", photos, "--photos", "photos-16.npy", "--image-size", 16,
                  "--device", "cpu"], 2)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error (rank")]
    assert errors and all("missing.safetensors does not exist" in line for line in errors), result.stderr
    odd = run(["train", "autoencoder", *DC_ARGS[:-4], "--batch", "3", "--photos", photos / "photos-16.npy",
               "--run-dir", tmp_path / "odd", "--steps", 1, "--device", "cpu"], 2)
    assert odd.returncode != 0 and "must divide by the 2 ranks" in odd.stderr


@pytest.mark.slow
def test_two_ranks_upscale_a_folder_as_one_process(tmp_path):
    model = tiny_models.diffusion_model(tmp_path / "sr", "upscale")
    folder = tmp_path / "inputs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    args = ["-q", "upscale", "--inputs", folder, "--steps", 2, "--ckpt", model, "--device", "cpu"]
    for ranks in (1, 2):
        result = run([*args, "--out", tmp_path / f"ranks{ranks}"], ranks)
        assert result.returncode == 0, result.stderr
    for name in ("a.png", "b.png", "c.png"):
        np.testing.assert_array_equal(pixels(tmp_path / "ranks1" / name), pixels(tmp_path / "ranks2" / name))
    assert not list((tmp_path / "ranks2").glob(Manifest.SHARDS))
    alone = run(["upscale", folder / "a.png", "--ckpt", model, "--out", tmp_path / "x.png"], 2)
    assert alone.returncode != 0 and "under torchrun give --inputs" in alone.stderr
