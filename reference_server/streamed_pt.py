"""A ``.pt`` file written while the generation runs, one captured step at a time.

Why: writing an all-token head capture at the end is the last cost capture adds to a
request. A 32-step capture of a 151,936-wide head is 19 MiB; on this project's CI disk
(ext4 in a VM) putting that into the page cache takes 55-70 ms, against about 620 ms of
generation: 1.08x on its own (docs/performance.md). Appended step by step on the storage
writer thread, the write overlaps the generation on another core, and what is left at
the end is the small entries and the zip's directory.

The file is the one ``torch.save`` writes, entry for entry: a zip archive (stored, no
compression) holding ``archive/data/0`` (the tensor's bytes, 64-byte aligned as torch
aligns them), ``archive/data.pkl`` (the pickle ``torch.save`` makes of a contiguous
tensor: ``torch._utils._rebuild_tensor_v2`` over storage ``0``), ``archive/byteorder``,
``archive/version``, ``archive/.format_version``, ``archive/.storage_alignment`` and
``archive/.data/serialization_id``. ``torch.load(weights_only=True)`` and the harness's
torch-free reader load it; tests/test_streamed_pt.py compares it with ``torch.save``.

It only ever holds whole steps in order; ``finish`` is told the final shape and refuses
(returns False) anything else: more or fewer steps than the generation kept, another
dtype or width. The caller then writes the tensor the ordinary way.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import sys
import threading
import uuid
import zipfile
import zlib
from pathlib import Path

import torch

ARCHIVE = "archive"
ALIGNMENT = 64  # torch aligns each storage's data to 64 bytes (its .storage_alignment entry)
_ZIP64_LIMIT = zipfile.ZIP64_LIMIT
_FIXED_HEADER = 30  # a zip local file header before its name and extra field


class StreamedPt:
    """One savepoint's ``.pt`` file, appended a step at a time (call every method from one thread)."""

    def __init__(self, path: Path, max_bytes: int):
        self.path = Path(path)
        self.max_bytes = max_bytes  # the most the generation can append: decides zip64 up front
        self.rows = 0  # steps appended
        self.dtype: torch.dtype | None = None
        self.step_shape: tuple[int, ...] | None = None  # one step's [1, 1, ...]
        self.error: str | None = None  # why the file cannot be used (an append failed, a step did not fit)
        self._zip: zipfile.ZipFile | None = None
        self._data = None  # the open archive/data/0 entry
        self._closed = False
        self._lock = threading.Lock()

    # -- on the writer thread, during the generation -------------------------------------

    def append(self, step: torch.Tensor) -> None:
        with self._lock:
            if self._closed or self.error:
                return
            try:
                self._append(step)
            except Exception as exc:  # a full disk: the ordinary write at the end will say so (507)
                self.error = f"{type(exc).__name__}: {exc}"
                self._close_quietly()

    def _append(self, step: torch.Tensor) -> None:
        step = step.detach().cpu().contiguous()
        if self._zip is None:
            self.dtype, self.step_shape = step.dtype, tuple(step.shape)
            self._open()
        elif step.dtype != self.dtype or tuple(step.shape) != self.step_shape:
            self.error = f"a step of {step.dtype} {list(step.shape)} after {self.dtype} {list(self.step_shape)}"
            self._close_quietly()
            return
        self._data.write(_bytes(step))
        self.rows += 1

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._zip = zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_STORED)
        info = zipfile.ZipInfo(f"{ARCHIVE}/data/0", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        zip64 = self.max_bytes >= _ZIP64_LIMIT
        # Pad the local header's extra field (torch's own 'FB' padding record) so that the data begins
        # on a 64-byte boundary; zipfile adds its 20-byte zip64 record itself when asked to.
        used = _FIXED_HEADER + len(info.filename.encode()) + (20 if zip64 else 0)
        pad = (-used) % ALIGNMENT
        if 0 < pad < 4:
            pad += ALIGNMENT
        info.extra = b"FB" + struct.pack("<H", pad - 4) + b"Z" * (pad - 4) if pad else b""
        self._data = self._zip.open(info, "w", force_zip64=zip64)

    # -- on the writer thread, at the end --------------------------------------------------

    def finish(self, tensor: torch.Tensor) -> bool:
        """Complete the file as the file of ``tensor``; False (file removed) when it does not hold exactly it.

        Shape and dtype are compared, then the bytes: the CRC-32 the zip records of what was appended
        against that of the tensor (about 5 ms for 19 MiB). Whatever changed the tensor after its steps
        were kept is caught there, and the caller writes the tensor itself.
        """
        with self._lock:
            shape = list(tensor.shape)
            expected = (self.step_shape is not None and self.error is None and tensor.dtype == self.dtype
                        and tensor.dtype in _STORAGE_TYPES
                        and len(shape) == len(self.step_shape) and shape[1] == self.rows
                        and list(shape[:1]) + list(shape[2:]) == [self.step_shape[0], *self.step_shape[2:]]
                        and self.step_shape[1] == 1)
            if expected:
                self._data.close()
                self._data = None
                recorded = self._zip.getinfo(f"{ARCHIVE}/data/0").CRC
                expected = recorded == zlib.crc32(_bytes(tensor.detach().cpu().contiguous()))
            if not expected:
                self._close_quietly()
                self._remove()
                return False
            for name, data in self._records(shape, tensor.dtype):
                info = zipfile.ZipInfo(f"{ARCHIVE}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
                self._zip.writestr(info, data, compress_type=zipfile.ZIP_STORED)
            self._zip.close()
            self._zip = None
            self._closed = True
            return True

    def abort(self) -> None:
        with self._lock:
            self._close_quietly()
            self._remove()

    def _records(self, shape: list[int], dtype: torch.dtype) -> list[tuple[str, bytes]]:
        return [
            ("data.pkl", tensor_pickle(shape, dtype)),
            (".format_version", b"1"),
            (".storage_alignment", str(ALIGNMENT).encode()),
            ("byteorder", sys.byteorder.encode()),
            ("version", b"3\n"),
            (".data/serialization_id", str(uuid.uuid4().int).encode()),
        ]

    def _close_quietly(self) -> None:
        self._closed = True
        for closer in (self._data, self._zip):
            try:
                if closer is not None:
                    closer.close()
            except Exception:  # noqa: BLE001 - the file is being given up; the ordinary write follows
                pass
        self._data = self._zip = None

    def _remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _bytes(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, without a copy (numpy has no bfloat16: viewed as bytes first)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


# -- the pickle torch.save writes for one contiguous tensor -------------------------------------

# The storage class names torch's pickle refers to (torch.TypedStorage._pickle_storage_type, deprecated).
_STORAGE_TYPES = {torch.float32: "FloatStorage", torch.bfloat16: "BFloat16Storage", torch.float16: "HalfStorage",
                  torch.float64: "DoubleStorage"}


class _Storage:
    """Stands for the tensor's storage in the pickle: torch writes it as a persistent id."""


class _Tensor:
    """Stands for the tensor: reduced as torch reduces a plain CPU tensor."""


def tensor_pickle(shape: list[int], dtype: torch.dtype) -> bytes:
    """``archive/data.pkl`` of ``torch.save`` for a contiguous CPU tensor of ``shape`` and ``dtype``."""
    numel = 1
    for size in shape:
        numel *= int(size)
    stride, step = [], 1
    for size in reversed(shape):
        stride.insert(0, step)
        step *= int(size)
    storage_type = getattr(torch, _STORAGE_TYPES[dtype])
    storage, tensor = _Storage(), _Tensor()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", storage_type, "0", "cpu", numel) if obj is storage else None

        def reducer_override(self, obj):
            if obj is tensor:
                return (torch._utils._rebuild_tensor_v2,
                        (storage, 0, tuple(int(s) for s in shape), tuple(stride), False, collections.OrderedDict()))
            return NotImplemented

    out = io.BytesIO()
    Pickler(out, protocol=2).dump(tensor)
    return out.getvalue()
