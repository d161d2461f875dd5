"""Loading tensor files downloaded from an untrusted server, safely.

Only two loaders ever touch the bytes:

- safetensors files through the ``safetensors`` library (a JSON header and raw
  little-endian data; nothing is executed);
- ``.pt`` files through ``torch.load(weights_only=True)``, which refuses every
  pickle global outside torch's tensor allow-list. Without torch (the light
  install) a ``.pt`` file is read by ``_read_pt_without_torch``: the same idea,
  a restricted unpickler whose ``find_class`` maps the three globals a saved
  tensor needs to local stand-ins and refuses everything else, so the real
  modules are never imported or called.

Plain ``pickle.load`` is never used. Whatever comes back is a ``LoadedTensor``:
the dtype and shape as stored, plus the values as a float32 numpy array (bf16
and fp16 widened exactly) for the value checks.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import struct
import zipfile
from dataclasses import dataclass

import numpy as np

from capture_conformance.harness.protocol.client import ServerFault

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
# The slack allowed on top of numel * itemsize: a .pt zip or a safetensors header is a
# few hundred bytes to a few KiB; 1 % covers alignment padding of large files.
FIXED_OVERHEAD_BYTES = 64 * 1024
RELATIVE_OVERHEAD = 0.01

_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
_PT_STORAGES = {"FloatStorage": "float32", "BFloat16Storage": "bfloat16", "HalfStorage": "float16",
                "DoubleStorage": "float64"}


def dtype_name(dtype: str) -> str:
    """``"torch.float32"`` -> ``"float32"``."""
    return dtype.removeprefix("torch.")


def itemsize(dtype: str) -> int | None:
    return ITEMSIZE.get(dtype_name(dtype))


def size_cap(numel: int, dtype: str) -> int:
    """The most bytes a file holding ``numel`` values of ``dtype`` may plausibly take."""
    payload = numel * (itemsize(dtype) or 8)
    return payload + FIXED_OVERHEAD_BYTES + int(payload * RELATIVE_OVERHEAD)


@dataclass
class LoadedTensor:
    dtype: str  # as stored, in torch's spelling: "torch.bfloat16"
    shape: tuple[int, ...]
    values: np.ndarray  # float32 copy for comparisons
    key: str | None = None  # the safetensors key it was stored under
    file_format: str = "pt"


def detect_format(data: bytes) -> str:
    """``"pt"`` (zip or legacy torch.save), ``"safetensors"`` or ``"unknown"``."""
    if data[:4] == b"PK\x03\x04" or data[:2] == b"\x80\x02":
        return "pt"
    if len(data) >= 9 and data[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", data[:8])
        if 0 < header_len <= len(data) - 8:
            return "safetensors"
    return "unknown"


def load_tensor_file(data: bytes, *, what: str, declared_format: str | None = None) -> LoadedTensor:
    """Decode one downloaded tensor file; every malformation is a ``ServerFault``."""
    actual = detect_format(data)
    if declared_format and actual != "unknown" and actual != declared_format:
        raise ServerFault(f"{what}: metadata says format {declared_format!r} but the file is {actual}")
    if actual == "safetensors":
        return _load_safetensors(data, what)
    if actual == "pt":
        return _load_pt(data, what)
    raise ServerFault(f"{what}: neither a torch.save file nor safetensors ({len(data)} bytes, starts {data[:16]!r})")


# -- safetensors ---------------------------------------------------------------------------


def _load_safetensors(data: bytes, what: str) -> LoadedTensor:
    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_len])
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
    except (ValueError, struct.error) as exc:
        raise ServerFault(f"{what}: unreadable safetensors header: {exc}") from None
    if len(entries) != 1:
        raise ServerFault(f"{what}: a capture file must hold one tensor, this safetensors file holds {sorted(entries)}")
    (key, entry), = entries.items()
    try:
        import torch  # noqa: F401
        from safetensors.torch import load as load_torch

        tensor = load_torch(data)[key]
        return LoadedTensor(str(tensor.dtype), tuple(tensor.shape), _torch_to_float32(tensor), key, "safetensors")
    except ImportError:
        pass
    except Exception as exc:  # safetensors raises its own SafetensorError on any malformation
        raise ServerFault(f"{what}: safetensors refused the file: {exc}") from None
    dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise ServerFault(f"{what}: unexpected safetensors dtype {entry.get('dtype')!r}")
    if dtype == "bfloat16":
        # numpy has no bfloat16, so safetensors.numpy cannot read it: widen the raw bits.
        start, end = entry["data_offsets"]
        raw = data[8 + header_len + start : 8 + header_len + end]
        values = _bf16_to_float32(np.frombuffer(raw, dtype="<u2")).reshape(entry["shape"])
    else:
        from safetensors.numpy import load as load_numpy

        try:
            values = load_numpy(data)[key].astype(np.float32)
        except Exception as exc:
            raise ServerFault(f"{what}: safetensors refused the file: {exc}") from None
    return LoadedTensor(f"torch.{dtype}", tuple(entry["shape"]), values, key, "safetensors")


# -- torch.save ------------------------------------------------------------------------------


def _load_pt(data: bytes, what: str) -> LoadedTensor:
    try:
        import torch
    except ImportError:
        return _read_pt_without_torch(data, what)
    try:
        obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # UnpicklingError for forbidden globals, RuntimeError for broken zips
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ServerFault(f"{what}: torch.load(weights_only=True) refused the file: {first_line}") from None
    if not isinstance(obj, torch.Tensor):
        raise ServerFault(f"{what}: a capture .pt file must hold one tensor, it holds a {type(obj).__name__}")
    return LoadedTensor(str(obj.dtype), tuple(obj.shape), _torch_to_float32(obj), None, "pt")


def _torch_to_float32(tensor) -> np.ndarray:
    return tensor.detach().to("cpu").float().numpy()


def _bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


@dataclass
class _StorageRef:
    dtype: str
    key: str
    numel: int


class _TensorRef:
    """What ``_rebuild_tensor_v2`` receives, kept as plain data."""

    def __init__(self, storage, offset, size, stride, *_ignored):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _TensorRef
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name in _PT_STORAGES:
            return _PT_STORAGES[name]  # a dtype name stands in for the storage class
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a tensor file")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, dtype, key, _location, numel = pid
        if dtype not in _PT_STORAGES.values():
            raise pickle.UnpicklingError(f"unexpected storage type {dtype!r}")
        return _StorageRef(dtype, str(key), int(numel))


def _read_pt_without_torch(data: bytes, what: str) -> LoadedTensor:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
        pkl = next(n for n in names if n.endswith("/data.pkl"))
        prefix = pkl[: -len("data.pkl")]
        ref = _RestrictedUnpickler(io.BytesIO(archive.read(pkl))).load()
        if not isinstance(ref, _TensorRef):
            raise ServerFault(f"{what}: a capture .pt file must hold one tensor, it holds a {type(ref).__name__}")
        storage = ref.storage
        raw = archive.read(f"{prefix}data/{storage.key}")
    except ServerFault:
        raise
    except (zipfile.BadZipFile, StopIteration, KeyError, pickle.UnpicklingError, EOFError, TypeError, ValueError) as exc:
        raise ServerFault(f"{what}: not a plain torch.save tensor file (read without torch): {exc}") from None
    width = ITEMSIZE[storage.dtype]
    if len(raw) < storage.numel * width:
        raise ServerFault(f"{what}: storage holds {len(raw)} bytes, fewer than {storage.numel} x {width}")
    if storage.dtype == "bfloat16":
        flat = _bf16_to_float32(np.frombuffer(raw, dtype="<u2", count=storage.numel))
    else:
        flat = np.frombuffer(raw, dtype=np.dtype(storage.dtype).newbyteorder("<"), count=storage.numel).astype(np.float32)
    needed = ref.offset + sum((s - 1) * st for s, st in zip(ref.size, ref.stride)) + 1 if math.prod(ref.size) else 0
    if needed > storage.numel:
        raise ServerFault(f"{what}: tensor view {ref.size} reaches past its storage of {storage.numel} values")
    values = np.lib.stride_tricks.as_strided(
        flat[ref.offset :], shape=ref.size, strides=tuple(s * flat.itemsize for s in ref.stride)
    ).copy()
    return LoadedTensor(f"torch.{storage.dtype}", ref.size, values, None, "pt")
