"""Storage of captured tensors: one directory per run, a JSON manifest, atomic files.

A run becomes visible all at once: its files are written into a staging
directory (each to a temporary name, then renamed) and the directory is renamed
into place last. A request that fails leaves nothing behind, and a reader never
sees a partial file. File names are made here (``sp0.pt``, ...), never from
client text; lookups go through the manifest, so ``../x`` can name nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import NotFound, StorageFull

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
MANIFEST = "manifest.json"
EXTENSIONS = {"pt": "pt", "safetensors": "safetensors"}


@dataclass(frozen=True)
class StoredFile:
    name: str
    path: Path
    shape: list[int]
    dtype: str
    numel: int
    size_mb: float


def size_mb(numel: int, dtype: torch.dtype) -> float:
    return round(numel * dtype.itemsize / 2**20, 2)


class RunStore:
    """Runs on disk, with an optional retention limit.

    Over ``max_bytes``, policy ``"evict"`` deletes the oldest runs to make room
    and ``"refuse"`` answers 507; a run larger than the whole limit is always 507.
    A failed write (disk full, unwritable directory) is a 507 that leaves nothing.
    """

    def __init__(self, root: Path, max_bytes: int | None = None, policy: str = "evict"):
        if policy not in ("evict", "refuse"):
            raise ValueError(f"unknown storage policy {policy!r}")
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.policy = policy
        self._staging = self.root / ".staging"
        shutil.rmtree(self._staging, ignore_errors=True)  # leftovers of a crash are never valid runs
        self._staging.mkdir()
        self._lock = threading.Lock()
        # run id -> bytes on disk, oldest first: what retention evicts.
        runs = sorted((p for p in self.root.iterdir() if _RUN_ID.match(p.name)), key=lambda p: p.stat().st_mtime)
        self._sizes: OrderedDict[str, int] = OrderedDict((p.name, _dir_bytes(p)) for p in runs)

    def used_bytes(self) -> int:
        return sum(self._sizes.values())

    def _make_room(self, needed: int) -> None:
        if self.max_bytes is None:
            return
        if needed > self.max_bytes:
            raise StorageFull(f"a capture of {needed} bytes is larger than the storage limit of {self.max_bytes} bytes (--max-storage-mb)")
        while self.used_bytes() + needed > self.max_bytes:
            if self.policy == "refuse" or not self._sizes:
                raise StorageFull(f"storage limit of {self.max_bytes} bytes reached (--max-storage-mb); delete runs to make room")
            self._remove(next(iter(self._sizes)))

    def write_run(self, tensors: dict[str, torch.Tensor], fmt: str, extra: dict | None = None) -> tuple[str, dict[str, StoredFile]]:
        needed = sum(t.numel() * t.element_size() for t in tensors.values())
        with self._lock:
            self._make_room(needed)
            try:
                return self._write(tensors, fmt, extra)
            except OSError as exc:
                raise StorageFull(f"could not store the capture: {exc.strerror or exc}") from None

    def _write(self, tensors: dict[str, torch.Tensor], fmt: str, extra: dict | None) -> tuple[str, dict[str, StoredFile]]:
        run_id = uuid.uuid4().hex
        stage = self._staging / run_id
        try:
            self._staging.mkdir(exist_ok=True)
            stage.mkdir()
            stored: dict[str, StoredFile] = {}
            for index, (name, tensor) in enumerate(tensors.items()):
                final = stage / f"sp{index}.{EXTENSIONS[fmt]}"
                tmp = final.with_suffix(".tmp")
                tensor = tensor.contiguous()
                if fmt == "safetensors":
                    save_file({name: tensor}, str(tmp))
                else:
                    torch.save(tensor, tmp)
                os.replace(tmp, final)
                stored[name] = StoredFile(
                    name=name,
                    path=self.root / run_id / final.name,
                    shape=list(tensor.shape),
                    dtype=str(tensor.dtype),
                    numel=tensor.numel(),
                    size_mb=size_mb(tensor.numel(), tensor.dtype),
                )
            manifest = {
                "run_id": run_id,
                "format": fmt,
                "files": {n: {"file": f.path.name, "shape": f.shape, "dtype": f.dtype, "numel": f.numel} for n, f in stored.items()},
                **(extra or {}),
            }
            (stage / MANIFEST).write_text(json.dumps(manifest, indent=1))
            os.replace(stage, self.root / run_id)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        self._sizes[run_id] = _dir_bytes(self.root / run_id)
        return run_id, stored

    def _run_dir(self, run_id: str) -> Path:
        if not _RUN_ID.match(run_id):
            raise NotFound(f"no run {run_id!r}")
        run_dir = self.root / run_id
        if not (run_dir / MANIFEST).is_file():
            raise NotFound(f"no run {run_id!r}")
        return run_dir

    def manifest(self, run_id: str) -> dict:
        return json.loads((self._run_dir(run_id) / MANIFEST).read_text())

    def file_path(self, run_id: str, name: str) -> Path:
        files = self.manifest(run_id)["files"]
        if name not in files:
            raise NotFound(f"run {run_id!r} has no file {name!r}")
        path = self.root / run_id / files[name]["file"]
        if not path.is_file():  # removed behind the server's back
            raise NotFound(f"the file of {name!r} in run {run_id!r} is missing from storage")
        return path

    def delete_run(self, run_id: str) -> None:
        self._run_dir(run_id)
        with self._lock:
            self._remove(run_id)

    def _remove(self, run_id: str) -> None:
        # Rename first so the run disappears at once even if removal is slow.
        trash = self._staging / f"deleted-{run_id}"
        os.replace(self.root / run_id, trash)
        shutil.rmtree(trash, ignore_errors=True)
        self._sizes.pop(run_id, None)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
