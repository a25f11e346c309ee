"""Safetensors files: headers parsed as strictly as the safetensors library, headers written for
planned shards, dtype codes, and the finiteness checks and casts every tensor passes through."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import SmileError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
FLOAT_CODES = {"F64", "F32", "F16", "BF16"}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def itemsize(code: str) -> int:
    return DTYPES[code].itemsize


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset of its data, dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class SafetensorsFile:
    path: str
    size: int
    header_sha256: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)


def read_safetensors_header(path: str | Path) -> SafetensorsFile:
    """Parse and validate a safetensors header without touching the tensor data.

    As strict as the safetensors library: integer offsets and shapes, string metadata, no
    duplicate names, and tensors that tile the data section exactly (no overlaps, no holes).
    """
    path = str(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if length < 2 or length > min(size - 8, MAX_HEADER_BYTES):
            raise SmileError(
                f"{path} is not a valid safetensors file: its header length field ({length}) does not fit "
                f"a file of {size} bytes. The file is truncated or corrupted; download or save it again."
            )
        raw = f.read(length)
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise SmileError(
            f"{path} is not a valid safetensors file: its header is not valid JSON ({exc}). "
            "The file is corrupted; download or save it again."
        ) from None
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SmileError(
            f"{path}: the header's __metadata__ must map names to strings, but it is {metadata!r}. The file is corrupted "
            "or was written by a broken tool; save it again with safetensors."
        )
    data_start, data_size = 8 + length, size - 8 - length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor_info(path, name, entry, data_start, data_size)
    end = 0
    for info in sorted(tensors.values(), key=lambda t: (t.offset, t.nbytes)):
        if info.offset - data_start != end:
            raise SmileError(
                f"{path}: tensor {info.name!r} starts at data offset {info.offset - data_start}, but the tensors before it "
                f"end at {end}: tensors overlap or leave a hole. The file is corrupted; download or save it again."
            )
        end += info.nbytes
    if end != data_size:
        raise SmileError(
            f"{path}: the tensors end at data offset {end} but the data section is {data_size} bytes. The file is truncated "
            "or corrupted; download or save it again."
        )
    return SafetensorsFile(path, size, hashlib.sha256(raw).hexdigest(), tensors, metadata)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1}) if len(set(keys)) != len(keys) else []
    if dupes:
        raise ValueError(f"the name {dupes[0]!r} appears more than once")
    return dict(pairs)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_info(path: str, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    fields = entry if isinstance(entry, dict) else {}
    code, shape, offsets = fields.get("dtype"), fields.get("shape"), fields.get("data_offsets")
    if not (
        isinstance(code, str)
        and isinstance(shape, list)
        and all(map(_is_count, shape))
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(map(_is_count, offsets))
    ):
        raise SmileError(
            f"{path}: tensor {name!r} has a malformed header entry {entry!r} (dtype must be a string, shape and "
            "data_offsets non-negative integers); the file is corrupted."
        )
    if code not in DTYPES:
        raise SmileError(f"{path}: tensor {name!r} has dtype {code!r}, which smile-stream does not handle.")
    shape, (begin, end) = tuple(shape), offsets
    expected = math.prod(shape) * itemsize(code)
    if not begin <= end <= data_size or end - begin != expected:
        raise SmileError(
            f"{path}: tensor {name!r} ({code}, shape {list(shape)}) has data offsets [{begin}, {end}] that do not "
            f"fit its size ({expected} bytes) or the file's data section ({data_size} bytes). The file is truncated "
            "or corrupted; download or save it again."
        )
    return TensorInfo(name, code, shape, path, data_start + begin, end - begin)


def require_finite(tensor: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    """The tensor, unless it holds NaN or Inf, which would reach the converted model."""
    if not is_finite(tensor):
        raise nonfinite_error(info)
    return tensor


def is_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf. min/max propagate both, and cost one read, without a boolean copy."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    return all(map(math.isfinite, value_range(tensor)))


def value_range(tensor: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a non-empty tensor in one read; NaN or Inf anywhere shows in them."""
    low, high = torch.aminmax(tensor.reshape(-1))
    return float(low), float(high)


def cast(tensor: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """`tensor` in `dtype`, checked finite: every tensor the writer does not copy comes through here.
    Values that overflow `dtype` (finite before the cast, Inf after) are told apart from NaN or Inf
    that were there already (a damaged input, or a computation that diverged)."""
    result = tensor.to(dtype)
    if is_finite(result):
        return result
    if not is_finite(tensor):
        raise SmileError(f"{what}: the computed tensor holds NaN or Inf; an input it is made from is damaged.")
    peak = float(tensor.abs().max())
    raise SmileError(
        f"{what} has values up to {peak:.4g}, which do not fit {str(dtype).removeprefix('torch.')} (largest "
        f"{torch.finfo(dtype).max:.4g}). Choose a wider output dtype: --dtype bfloat16 or float32."
    )


def nonfinite_error(info: TensorInfo) -> SmileError:
    return SmileError(
        f"{info.file}: tensor {info.name!r} holds NaN or Inf values, which would reach the converted model. "
        "The checkpoint is damaged (or was saved from a diverged run); fix or re-download it."
    )


def safetensors_header(entries: list[tuple[str, str, tuple[int, ...]]]) -> bytes:
    """The JSON header for tensors (name, dtype code, shape) laid out back to back in this order,
    padded so that the data starts 8-byte aligned."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, code, shape in entries:
        nbytes = math.prod(shape) * itemsize(code)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-(8 + len(raw)) % 8)
