"""Read checkpoints without executing code in them, and build a LatentDiffusion from one.

Two formats are read: `.safetensors` (its header is validated before any tensor is allocated)
and PyTorch's zip pickles (`.ckpt`, `.pt`, `.pth`, `.bin`), only through
`torch.load(weights_only=True)`, which refuses every global outside a small allowlist. The
allowlist adds the few harmless non-tensor globals that official Stable Diffusion / LDM
checkpoints carry next to their weights: Lightning's `ModelCheckpoint` class (bound to an inert
stand-in, never imported) and numpy scalars and dtypes.
"""

import hashlib
import inspect
import json
import math
import os
import pickle
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from . import catalog, detect
from .errors import LatentgenError
from .files import atomic_write, require_file, write_new
from .ldm import LatentDiffusion, ModelSpec, NoiseAugmentation
from .models import adopt, on_meta
from .quantize import dequantize_int8, quantize_int8
from .schedules import TrainingSchedule

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
    return _read_header(Path(path))[:2]


def _read_header(path: Path) -> tuple[dict, dict, int]:
    """read_safetensors_header, and where the data section starts (its offsets count from there)."""
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
    return header, metadata, 8 + header_len


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
        raise LatentgenError(
            f"{bad} lies outside the file's data (offsets {begin}..{end}, data is {data_len} bytes); truncated?"
        )
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[entry["dtype"]][0]
    if nbytes != end - begin:
        raise LatentgenError(f"{bad} has shape {shape} ({nbytes} bytes) but spans {end - begin} bytes")
    return begin, end, name


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    """Every tensor, read at its validated header offsets straight into its own buffer (int8 ones
    dequantised: `quantize`). Not memory
    mapped: the pages a map touches count as resident beside the tensors until it closes (an SD
    checkpoint loaded in bf16 peaked at twice its size)."""
    header, metadata, data_start = _read_header(path)
    state = {}
    try:
        with open(path, "rb") as f:
            for name, entry in header.items():
                begin, end = entry["data_offsets"]
                tensor = torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]][1])
                f.seek(data_start + begin)
                if f.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy())) != end - begin:
                    raise LatentgenError(f"{path} is truncated: tensor {name[:100]!r} ends past the file")
                state[name] = tensor
    except OSError as error:
        raise LatentgenError(f"{path} could not be read as safetensors: {_first_line(error)}") from None
    return dequantize_int8(state, str(path)), metadata


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except (zipfile.BadZipFile, OSError, ValueError):  # is_zipfile lets some damaged trailers through
        return False


def _read_pickle(path: Path) -> Any:
    if not _is_zip(path):
        raise LatentgenError(
            f"{path} is not a PyTorch zip checkpoint (truncated, corrupt, or a pre-1.6 torch format): "
            "only zip checkpoints (torch >= 1.6, every official SD/LDM file) are read safely"
        )
    try:
        with torch.serialization.safe_globals(allowed_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. "pickle protocol 0" on damaged files
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
        reason = _first_line(error)
        raise LatentgenError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {reason}") from None


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
    require_file(path, "checkpoint")
    foreign = _foreign_format(path)
    if foreign:
        raise LatentgenError(f"{path} is {foreign}, not a checkpoint")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _unwrap_state_dict(_read_pickle(path), path), {}
    raise LatentgenError(f"{path}: unknown checkpoint type {suffix!r}; use .safetensors or .ckpt/.pt/.pth/.bin")


def read_tensors(path: PathLike) -> Any:
    """A .safetensors file's tensors, or a zip pickle's object as it is (nested dicts of tensors,
    strings and numbers, as A1111's embedding files hold), read without executing code."""
    path = Path(path)
    require_file(path, "checkpoint")
    if _foreign_format(path):
        raise LatentgenError(f"{path} is {_foreign_format(path)}, not a checkpoint")
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors(path)[0]
    return _read_pickle(path)


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
        atomic_write(cache_file, json.dumps(cache, indent=1))
    except OSError:
        pass
    return digest.hexdigest()


# ---- conversion -----------------------------------------------------------------------------


def _read_trusted_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Full unpickling, for `convert --trust` only: runs any code the file holds."""
    require_file(path, "checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise LatentgenError(f"{path} could not be unpickled: {_first_line(error)}") from None
    return _unwrap_state_dict(obj, path)


def _own_storage(tensor: torch.Tensor, seen: set) -> torch.Tensor:
    """`tensor`, or a contiguous copy when it is a view or shares storage (safetensors refuses both)."""
    storage = tensor.untyped_storage()
    whole = tensor.is_contiguous() and tensor.storage_offset() == 0 and tensor.nbytes == storage.nbytes()
    if whole and storage.data_ptr() not in seen:
        seen.add(storage.data_ptr())
        return tensor
    return tensor.contiguous().clone()


def convert_checkpoint(src: PathLike, dst: PathLike, half: bool = False, trust: bool = False,
                       overwrite: bool = False, int8: bool = False) -> Path:
    """Write the tensors of `src` as `dst` (.safetensors), contiguous, shared storage cloned; an
    existing `dst` is kept (the next free numbered name is used) unless `overwrite`.

    `half` stores floating-point tensors as fp16; `int8` stores matrices and kernels as int8 with
    per-channel scales (`quantize`), the rest as `half` says. `trust=True` unpickles `src` fully (it may run
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
    if half:
        state = {name: tensor.half() if tensor.is_floating_point() else tensor for name, tensor in state.items()}
    if int8:
        state = quantize_int8(state)
    tensors, seen = {}, set()
    for name, tensor in state.items():
        tensors[name] = _own_storage(tensor.detach(), seen)
    metadata = {**metadata, "format": "pt", "converted_from": src.name}
    from safetensors.torch import save_file

    return write_new(dst, lambda temp: save_file(tensors, str(temp), metadata=metadata), overwrite)


# ---- configs --------------------------------------------------------------------------------

# Shorthands a bundled config.json may use for a frozen text encoder whose weights are not stored.
COND_SHORTHANDS = {"minilm": detect.MINILM_TARGET, "clip": detect.CLIP_TARGET, "openclip": detect.OPENCLIP_TARGET}


def read_config(config: Union[PathLike, dict]) -> dict:
    """A config as `model.params`: from an official YAML (needs PyYAML), a JSON file or a dict.

    Accepted shapes: {"model": {"target", "params"}} (official YAMLs; a standalone autoencoder's
    YAML has the autoencoder as model.target), a bare params dict, or a partial one such as
    {"cond_stage": "minilm", "parameterization": "eps"} that is laid over what detection finds.
    `first_stage: NAME` names a bundled autoencoder whose config (and, at load, tensors) the model
    uses instead of storing its own copy.
    """
    if isinstance(config, dict):
        raw = config
    else:
        raw = _parse_config_file(Path(config))
    if not isinstance(raw, dict):
        raise LatentgenError(f"config {config} is not a mapping")
    model = raw.get("model", raw)
    if not isinstance(model, dict):
        raise LatentgenError(f"config {config}: `model` is not a mapping")
    params = dict(model.get("params", model) if "target" in model else model)
    if detect.target_name(model) in ("AutoencoderKL", "VQModel", "VQModelInterface", "AutoencoderDC"):
        params = {"first_stage_config": {"target": model["target"], "params": params}}
    shorthand = params.pop("cond_stage", None)
    if shorthand is not None:
        if shorthand not in COND_SHORTHANDS:
            raise LatentgenError(f"config names unknown cond_stage {shorthand!r}; known: {', '.join(COND_SHORTHANDS)}")
        params["cond_stage_config"] = {"target": COND_SHORTHANDS[shorthand]}
    if "first_stage" in params:
        params["first_stage_config"] = named_first_stage(params["first_stage"])[0]
    return params


def named_first_stage(name: str) -> tuple[dict, Path]:
    """(first_stage_config, weights file) of the bundled autoencoder a config's `first_stage` names."""
    folder = catalog.bundled_model(name)
    weights, config = _weights_and_config(folder, None)
    stage = read_config(config).get("first_stage_config") if config is not None else None
    if stage is None:
        raise LatentgenError(f"config names first_stage {name!r}, which is not a bundled autoencoder")
    return stage, weights


def _parse_config_file(path: Path) -> Any:
    if not path.is_file():
        raise LatentgenError(f"config {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise LatentgenError(f"reading {path.name} needs PyYAML (pip install pyyaml); JSON configs need nothing") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise LatentgenError(f"config {path} is not valid YAML: {_first_line(error)}") from None
    try:
        return json.loads(text)
    except ValueError as error:
        raise LatentgenError(f"config {path} is not valid JSON: {_first_line(error)}") from None


def resolve_params(state_dict: dict, config: Optional[dict], name_hint: str = "", metadata: Optional[dict] = None,
                   prediction: Optional[str] = None) -> dict:
    """Final `model.params`. A complete config (a unet_config that gives model_channels, or a
    first_stage_config for a lone autoencoder) is read as CompVis reads it, defaults included; a
    partial one is laid over detection."""
    standalone = detect.is_standalone_autoencoder(detect.shapes_of(state_dict))
    describes_unet = "model_channels" in (config or {}).get("unet_config", {}).get("params", {})
    complete = config is not None and (describes_unet or (standalone and "first_stage_config" in config))
    if not complete:
        return detect.detect_config(state_dict, name_hint, metadata, prediction, overrides=config)
    if standalone:
        return {"scale_factor": 1.0, **config, "cond_stage_config": None}
    params = detect.normalize_params(config)
    if prediction is not None:
        params["parameterization"] = detect.normalize_prediction(prediction)
    return params


# ---- keys -----------------------------------------------------------------------------------

# Keys official checkpoints carry that no module here uses: the DDPM schedule buffers (recomputed
# from the config), EMA bookkeeping, CLIP's position ids (a constant), training-only losses.
IGNORED_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "scale_factor", "model_ema.decay", "model_ema.num_updates",
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
})
IGNORED_PREFIXES = ("loss.", "first_stage_model.loss.", "lpips.", "discriminator.")
EMA_PREFIX = "model_ema."


def ema_key(unet_key: str) -> str:
    """CompVis LitEma's name for a UNet parameter: the DiffusionWrapper path with dots removed."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def split_state_dict(state_dict: dict, standalone: bool, use_ema: bool) -> tuple[dict, dict, dict, list[str]]:
    """(unet, first stage, cond stage, leftover keys) with prefixes removed and EMA weights
    substituted into the UNet when asked and present; ignored keys are dropped."""
    if standalone:
        first = {k: v for k, v in state_dict.items() if not _ignored(k)}
        return {}, first, {}, []
    parts: dict[str, dict] = {detect.UNET_PREFIX: {}, detect.FIRST_STAGE_PREFIX: {}, detect.COND_STAGE_PREFIX: {}}
    leftover = []
    for key, value in state_dict.items():
        prefix = next((p for p in parts if key.startswith(p)), None)
        if prefix is not None and not _ignored(key):
            parts[prefix][key[len(prefix):]] = value
        elif prefix is None and not _ignored(key) and not key.startswith(EMA_PREFIX):
            leftover.append(key)
    unet = parts[detect.UNET_PREFIX]
    if use_ema:
        for key in unet:
            if ema_key(key) in state_dict:
                unet[key] = state_dict[ema_key(key)]
    return unet, parts[detect.FIRST_STAGE_PREFIX], parts[detect.COND_STAGE_PREFIX], leftover


def _ignored(key: str) -> bool:
    """Also the x4 upscaler's `low_scale_model.*`: the noise-augmentation schedule's buffers."""
    return key.removeprefix(detect.LOW_SCALE_PREFIX) in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def _first(keys: list[str]) -> str:
    return repr(sorted(keys)[0])


def check_keys(module: torch.nn.Module, state: dict, prefix: str, leftover: list[str], what: str) -> None:
    """One error line for every way `state` fails to fit `module` exactly."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    unexpected = [prefix + k for k in state if k not in expected] + leftover
    missing = [prefix + k for k in expected if k not in state]
    wrong = [(prefix + k, tuple(v.shape), expected[k])
             for k, v in state.items() if k in expected and tuple(v.shape) != expected[k]]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key{'s' * (len(unexpected) > 1)} (first: {_first(unexpected)})")
    if missing:
        problems.append(f"{len(missing)} missing (first: {_first(missing)})")
    if wrong:
        key, got, want = sorted(wrong)[0]
        problems.append(f"{len(wrong)} with the wrong shape (first: {key!r} is {list(got)}, the model wants {list(want)})")
    if problems:
        raise LatentgenError(
            f"checkpoint does not fit the {what}: it has {', '.join(problems)}; pass --config if detection got it wrong"
        )


# ---- building -------------------------------------------------------------------------------


def _constructor_kwargs(cls: type, params: dict) -> dict:
    """The params `cls` accepts (official YAMLs also carry monitor, lossconfig, ckpt_path, device ...)."""
    accepted = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return dict(params)
    return {k: v for k, v in params.items() if k in accepted and k != "device"}


def _load_into(factory, state: dict, prefix: str, leftover: list[str], what: str,
               dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Build on the meta device (no wasted random init), check the keys, then adopt the tensors,
    their floating-point ones in `dtype` (a bf16 run never holds a float32 copy of the weights).
    `state` is emptied tensor by tensor as they are converted, so that the file's copy of each is
    freed before the next is made (else an fp16 checkpoint loaded in bf16 is resident twice)."""
    try:
        module = on_meta(factory)
    except (TypeError, KeyError, ValueError, AssertionError) as error:
        raise LatentgenError(f"the config does not describe a buildable {what}: {_first_line(error)}") from None
    check_keys(module, state, prefix, leftover, what)
    state = {k: _in_dtype(state.pop(k), dtype) for k in list(state)}
    return adopt(factory, state, module).to(dtype)  # .to: buffers outside the state dict too


def _in_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _unet_factory(params: dict):
    from .models.unet import UNetModel

    return lambda: UNetModel(**_constructor_kwargs(UNetModel, params))


def _first_stage_factory(config: dict):
    from .models.autoencoder import AutoencoderKL, VQModel

    if detect.target_name(config) == "AutoencoderDC":
        from .models.dcae import AutoencoderDC

        return lambda: AutoencoderDC(**_constructor_kwargs(AutoencoderDC, config.get("params", {})))
    cls = VQModel if detect.target_name(config) in ("VQModel", "VQModelInterface") else AutoencoderKL
    return lambda: cls(**_constructor_kwargs(cls, config.get("params", {})))


def _cond_stage_class(config: Any) -> Optional[type]:
    from .models import text

    name = detect.target_name(config)
    if config is None or name in (detect.UNCONDITIONAL, detect.FIRST_STAGE, "Identity"):
        return None
    classes = {n: getattr(text, n, None) for n in ("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder", "BERTEmbedder",
                                                   "ClassEmbedder", "MiniLMEmbedder")}
    if classes.get(name) is None:
        raise LatentgenError(f"unsupported conditioning model {name!r}")
    return classes[name]


def _build_cond_stage(config: Any, state: dict, leftover: list[str],
                      dtype: torch.dtype = torch.float32) -> Optional[torch.nn.Module]:
    cls = _cond_stage_class(config)
    if cls is None:
        if state:
            check_keys(torch.nn.Module(), state, detect.COND_STAGE_PREFIX, leftover, "model (it has no conditioning model)")
        return None
    kwargs = _constructor_kwargs(cls, config.get("params", {}) if isinstance(config, dict) else {})
    what = f"conditioning model ({cls.__name__})"
    return _load_into(lambda: cls(**kwargs), state, detect.COND_STAGE_PREFIX, leftover, what, dtype)


def _build_estimator(config: Optional[dict], state: dict, spec: ModelSpec,
                     dtype: torch.dtype) -> Optional[torch.nn.Module]:
    """The regression estimator (`estimator.*`) an LDM-SR or inpainting model refines, where its
    config describes one of the kind its conditioning takes."""
    if not config:
        return None
    from .models.estimator import ESTIMATORS

    name = detect.target_name(config)
    if name not in ESTIMATORS:
        raise LatentgenError(f"estimator_config names {config.get('target')!r}; known: {', '.join(ESTIMATORS)}")
    if name != spec.estimator_kind:
        raise LatentgenError(f"a {name} estimator does not fit a {spec.family} model")
    kind = ESTIMATORS[name]
    params = _constructor_kwargs(kind, config.get("params", {}))
    return _load_into(lambda: kind(**params), state, detect.ESTIMATOR_PREFIX, [], f"estimator ({name})", dtype)


def _noise_augmentation(low_scale_config: Optional[dict]) -> Optional[NoiseAugmentation]:
    """An upscaler's `low_scale_config` (ImageConcatWithNoiseAugmentation) as a NoiseAugmentation."""
    if not low_scale_config:
        return None
    params = low_scale_config.get("params", {})
    known = {f.name for f in fields(TrainingSchedule)}
    schedule = TrainingSchedule(**{k: v for k, v in params.get("noise_schedule_config", {}).items() if k in known})
    return NoiseAugmentation(schedule.alphas_cumprod(), int(params.get("max_noise_level", 1000)))


def _weights_and_config(path: Path, config) -> tuple[Path, Any]:
    """The weights file and the config to use: a model folder's config.json, or a checkpoint's
    sibling `<name>.yaml` (the AUTOMATIC1111 convention), unless one is given."""
    if path.is_dir():
        weights = path / "model.safetensors"
        if not weights.is_file():
            if (path / "model_index.json").is_file():
                raise LatentgenError(f"{path} is a diffusers folder; load the original single-file checkpoint instead")
            raise LatentgenError(f"{path} is a folder without model.safetensors")
        if config is None and (path / "config.json").is_file():
            config = path / "config.json"
        return weights, config
    if config is None:
        sibling = path.with_suffix(".yaml")
        config = sibling if sibling.is_file() else None
    return path, config


def read_spec(path: PathLike) -> tuple[ModelSpec, Path]:
    """(the spec a model would load with, its weights file), for listings: a safetensors file's
    shapes come from its header, so no tensor is read."""
    path = catalog.resolve(path)
    weights, config = _weights_and_config(path, None)
    if weights.suffix == ".safetensors":
        header, metadata = read_safetensors_header(weights)
        state: dict = {name: entry["shape"] for name, entry in header.items()}
    else:
        state, metadata = read_checkpoint(weights)
    params = resolve_params(state, read_config(config) if config is not None else None, path.name, metadata)
    return detect.model_spec(params), weights


@dataclass(frozen=True)
class ModelSummary:
    """One row of `latentgen models`."""

    name: str
    family: str
    factor: int
    size_mb: float
    hash: str
    path: str


def list_models() -> list[ModelSummary]:
    """Every model `catalog.discover` finds, summarised from config and headers (no weights loaded,
    so listing multi-GB files stays instant)."""
    rows = []
    for path in catalog.discover():
        spec, weights = read_spec(path)
        rows.append(ModelSummary(path.name if path.is_dir() else path.stem, spec.family, spec.factor,
                                 weights.stat().st_size / 2**20, file_sha256(weights)[:10], str(path)))
    return rows


def load_model(path: PathLike, config: Union[PathLike, dict, None] = None, use_ema: bool = True,
               prediction: Optional[str] = None,
               dtype: Union[torch.dtype, Callable[[ModelSpec], torch.dtype]] = torch.float32) -> LatentDiffusion:
    """A LatentDiffusion from a full LDM/SD checkpoint, a lone autoencoder, a model folder
    (model.safetensors + config.json), or a bundled model's name ("txt2img-emoji"). The architecture is detected from the weights unless a
    config is given; `prediction` ("eps" or "v") overrides the parameterization; `use_ema`
    takes CompVis' EMA weights for the UNet when the checkpoint has them; `dtype` is the precision
    the weights are materialised in, straight from the file's, or a function of the model's spec
    that chooses it (`--dtype auto` depends on the UNet's size)."""
    path = catalog.resolve(path)
    weights, config = _weights_and_config(path, config)
    state_dict, metadata = read_checkpoint(weights)
    params = resolve_params(state_dict, read_config(config) if config is not None else None, path.name, metadata, prediction)
    standalone = detect.is_standalone_autoencoder(detect.shapes_of(state_dict))
    unet_state, first_state, cond_state, leftover = split_state_dict(state_dict, standalone, use_ema)
    first_prefix = "" if standalone else detect.FIRST_STAGE_PREFIX
    if "first_stage" in params:
        if first_state:
            raise LatentgenError(f"{path.name} names first_stage {params['first_stage']!r} and also stores "
                                 "first_stage_model.* tensors: one of them must go")
        first_state = split_state_dict(read_checkpoint(named_first_stage(params["first_stage"])[1])[0], True, use_ema)[1]
        first_prefix = ""
    estimator_state = {}
    if params.get("estimator_config"):
        prefix = detect.ESTIMATOR_PREFIX
        estimator_state = {k[len(prefix):]: state_dict[k] for k in leftover if k.startswith(prefix)}
        leftover = [k for k in leftover if not k.startswith(prefix)]
    del state_dict  # the parts above hold every tensor still needed; _load_into frees them as it goes
    spec = detect.model_spec(params)
    if callable(dtype):
        dtype = dtype(spec)
    unet = None
    if params.get("unet_config"):
        unet = _load_into(_unet_factory(params["unet_config"]["params"]), unet_state, detect.UNET_PREFIX, leftover, "UNet",
                          dtype)
        leftover = []
    first_stage = _load_into(_first_stage_factory(params["first_stage_config"]), first_state, first_prefix, leftover,
                             "first-stage autoencoder", dtype)
    cond_stage = _build_cond_stage(params.get("cond_stage_config"), cond_state, [], dtype) if unet is not None else None
    estimator = _build_estimator(params.get("estimator_config"), estimator_state, spec, dtype)
    return LatentDiffusion(
        unet=unet, first_stage=first_stage, cond_stage=cond_stage, spec=spec,
        alphas_cumprod=spec.schedule.alphas_cumprod(), params=params, name=path.name if path.is_dir() else path.stem,
        sha256=file_sha256(weights), noise_augmentation=_noise_augmentation(params.get("low_scale_config")),
        estimator=estimator,
    )
