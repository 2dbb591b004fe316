"""Read checkpoints without executing code in them, and build a LatentDiffusion from one.

Two formats are read: `.safetensors` (its header is validated before any tensor is allocated)
and PyTorch's zip pickles (`.ckpt`, `.pt`, `.pth`, `.bin`), only through
`torch.load(weights_only=True)`, which refuses every global outside a small allowlist. The
allowlist adds the few harmless non-tensor globals that official Stable Diffusion / LDM
checkpoints carry next to their weights: Lightning's `ModelCheckpoint` class (bound to an inert
stand-in, never imported) and numpy scalars and dtypes.
"""

import hashlib
import json
import math
import os
import pickle
import re
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from .errors import LatentgenError

PathLike = Union[str, os.PathLike]

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces

# safetensors dtype name -> (bytes per element, torch dtype)
SAFETENSORS_DTYPES = {
    "F64": (8, torch.float64), "F32": (4, torch.float32), "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16), "F8_E4M3": (1, torch.float8_e4m3fn), "F8_E5M2": (1, torch.float8_e5m2),
    "I64": (8, torch.int64), "I32": (4, torch.int32), "I16": (2, torch.int16), "I8": (1, torch.int8),
    "U64": (8, torch.uint64), "U32": (4, torch.uint32), "U16": (2, torch.uint16), "U8": (1, torch.uint8),
    "BOOL": (1, torch.bool),
}

# What other formats look like, to name them when one is passed by mistake.
FOREIGN_MAGIC = {
    b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
    b"RIFF": "a RIFF (WebP/WAV) file", b"%PDF": "a PDF document", b"\x1f\x8b": "a gzip archive",
    b"GGUF": "a GGUF file (llama.cpp / stable-diffusion.cpp)", b"\x89HDF": "an HDF5 file",
}

CONVERT_HINT = (
    "convert it once with `latentgen convert --trust IN.ckpt OUT.safetensors` (which does unpickle it, "
    "running any code it holds) and load the .safetensors"
)


class InertGlobal:
    """Stands in for a class a checkpoint names but that no weight needs (e.g. Lightning's
    ModelCheckpoint used as a dict key); accepts any state and does nothing with it."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _numpy_globals() -> list[tuple[Any, str]]:
    """numpy scalars and dtypes, as pickled by both numpy 1.x (`numpy.core`) and 2.x (`numpy._core`)."""
    dtype_classes = {type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDGSUVOMm"}
    entries: list[tuple[Any, str]] = [(np.dtype, "numpy.dtype")]
    entries += [(cls, f"numpy.dtypes.{cls.__name__}") for cls in dtype_classes]
    for core in ("numpy.core", "numpy._core"):
        entries.append((np._core.multiarray.scalar, f"{core}.multiarray.scalar"))
        entries.append((np._core.multiarray._reconstruct, f"{core}.multiarray._reconstruct"))
    entries.append((np.ndarray, "numpy.ndarray"))
    return entries


def allowed_globals() -> list[tuple[Any, str]]:
    """Globals that a weights-only load may resolve besides torch's own: inert stand-ins for
    Lightning's callback classes, and numpy's (data-only) scalar and array constructors."""
    lightning = [
        f"{package}.callbacks.{module}.{name}"
        for package in ("pytorch_lightning", "lightning.pytorch")
        for module, name in (("model_checkpoint", "ModelCheckpoint"), ("early_stopping", "EarlyStopping"))
    ]
    return [(InertGlobal, name) for name in lightning] + _numpy_globals()


# ---- reading files --------------------------------------------------------------------------


def _check_file(path: Path) -> None:
    if not path.exists():
        raise LatentgenError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise LatentgenError(f"{path} is a folder; pass the checkpoint file inside it (or a model folder with model.safetensors)")
    if path.stat().st_size == 0:
        raise LatentgenError(f"checkpoint {path} is empty (0 bytes)")


def _foreign_format(path: Path) -> Optional[str]:
    with open(path, "rb") as f:
        head = f.read(8)
    return next((what for magic, what in FOREIGN_MAGIC.items() if head.startswith(magic)), None)


def read_safetensors_header(path: PathLike) -> tuple[dict, dict]:
    """Validated header of a .safetensors file: ({name: entry}, metadata), before any tensor is read.

    The checks make a lying header fail here rather than as a huge allocation or a read past the
    end: sane header length, known dtypes, shape x itemsize == byte span, spans inside the data
    section, not overlapping.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise LatentgenError(f"{path} is truncated: too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len < 2 or header_len > min(size - 8, MAX_HEADER_BYTES):
            raise LatentgenError(
                f"{path} is not a valid safetensors file: header length {header_len} does not fit a {size}-byte file"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise LatentgenError(f"{path} is not a valid safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise LatentgenError(f"{path} is not a valid safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise LatentgenError(f"{path} has a malformed safetensors __metadata__ entry")
    data_len = size - 8 - header_len
    spans = []
    for name, entry in header.items():
        spans.append(_validate_entry(path, name, entry, data_len))
    spans.sort()
    for (begin, end, name), (next_begin, _, next_name) in zip(spans, spans[1:]):
        if next_begin < end:
            raise LatentgenError(f"{path} is corrupt: tensors {name!r} and {next_name!r} overlap")
    return header, metadata


def _validate_entry(path: Path, name: str, entry: Any, data_len: int) -> tuple[int, int, str]:
    bad = f"{path} is corrupt: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise LatentgenError(f"{bad} has a malformed header entry")
    if entry["dtype"] not in SAFETENSORS_DTYPES:
        raise LatentgenError(f"{bad} has unknown dtype {str(entry['dtype'])[:20]!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise LatentgenError(f"{bad} has a malformed shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)):
        raise LatentgenError(f"{bad} has malformed data offsets")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise LatentgenError(f"{bad} lies outside the file's data (offsets {begin}..{end}, data is {data_len} bytes); truncated?")
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[entry["dtype"]][0]
    if nbytes != end - begin:
        raise LatentgenError(f"{bad} has shape {shape} ({nbytes} bytes) but spans {end - begin} bytes")
    return begin, end, name


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open

    header, metadata = read_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in header}, metadata
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise LatentgenError(f"{path} could not be read as safetensors: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def _read_pickle(path: Path) -> Any:
    if not zipfile.is_zipfile(path):
        raise LatentgenError(
            f"{path} is not a PyTorch zip checkpoint (truncated, corrupt, or a pre-1.6 torch format): "
            "only zip checkpoints (torch >= 1.6, every official SD/LDM file) are read safely"
        )
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        named = re.search(r"GLOBAL ([\w.]+)|function (<[^>]*>|\S+)", str(error))
        needs = f"`{next(g for g in named.groups() if g)}`" if named else "more than tensors and plain containers"
        raise LatentgenError(
            f"{path} was refused: unpickling it needs {needs}, and weights-only loading never runs code from "
            f"a checkpoint. If you trust its source, {CONVERT_HINT}"
        ) from None
    except Exception as error:  # anything else a damaged file provokes inside torch.load
        raise LatentgenError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {_first_line(error)}") from None


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: Lightning nests them under (possibly repeated) `state_dict`."""
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise LatentgenError(f"{path} holds a {type(obj).__name__}, not a state dict")
    tensors = {key: value for key, value in obj.items() if isinstance(key, str) and isinstance(value, torch.Tensor)}
    if not tensors:
        raise LatentgenError(f"{path} holds no tensors")
    return tensors


def read_checkpoint(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, safetensors metadata) of a checkpoint file, read without executing code."""
    path = Path(path)
    _check_file(path)
    foreign = _foreign_format(path)
    if foreign:
        raise LatentgenError(f"{path} is {foreign}, not a checkpoint")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _unwrap_state_dict(_read_pickle(path), path), {}
    raise LatentgenError(f"{path}: unknown checkpoint type {suffix!r}; use .safetensors or .ckpt/.pt/.pth/.bin")


def load_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` or zip-pickle checkpoint, on the CPU; never runs code from it."""
    return read_checkpoint(path)[0]


# ---- hashing --------------------------------------------------------------------------------


def cache_dir() -> Path:
    """`$LATENTGEN_CACHE`, else `$XDG_CACHE_HOME/latentgen`, else `~/.cache/latentgen`."""
    if os.environ.get("LATENTGEN_CACHE"):
        return Path(os.environ["LATENTGEN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "latentgen"


def _read_hash_cache(file: Path) -> dict:
    try:
        cache = json.loads(file.read_text())
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}


def file_sha256(path: PathLike) -> str:
    """SHA-256 of a file in hex; its first 10 digits are AUTOMATIC1111's "Model hash".

    Cached in `cache_dir()/hashes.json` by absolute path, size and mtime, since hashing a
    multi-gigabyte checkpoint takes seconds; an unwritable cache is silently skipped.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key, stamp = str(path), [stat.st_size, stat.st_mtime_ns]
    cache_file = cache_dir() / "hashes.json"
    cache = _read_hash_cache(cache_file)
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    cache[key] = {"stamp": stamp, "sha256": digest.hexdigest()}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(cache_file, json.dumps(cache, indent=1).encode())
    except OSError:
        pass
    return digest.hexdigest()


def _atomic_write(target: Path, data: bytes) -> None:
    handle, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


# ---- conversion -----------------------------------------------------------------------------


def _read_trusted_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Full unpickling, for `convert --trust` only: runs any code the file holds."""
    _check_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise LatentgenError(f"{path} could not be unpickled: {_first_line(error)}") from None
    return _unwrap_state_dict(obj, path)


def convert_checkpoint(src: PathLike, dst: PathLike, half: bool = False, trust: bool = False) -> Path:
    """Write the tensors of `src` as `dst` (.safetensors), contiguous, shared storage cloned.

    `half` stores floating-point tensors as fp16. `trust=True` unpickles `src` fully (it may run
    code) and is meant only for files from a source one trusts that weights-only loading refuses.
    """
    src, dst = Path(src), Path(dst)
    if dst.suffix.lower() != ".safetensors":
        raise LatentgenError(f"the converted file must end in .safetensors, not {dst.name!r}")
    if dst.exists() and dst.resolve() == src.resolve():
        raise LatentgenError("source and target are the same file")
    if trust and src.suffix.lower() in PICKLE_SUFFIXES:
        state, metadata = _read_trusted_pickle(src), {}
    else:
        state, metadata = read_checkpoint(src)
    tensors = {}
    for name, tensor in state.items():
        if half and tensor.is_floating_point():
            tensor = tensor.half()
        tensors[name] = tensor.detach().contiguous().clone()
    metadata = {**metadata, "format": "pt", "converted_from": src.name}
    from safetensors.torch import save_file

    dst.parent.mkdir(parents=True, exist_ok=True)
    temp = dst.with_name(f".{dst.name}.partial")
    try:
        save_file(tensors, str(temp), metadata=metadata)
        os.replace(temp, dst)
    finally:
        temp.unlink(missing_ok=True)
    return dst
