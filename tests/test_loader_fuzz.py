"""Byte-level fuzzing of checkpoint reading: a damaged file either loads or raises LatentgenError,
never another exception, a hang or a runaway allocation."""

import io
import json
import struct
import tempfile
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors

from latentgen.errors import LatentgenError
from latentgen.loader import load_state_dict

EXAMPLES = 200
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=10), derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def _tensors() -> dict:
    torch.manual_seed(0)
    return {"model.w": torch.randn(3, 4), "model.b": torch.arange(6), "half": torch.randn(5).half()}


def _pickle_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"state_dict": _tensors(), "global_step": 3, "epoch": 1}, buffer)
    return buffer.getvalue()


VALID = {".safetensors": save_safetensors(_tensors(), metadata={"format": "pt"}), ".ckpt": _pickle_bytes()}


def _pickle_span(data: bytes) -> tuple[int, int]:
    """Where the data.pkl record lies inside the zip, so that mutations can aim at the pickle."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    return start, start + info.compress_size - 1


def mutations(data: bytes, focus: tuple[int, int]):
    """Up to 8 overwritten bytes, optionally a truncation; bytes in `focus` (a header, the pickle) are favoured."""
    size = len(data)
    position = st.one_of(st.integers(*focus), st.integers(0, size - 1))
    edits = st.lists(st.tuples(position, st.integers(0, 255)), min_size=1, max_size=8)
    return st.tuples(edits, st.one_of(st.none(), st.none(), st.integers(0, size)))


def _load_mutated(suffix: str, edits, cut) -> None:
    data = bytearray(VALID[suffix])
    for position, value in edits:
        data[position] = value
    if cut is not None:
        data = data[:cut]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzzed{suffix}"
        path.write_bytes(bytes(data))
        try:
            state = load_state_dict(path)
        except LatentgenError as error:
            assert "\n" not in str(error)
            return
        assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())


@pytest.mark.slow
@FUZZ
@given(mutations(VALID[".safetensors"], (0, 200)))
def test_fuzzed_safetensors_load_or_raise_latentgen_error(mutation):
    _load_mutated(".safetensors", *mutation)


@pytest.mark.slow
@FUZZ
@given(mutations(VALID[".ckpt"], _pickle_span(VALID[".ckpt"])))
def test_fuzzed_pickle_checkpoints_load_or_raise_latentgen_error(mutation):
    _load_mutated(".ckpt", *mutation)


def _header_entries():
    """Safetensors header entries around the valid ones: odd dtypes, huge or negative shapes, stray offsets."""
    number = st.one_of(st.integers(0, 64), st.integers(-3, 2**64), st.floats(allow_nan=False), st.text(max_size=3))
    entry = st.fixed_dictionaries({
        "dtype": st.sampled_from(["F32", "F16", "I64", "BOOL", "F8_E4M3", "X9", ""]),
        "shape": st.lists(st.one_of(st.integers(0, 8), number), max_size=4),
        "data_offsets": st.lists(st.one_of(st.integers(0, 160), number), min_size=1, max_size=3),
    })
    return st.dictionaries(st.text(min_size=1, max_size=5), entry, min_size=1, max_size=4)


@pytest.mark.slow
@FUZZ
@given(_header_entries(), st.integers(0, 160))
def test_fuzzed_safetensors_headers_load_or_raise_latentgen_error(header, data_size):
    raw = json.dumps(header).encode()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzzed.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_size))
        try:
            state = load_state_dict(path)
        except LatentgenError as error:
            assert "\n" not in str(error)
            return
        assert sum(t.numel() * t.element_size() for t in state.values()) <= data_size
