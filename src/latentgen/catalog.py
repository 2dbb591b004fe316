"""Where models live: the bundled defaults in `weights/` and the user's own checkpoint folders."""

import os
import sys
from pathlib import Path

from .errors import LatentgenError

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# The bundled model each task uses when no --ckpt is given.
DEFAULTS = {
    "txt2img": "txt2img-emoji",
    "inpaint": "inpaint",
    "upscale": "sr4x",
}
AUTOENCODERS_BY_FACTOR = {4: "dc-f4", 8: "dc-f8", 16: "dc-f16"}  # residual DC-AEs (models/dcae.py)


def weights_dirs() -> list[Path]:
    """Folders searched for models, first match wins.

    `LATENTGEN_WEIGHTS` overrides; then the source checkout's `weights/` (editable installs);
    then `<prefix>/share/latentgen/weights`, where `pip install .` puts the bundled models.
    """
    dirs = []
    if os.environ.get("LATENTGEN_WEIGHTS"):
        dirs.append(Path(os.environ["LATENTGEN_WEIGHTS"]))
    dirs.append(Path(__file__).resolve().parents[2] / "weights")
    dirs.append(Path(sys.prefix) / "share" / "latentgen" / "weights")
    return [d for d in dirs if d.is_dir()]


def user_model_dirs() -> list[Path]:
    """Extra folders of checkpoints named by `LATENTGEN_MODELS` (os.pathsep-separated)."""
    value = os.environ.get("LATENTGEN_MODELS", "")
    return [Path(p) for p in value.split(os.pathsep) if p and Path(p).is_dir()]


def bundled_model(name: str) -> Path:
    """Path of a bundled model folder (model.safetensors + config.json)."""
    for folder in weights_dirs():
        candidate = folder / name
        if (candidate / "model.safetensors").is_file():
            return candidate
    searched = ", ".join(str(d) for d in weights_dirs()) or "no weights folder found"
    raise LatentgenError(f"bundled model {name!r} is not installed (searched: {searched}); pass --ckpt PATH")


def default_model(task: str) -> Path:
    return bundled_model(DEFAULTS[task])


def autoencoder_for_factor(f: int) -> Path:
    if f not in AUTOENCODERS_BY_FACTOR:
        choices = ", ".join(str(k) for k in AUTOENCODERS_BY_FACTOR)
        raise LatentgenError(f"no bundled autoencoder with f={f}; bundled factors: {choices} (or pass --ckpt)")
    return bundled_model(AUTOENCODERS_BY_FACTOR[f])


def discover() -> list[Path]:
    """Every model found: bundled folders and checkpoint files in the weights and user folders."""
    found: list[Path] = []
    for folder in weights_dirs() + user_model_dirs():
        for entry in sorted(folder.iterdir()):
            if entry.is_dir() and (entry / "model.safetensors").is_file():
                found.append(entry)
            elif entry.is_file() and entry.suffix in CHECKPOINT_SUFFIXES:
                found.append(entry)
    return found
