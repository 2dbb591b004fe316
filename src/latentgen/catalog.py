"""Where models live: the bundled defaults in `weights/` and the user's own checkpoint folders."""

import os
import sys
from pathlib import Path
from typing import Optional, Union

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


def resolve(name_or_path: Union[str, os.PathLike]) -> Path:
    """An existing file or folder as it is; a bare name that is no path names a bundled model."""
    path = Path(name_or_path)
    if path.exists() or len(path.parts) != 1 or path.suffix in CHECKPOINT_SUFFIXES:
        return path
    return bundled_model(str(name_or_path))


def bundled_name(path: Path) -> Optional[str]:
    """The name a model folder is bundled under, or None for a folder outside the weights folders."""
    folder = Path(path).resolve()
    if (folder / "model.safetensors").is_file() and any(folder.parent == d.resolve() for d in weights_dirs()):
        return folder.name
    return None


def default_model(task: str) -> Path:
    return bundled_model(DEFAULTS[task])


def installed_factors() -> list[int]:
    """The factors f of the bundled autoencoders that are installed."""
    return [f for f, name in AUTOENCODERS_BY_FACTOR.items()
            if any((folder / name / "model.safetensors").is_file() for folder in weights_dirs())]


def autoencoder_for_factor(f: int) -> Path:
    if f not in installed_factors():
        choices = ", ".join(str(k) for k in installed_factors()) or "none"
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


def lora_dirs(extra: Optional[Path] = None) -> list[Path]:
    """Where `<lora:name:weight>` tags look: `--lora-dir`, then `$LATENTGEN_LORA` (os.pathsep-separated)."""
    found = [extra] if extra is not None else []
    found += [Path(p) for p in os.environ.get("LATENTGEN_LORA", "").split(os.pathsep) if p]
    return [d for d in found if d.is_dir()]


def find_lora(name: str, folders: list[Path]) -> Path:
    """The file a prompt's `<lora:name>` means: name + a checkpoint suffix in the first folder that has it."""
    for folder in folders:
        for suffix in CHECKPOINT_SUFFIXES:
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    searched = ", ".join(str(d) for d in folders) or "no folder: give --lora-dir or set $LATENTGEN_LORA"
    raise LatentgenError(f"<lora:{name}> not found (searched: {searched})")
