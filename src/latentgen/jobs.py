"""Runs of many images: prompt files, jobs and batches, output names, generation parameters, and
the manifest that lets a stopped run resume without redoing or losing an image.

The CLI and Python callers share `run_txt2img` and `run_over_inputs` (img2img, inpaint, upscale
over a folder of images), so all get resumable runs, split over torchrun's ranks.
"""

import hashlib
import json
import secrets
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

from . import tasks
from .errors import LatentgenError
from .devices import DTYPES
from .distributed import Rank, wait_for_all
from .files import atomic_write
from .images import WRITE_FORMATS, format_parameters, parse_parameters, save_image
from .ldm import LatentDiffusion
from .samplers import SAMPLERS, resolve_sampler
from .tasks import Hires, Sampling

MAX_IMAGES = 10000


@dataclass(frozen=True)
class Job:
    """One image to make: its place in the run, prompt or class, seed, and input image (`source`)."""

    index: int
    prompt: str
    seed: int
    label: Optional[int] = None
    source: Optional[Path] = None


def read_prompts(path: Path) -> list[str]:
    """The non-empty lines of a prompts file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise LatentgenError(f"cannot read prompts file {path}: {error}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise LatentgenError(f"{path} has no prompts")
    return prompts


def plan_jobs(prompts: Sequence[str] = ("",), labels: Optional[Sequence[int]] = None, num: int = 1,
              seed: int = 0) -> list[Job]:
    """`num` jobs per prompt (or per class label), seeds counting up from `seed` over the whole run."""
    if not 1 <= num <= MAX_IMAGES:
        raise LatentgenError(f"images per prompt must be between 1 and {MAX_IMAGES}, got {num}")
    if not 0 <= seed < 2**63:
        raise LatentgenError(f"the seed must be between 0 and 2**63 - 1, got {seed}")
    if labels and any(prompts):
        raise LatentgenError("give prompts or class ids, not both")
    items = [("", label) for label in labels] if labels else [(prompt, None) for prompt in prompts]
    jobs: list[Job] = []
    for prompt, label in items:
        for _ in range(num):
            jobs.append(Job(len(jobs), prompt, seed + len(jobs), label))
    if len(jobs) > MAX_IMAGES:
        raise LatentgenError(f"a run makes at most {MAX_IMAGES} images, this one {len(jobs)}")
    return jobs


INPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def read_inputs(path: Path) -> list[Path]:
    """The images of a run over inputs: a folder's image files by name, or the lines of a list file
    (paths relative to the list's folder). Outputs are named after the inputs, so stems must differ."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in INPUT_SUFFIXES)
    elif path.is_file():
        files = [path.parent / line for line in read_prompts(path)]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise LatentgenError(f"{path} lists {len(missing)} missing image(s), first {missing[0]}")
    else:
        raise LatentgenError(f"--inputs {path} is neither a folder nor a list file")
    if not files:
        raise LatentgenError(f"--inputs {path} holds no images ({', '.join(INPUT_SUFFIXES)})")
    stems = [p.stem for p in files]
    repeated = next((stem for stem in stems if stems.count(stem) > 1), None)
    if repeated is not None:
        raise LatentgenError(f"--inputs {path}: two inputs are named {repeated!r}; their outputs would collide")
    if len(files) > MAX_IMAGES:
        raise LatentgenError(f"a run makes at most {MAX_IMAGES} images, this one {len(files)}")
    return files


def plan_inputs(sources: Sequence[Path], prompt: str = "", seed: int = 0) -> list[Job]:
    """One job per input image, seeds counting up from `seed` as in a prompts run."""
    return [Job(i, prompt, seed + i, source=Path(source)) for i, source in enumerate(sources)]


def batched(jobs: Sequence[Job], batch_size: int) -> Iterator[list[Job]]:
    if batch_size < 1:
        raise LatentgenError(f"the batch size must be at least 1, got {batch_size}")
    for start in range(0, len(jobs), batch_size):
        yield list(jobs[start : start + batch_size])


# ---- output names ---------------------------------------------------------------------------


def is_file_target(out: Optional[Path]) -> bool:
    """`out` names one image file (by its suffix: .png, .jpg, .jpeg, .webp) rather than a folder."""
    return out is not None and out.suffix.lower() in WRITE_FORMATS


def output_path(out: Optional[Path], stem: str, index: Optional[int] = None) -> Path:
    """Where image `index` of a run goes (None: the run's only image).

    A file `--out` is used as it is for a single image and gets the run index for several
    (cats.png -> cats-00000.png, ...); a folder (default ./outputs) gets `stem`.png, where the
    caller puts index and seed in `stem`. A name that exists is numbered later (cats-1.png)."""
    if is_file_target(out):
        return out if index is None else out.with_name(f"{out.stem}-{index:05d}{out.suffix}")
    return (out or Path("outputs")) / f"{stem}.png"


def job_path(out: Optional[Path], job: Job, count: int) -> Path:
    """A txt2img job's output: `txt2img-SEED.png` alone, `INDEX-SEED.png` in a run of several."""
    if count == 1:
        return output_path(out, f"txt2img-{job.seed}")
    return output_path(out, f"{job.index:05d}-{job.seed}", job.index)


# ---- generation parameters ------------------------------------------------------------------


HIRES_UPSCALERS = {"latent": "Latent", "image": "Bicubic"}


def parameters_text(model: LatentDiffusion, options: Sampling, prompt: str, negative: str,
                    size: tuple[int, int], seed: int, label: Optional[int] = None,
                    extra: Optional[dict] = None, strength: Optional[float] = None,
                    hires: Optional[Hires] = None) -> str:
    """Generation parameters in the AUTOMATIC1111 `parameters` format, with its field and sampler
    names, so its PNG Info, stable-diffusion.cpp and `from_parameters` read them back; `extra` adds
    task-specific fields (an upscaler's noise level). `size` is the first pass's with `hires`, as in A1111.
    `Precision` names the UNet's dtype where it is not float32 (`--dtype auto` may pick bf16 on a
    CPU), since the pixels depend on it."""
    if hires is not None:
        strength = hires.strength
    fields = {
        "Steps": options.steps, "Sampler": SAMPLERS[options.sampler].title,
        "Schedule type": "Karras" if options.karras else None, "CFG scale": options.scale, "Seed": seed,
        "Size": f"{size[1]}x{size[0]}", "Model hash": model.sha256[:10], "Model": model.name,
        "Eta DDIM": options.eta or None, "Class": label, "Denoising strength": strength,
        "Precision": precision_name(model),
    }
    if hires is not None:
        fields.update({"Hires upscale": hires.scale, "Hires steps": hires.steps or None,
                       "Hires upscaler": HIRES_UPSCALERS[hires.upscaler]})
    fields.update(model.infotext)
    fields.update(extra or {})
    return format_parameters(prompt, negative, fields)


def precision_name(model: LatentDiffusion) -> Optional[str]:
    """fp16 / bf16 (`--dtype`'s names) for a UNet in that dtype; None for float32, what the
    field's absence means."""
    if model.unet is None:
        return None
    dtype = next(model.unet.parameters()).dtype
    return None if dtype == torch.float32 else next((name for name, value in DTYPES.items() if value == dtype), None)


@dataclass(frozen=True)
class Recipe:
    """What `parameters_text` recorded about an image, read back (A1111's and sd.cpp's too)."""

    prompt: str
    negative: str
    sampling: Sampling
    size: Optional[tuple[int, int]]
    label: Optional[int]
    model_hash: str
    hires: Optional[Hires] = None


def from_parameters(text: str) -> Recipe:
    """The recipe in a `parameters` text; a one-line error for a field latentgen cannot use."""
    fields = parse_parameters(text)
    try:
        sampler, karras = resolve_sampler(fields.get("Sampler", "DDIM"))
        karras = karras or fields.get("Schedule type", "").lower() == "karras"
        size = None
        if "Size" in fields:
            width, height = (int(n) for n in fields["Size"].lower().split("x"))
            size = (height, width)
        sampling = Sampling(sampler=sampler, steps=int(fields.get("Steps", tasks.DEFAULT_STEPS)),
                            eta=float(fields.get("Eta DDIM", 0)), karras=karras,
                            scale=float(fields.get("CFG scale", 7.5)), seed=int(fields.get("Seed", 0)))
        label = int(fields["Class"]) if "Class" in fields else None
        hires = None
        if "Hires upscale" in fields:
            upscaler = "latent" if fields.get("Hires upscaler", "Latent").lower().startswith("latent") else "image"
            hires = Hires(float(fields["Hires upscale"]), float(fields.get("Denoising strength", 0.5)),
                          int(fields.get("Hires steps", 0)), upscaler)
    except ValueError as error:
        raise LatentgenError(f"unreadable generation parameters: {error}") from None
    return Recipe(fields["prompt"], fields["negative_prompt"], sampling, size, label, fields.get("Model hash", ""),
                  hires)


def random_seed() -> int:
    """A seed for `--seed -1` (A1111's and sd.cpp's "random"), in A1111's range."""
    return secrets.randbelow(2**32)


# ---- the manifest ---------------------------------------------------------------------------


def _read_entries(path: Path) -> dict[str, str]:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise LatentgenError(f"cannot read {path}: {error}") from None
    if not isinstance(entries, dict):
        raise LatentgenError(f"{path} is not a latentgen manifest")
    return entries


class Manifest:
    """A folder's record of finished images, so `resume` redoes nothing and loses nothing.

    Entries are keyed by the run's settings (model, sampling, size, negative prompt) and the job,
    so several runs can share a folder: a new run adds its entries to the ones there. Under
    torchrun each rank writes a file of its own (`latentgen-manifest.rankN.json`) and rank 0 folds
    them into the one manifest when all are done; reading takes them all, so a run stopped with
    any number of ranks resumes with any other."""

    NAME = "latentgen-manifest.json"
    SHARDS = "latentgen-manifest.rank*.json"

    def __init__(self, path: Path, entries: dict[str, str], fingerprint: str):
        self.path, self.entries, self.fingerprint = path, entries, fingerprint

    @classmethod
    def read(cls, folder: Path) -> dict[str, str]:
        """The entries of the folder's manifest and of any rank's, together."""
        entries: dict[str, str] = {}
        for path in [folder / cls.NAME, *sorted(folder.glob(cls.SHARDS))]:
            if path.is_file():
                entries.update(_read_entries(path))
        return entries

    @classmethod
    def open(cls, folder: Path, fingerprint: str, resume: bool, rank: Rank = Rank()) -> "Manifest":
        """The manifest this process writes. Resuming needs one there already."""
        entries = cls.read(folder)
        if resume and not (folder / cls.NAME).is_file() and not list(folder.glob(cls.SHARDS)):
            raise LatentgenError(f"nothing to resume: no manifest at {folder / cls.NAME} "
                                 "(start the run without resume first)")
        name = cls.NAME if rank.world == 1 else f"latentgen-manifest.rank{rank.rank}.json"
        manifest = cls(folder / name, entries, fingerprint)
        manifest.save()  # before any image is reserved, so a run killed at once can be resumed
        return manifest

    @classmethod
    def fold(cls, folder: Path) -> None:
        """Rank 0, once every rank is done: the ranks' files into the one manifest."""
        atomic_write(folder / cls.NAME, json.dumps(cls.read(folder), indent=1))
        for shard in folder.glob(cls.SHARDS):
            shard.unlink()

    def key(self, job: Job) -> str:
        source = "" if job.source is None else f":{job.source}"
        return f"{self.fingerprint}:{job.index}:{job.seed}:{job.label}:{job.prompt}{source}"

    def done(self, job: Job) -> bool:
        file = self.entries.get(self.key(job))
        return file is not None and Path(file).is_file()

    def record(self, job: Job, file: Path) -> None:
        self.entries[self.key(job)] = str(file)
        self.save()

    def save(self) -> None:
        atomic_write(self.path, json.dumps(self.entries, indent=1))


def clear_stale(folder: Path) -> None:
    """Remove the temporary files a killed run left behind (the atomic writes' hidden `.NAME.*.tmp`);
    a resumed run then writes its unfinished images over their own names, replacing any placeholder."""
    for stale in folder.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def fingerprint(model: LatentDiffusion, options: Sampling, size: Optional[tuple[int, int]], negative: str,
                out: Optional[Path], hires: Optional[Hires] = None, extra: Optional[dict] = None) -> str:
    """A short hash of what makes a run's images what they are (`extra`: a task's own settings),
    and of where they go."""
    settings = json.dumps([model.sha256, asdict(options), list(size or ()), negative, str(out)]
                          + ([asdict(hires)] if hires is not None else []) + ([extra] if extra else []), default=str)
    return hashlib.sha256(settings.encode()).hexdigest()[:10]


# ---- a run ----------------------------------------------------------------------------------

StepProgress = Callable[[int, int], None]
RunProgress = Callable[[int, int], None]
"""on_progress(done, total): images of the whole run finished (earlier runs' included), of all."""
ImageDone = Callable[[Path], None]


def run_txt2img(model: LatentDiffusion, jobs: Sequence[Job], out: Optional[Union[str, Path]] = None,
                negative: str = "", options: Sampling = Sampling(), size: Optional[tuple[int, int]] = None,
                batch_size: int = 1, resume: bool = False, overwrite: bool = False,
                on_progress: Optional[RunProgress] = None, on_step: Optional[StepProgress] = None,
                on_image: Optional[ImageDone] = None, preview: tasks.Preview = None,
                hires: Optional[Hires] = None, rank: Rank = Rank()) -> list[Path]:
    """Make and write every job's image; the paths written, in job order (this call's images only).

    A folder `out` (or any run with `resume`) keeps a manifest of finished images, so that after a
    stopped run, the same call with `resume=True` makes only the missing ones, the same pixels as
    an uninterrupted run. Images are written atomically, with their parameters, never over an
    existing file unless `overwrite`. `on_progress(done, total)` hears the run's progress,
    `on_step(done, total)` each sampling step, `on_image(path)` each image this process wrote,
    `preview(done, total, x0)` the current estimate. Under torchrun (`rank`), this process makes
    its share of the jobs (distributed.py), the files are those of a single process, and rank 0
    hears the whole run's progress and returns the paths every rank wrote."""
    out = Path(out) if out is not None else None
    size = tasks.check_size(model, *(size or (None, None)))

    def make(batch: list[Job]) -> list[tuple]:
        labels = [job.label for job in batch] if batch[0].label is not None else None
        images = tasks.txt2img(model, [job.prompt for job in batch], negative, options, size, labels,
                               [job.seed for job in batch], progress=on_step, preview=preview, hires=hires)
        return [(image[None], parameters_text(model, options, job.prompt, negative, size, job.seed, job.label,
                                              hires=hires)) for job, image in zip(batch, images)]

    return _run(jobs, out, fingerprint(model, options, size, negative, out, hires), make,
                lambda job: job_path(out, job, len(jobs)), batch_size, resume, overwrite, on_progress, on_image, rank)


def run_over_inputs(jobs: Sequence[Job], out: Path, settings: str, make: Callable[[Job], tuple],
                    resume: bool = False, overwrite: bool = False, on_progress: Optional[RunProgress] = None,
                    on_image: Optional[ImageDone] = None, rank: Rank = Rank()) -> list[Path]:
    """A run of one command over input images (`plan_inputs`): `make(job)` -> (image, parameters)
    of the job's `source`, written to the folder `out` as `<source stem>.png`, resumable and split
    over torchrun's ranks as a txt2img run; `settings` is the run's `fingerprint`."""
    if is_file_target(out):
        raise LatentgenError(f"--out {out} names one file; a run over --inputs writes a folder")
    return _run(jobs, out, settings, lambda batch: [make(job) for job in batch],
                lambda job: out / f"{job.source.stem}.png", 1, resume, overwrite, on_progress, on_image, rank)


def _run(jobs: Sequence[Job], out: Optional[Path], settings: str, make: Callable[[list[Job]], list[tuple]],
         path_of: Callable[[Job], Path], batch_size: int, resume: bool, overwrite: bool,
         on_progress: Optional[RunProgress], on_image: Optional[ImageDone], rank: Rank) -> list[Path]:
    """The loop both kinds of run share: this rank's share of `jobs` not yet done, made a batch at
    a time and written with their parameters, each recorded in the manifest once it is on disk.
    Rank 0 of several follows the other ranks' manifests for the progress and returns every
    rank's images."""
    folder = out.parent if is_file_target(out) else (out or Path("outputs"))
    keep_manifest = resume or rank.world > 1 or (out is not None and (len(jobs) > 1 or not is_file_target(out)))
    if resume and rank.main:
        clear_stale(folder)
    wait_for_all(rank)  # no rank writes before the stale files are gone
    manifest = Manifest.open(folder, settings, resume, rank) if keep_manifest else None
    pending = [job for job in jobs if manifest is None or not resume or not manifest.done(job)]
    left = {id(job) for job in pending}
    todo = [job for job in rank.share(jobs) if id(job) in left]
    report = on_progress if rank.main else None
    watcher = _RunWatcher(manifest, [manifest.key(job) for job in pending], len(jobs), report) \
        if report is not None and rank.world > 1 else None
    if report is not None:
        report(len(jobs) - len(pending), len(jobs))
    written = []
    try:
        for batch in batched(todo, batch_size):
            for job, (image, info) in zip(batch, make(batch)):
                path = save_image(image, path_of(job), parameters=info, overwrite=overwrite or resume, check=True)
                written.append(path)
                if manifest is not None:
                    manifest.record(job, path)
                if on_image is not None:
                    on_image(path)
                if report is not None and watcher is None:
                    report(len(jobs) - len(pending) + len(written), len(jobs))
        wait_for_all(rank)
    finally:
        if watcher is not None:
            watcher.stop()
    if rank.world > 1 and rank.main:
        Manifest.fold(folder)
        entries = Manifest.read(folder)
        written = [Path(entries[key]) for key in (manifest.key(job) for job in pending) if key in entries]
        report(len(jobs), len(jobs))
    return written


class _RunWatcher:
    """Rank 0's view of a torchrun run: a thread that counts the run's `keys` the ranks' manifests
    record with a new file (every half second, until stopped), so the progress covers all ranks.
    Started before rank 0 records anything: what its manifest held then is the run's past."""

    def __init__(self, manifest: Manifest, keys: list[str], total: int, report: RunProgress):
        self.folder, self.keys, self.total, self.report = manifest.path.parent, keys, total, report
        wanted = set(keys)
        self.before = {key: _mtime(file) for key, file in manifest.entries.items() if key in wanted}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def finished(self) -> int:
        entries = Manifest.read(self.folder)
        return sum(1 for key in self.keys if key in entries and _mtime(entries[key]) not in (None, self.before.get(key)))

    def _watch(self) -> None:
        while not self.stopped.wait(0.5):
            try:
                self.report(self.total - len(self.keys) + self.finished(), self.total)
            except (OSError, LatentgenError):  # a manifest being replaced: read it next time
                continue

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def _mtime(file: str) -> Optional[int]:
    try:
        return Path(file).stat().st_mtime_ns
    except OSError:
        return None
