"""Storage of captured tensors: one directory per run, a JSON manifest, atomic files.

A run becomes visible all at once: its files are written into a staging
directory (each to a temporary name, then renamed) and the directory is renamed
into place last. A request that fails leaves nothing behind, and a reader never
sees a partial file. File names are made here (``sp0.pt``, ...), never from
client text; lookups go through the manifest, so ``../x`` can name nothing.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save, save_file

from .errors import Forbidden, NotFound, StorageFull
from .spare_files import SpareFiles

log = logging.getLogger(__name__)
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


# Deleted runs' files kept for later captures to write over (spare_files.py, --recycle-mb).
DEFAULT_RECYCLE_BYTES = 256 * 2**20

# Evictions one write does itself before leaving the rest to the janitor (a backlog of
# thousands of runs took 185 s inside the first capture before issue 20).
MAX_EVICTIONS_PER_WRITE = 64


class RunStore:
    """Runs on disk, with an optional retention limit.

    Over ``max_bytes``, policy ``"evict"`` deletes the oldest runs to make room
    and ``"refuse"`` answers 507; a run larger than the whole limit is always 507.
    A failed write (disk full, unwritable directory) is a 507 that leaves nothing.
    Deleted runs' files, up to ``recycle_bytes``, are written over by later captures
    (spare_files.py); they count against ``max_bytes`` and are released first.
    """

    def __init__(self, root: Path, max_bytes: int | None = None, policy: str = "evict",
                 recycle_bytes: int = DEFAULT_RECYCLE_BYTES):
        if policy not in ("evict", "refuse"):
            raise ValueError(f"unknown storage policy {policy!r}")
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.policy = policy
        self._staging = self.root / ".staging"
        shutil.rmtree(self._staging, ignore_errors=True)  # leftovers of a crash are never valid runs
        if self._staging.is_symlink() or self._staging.is_file():
            # A stray file (or link) of that name made every capture 507 "File exists" while /health said ok.
            log.warning("storage: removing a stray %s that is not a directory", self._staging)
            try:
                self._staging.unlink()
            except OSError as exc:
                log.warning("storage: cannot remove %s: %s", self._staging, exc)
        try:
            self._staging.mkdir(exist_ok=True)
        except OSError as exc:  # a read-only disk: serve what is stored, answer 507 to new captures
            log.warning("storage %s is not writable (%s): captures will be refused with 507", self.root, exc.strerror)
        self._lock = threading.Lock()
        limit = recycle_bytes if max_bytes is None else min(recycle_bytes, max_bytes)
        self._spares = SpareFiles(self._staging / "spare", limit)
        # run id -> bytes on disk, oldest first: what retention evicts.
        runs = sorted(self._valid_runs(), key=lambda item: item[1])
        self._sizes: OrderedDict[str, int] = OrderedDict((run_id, size) for run_id, _, size in runs)
        self._used = sum(self._sizes.values())  # kept with _sizes: no sum over every run per eviction step
        # Evicted runs are renamed into the trash under the lock (cheap) and deleted by the
        # janitor thread, off the request path; over the limit at start, it evicts down to it.
        # The janitor thread runs only while there is work (no idle thread per store).
        self._janitor_state = threading.Lock()
        self._janitor_pending = False
        self._janitor_running = False
        if self.max_bytes is not None and self._used > self.max_bytes and policy == "evict":
            self._kick_janitor()

    def _valid_runs(self) -> list[tuple[str, float, int]]:
        """(run id, mtime, bytes) of each stored run; anything else named like one is skipped and logged.

        A stray file, a symlink (dangling or not) or a directory whose manifest does
        not parse is not a run this server wrote: it must neither stop the server
        from starting nor be served.
        """
        runs = []
        for path in self.root.iterdir():
            if not _RUN_ID.match(path.name):
                continue
            try:
                if path.is_symlink() or not path.is_dir():
                    raise ValueError("not a directory")
                _read_manifest(path)
                runs.append((path.name, path.stat().st_mtime, _dir_bytes(path)))
            except (OSError, ValueError) as exc:
                log.warning("storage: skipping %s, which is not a valid run (%s)", path.name, exc)
        return runs

    def used_bytes(self) -> int:
        return self._used

    def _forget(self, run_id: str) -> None:
        self._used -= self._sizes.pop(run_id, 0)

    def _count(self, run_id: str, nbytes: int) -> None:
        self._forget(run_id)
        self._sizes[run_id] = nbytes
        self._used += nbytes

    def _resync(self) -> None:
        """Forget runs that are gone from disk (an outside clean-up): the accounting follows the disk."""
        for run_id in [r for r in self._sizes if not (self.root / r).is_dir()]:
            self._forget(run_id)

    def _make_room(self, needed: int) -> None:
        if self.max_bytes is None:
            return
        if needed > self.max_bytes:
            raise StorageFull(f"a capture of {needed} bytes is larger than the storage limit of {self.max_bytes} bytes (--max-storage-mb)")
        over = self._used + self._spares.bytes + needed - self.max_bytes
        if over > 0:
            self._spares.release(over)  # spare files are the first to go: they are nobody's data
        if self._used + needed > self.max_bytes:
            self._resync()  # only when over: one stat per run, not per capture
        evicted = 0
        while self._used + needed > self.max_bytes:
            if self.policy == "refuse" or not self._sizes:
                raise StorageFull(f"storage limit of {self.max_bytes} bytes reached (--max-storage-mb); delete runs to make room")
            if evicted >= MAX_EVICTIONS_PER_WRITE:
                # Bounded work on the request path: the janitor evicts the rest right after.
                self._kick_janitor()
                return
            evicted += 1
            oldest = next(iter(self._sizes))
            try:
                self._evict(oldest)
            except FileNotFoundError:  # removed behind the server's back: its bytes are free already
                self._forget(oldest)

    def _evict(self, run_id: str) -> None:
        """Take a run out of sight (one rename) and leave its deletion to the janitor."""
        self._staging.mkdir(exist_ok=True)
        os.replace(self.root / run_id, self._staging / f"deleted-{run_id}")
        self._forget(run_id)
        self._kick_janitor()

    def _kick_janitor(self) -> None:
        with self._janitor_state:
            self._janitor_pending = True
            if self._janitor_running:
                return
            self._janitor_running = True
        threading.Thread(target=self._janitor_loop, name="storage-janitor", daemon=True).start()

    def wait_janitor(self, timeout: float = 30.0) -> bool:
        """Until the janitor has nothing left to do (start-up eviction, trash); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._janitor_state:
                if not self._janitor_running:
                    return True
            time.sleep(0.01)
        return False

    def _janitor_loop(self) -> None:
        while True:
            with self._janitor_state:
                if not self._janitor_pending:
                    self._janitor_running = False
                    return
                self._janitor_pending = False
            try:
                # Over the limit at start: evict one run per step, each under the lock (bounded work).
                while self.max_bytes is not None and self.policy == "evict":
                    with self._lock:
                        if self._used <= self.max_bytes or not self._sizes:
                            break
                        oldest = next(iter(self._sizes))
                        try:
                            self._evict(oldest)
                        except FileNotFoundError:
                            self._forget(oldest)
                    time.sleep(0)  # between steps a capture waiting for the lock gets it
                for trash in list(self._staging.glob("deleted-*")) if self._staging.is_dir() else []:
                    self._discard(trash)
            except Exception:  # a janitor that dies would leave the trash forever: log and go on
                log.exception("storage janitor step failed")

    def _discard(self, trash: Path) -> None:
        """Delete a run taken out of sight, keeping what files the spare pool takes."""
        try:
            for path in trash.iterdir():
                if path.name != MANIFEST:
                    self._spares.keep(path)
        except OSError:
            pass
        shutil.rmtree(trash, ignore_errors=True)

    def spare_bytes(self) -> int:
        return self._spares.bytes

    def write_run(self, tensors: dict[str, torch.Tensor], fmt: str,
                  extra: dict | None = None) -> tuple[str, dict[str, StoredFile]]:
        needed = sum(t.numel() * t.element_size() for t in tensors.values())
        with self._lock:
            self._make_room(needed)
            try:
                return self._write(tensors, fmt, extra)
            except Exception as exc:
                # A full disk shows up as OSError (ENOSPC, EFBIG), as RuntimeError from
                # torch.save's zip writer, or as SafetensorError: all are "could not store".
                log.warning("storing a capture failed: %s: %s", type(exc).__name__, exc)
                raise StorageFull(f"could not store the capture: {self._failure_reason(exc, needed)}") from None

    def _failure_reason(self, exc: Exception, needed: int) -> str:
        """What to tell the client: torch's zip writer says "file write failed", not that the disk is full."""
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return "no space left on device" + (f" ({exc.strerror})" if exc.strerror else "")
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            free = None
        if free is not None and free < needed + (1 << 20):
            return f"no space left on device ({free} bytes free, the capture needs {needed})"
        return exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_line(exc)

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
                self._write_file(tmp, fmt, name, tensor)
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
        self._count(run_id, _dir_bytes(self.root / run_id))
        return run_id, stored

    def _write_file(self, tmp: Path, fmt: str, name: str, tensor: torch.Tensor) -> None:
        """One tensor's file, over a spare file where there is one (its pages are in the page cache already)."""
        recycled = self._spares.take(tmp, tensor.numel() * tensor.element_size())
        if fmt == "safetensors" and not recycled:
            save_file({name: tensor}, str(tmp))
            return
        # Our own handle, closed on failure at once: a handle left to the failed
        # writer's traceback keeps a full disk full until the garbage collector runs.
        with open(tmp, "r+b" if recycled else "wb") as f:
            if fmt == "safetensors":
                f.write(save({name: tensor}))
            else:
                torch.save(tensor, f)
            f.truncate()  # a spare longer than this file keeps nothing of its old bytes

    def _run_dir(self, run_id: str) -> Path:
        if not _RUN_ID.match(run_id):
            raise NotFound(f"no run {run_id!r}")
        run_dir = self.root / run_id
        # A symlink planted in the storage directory could point anywhere: runs are real directories.
        if run_dir.is_symlink() or not (run_dir / MANIFEST).is_file():
            raise NotFound(f"no run {run_id!r}")
        return run_dir

    def manifest(self, run_id: str) -> dict:
        run_dir = self._run_dir(run_id)
        try:
            return _read_manifest(run_dir)
        except FileNotFoundError:  # deleted between the check and the read
            raise NotFound(f"no run {run_id!r}") from None
        except (OSError, ValueError) as exc:
            log.warning("storage: run %s has a damaged manifest: %s", run_id, exc)
            raise NotFound(f"run {run_id!r} is damaged (its manifest cannot be read)") from None

    def file_path(self, run_id: str, name: str) -> Path:
        files = self.manifest(run_id)["files"]
        if name not in files:
            raise NotFound(f"run {run_id!r} has no file {name!r}")
        run_dir = (self.root / run_id).resolve()
        path = (run_dir / str(files[name].get("file", ""))).resolve()
        # The manifest is data on disk: a planted "../../etc/passwd" or a symlinked file must not be served.
        if path.parent != run_dir or not run_dir.is_relative_to(self.root):
            log.warning("storage: run %s names a file outside itself for %r; refused", run_id, name)
            raise NotFound(f"the file of {name!r} in run {run_id!r} is missing from storage")
        if not path.is_file():  # removed behind the server's back
            raise NotFound(f"the file of {name!r} in run {run_id!r} is missing from storage")
        return path

    def open_file(self, run_id: str, name: str):
        """An open binary file of a run's tensor and its size.

        The file is opened before the answer starts: a DELETE of the same run after
        this point removes the name, not the open file, so the download completes
        whole; a DELETE before it makes this a 404.
        """
        path = self.file_path(run_id, name)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise NotFound(f"no run {run_id!r}") from None
        except OSError as exc:  # ELOOP: the file became a symlink
            log.warning("storage: cannot open %s: %s", path, exc)
            raise NotFound(f"the file of {name!r} in run {run_id!r} is missing from storage") from None
        handle = os.fdopen(fd, "rb")
        return handle, os.fstat(fd).st_size

    def delete_run(self, run_id: str) -> None:
        with self._lock:
            self._run_dir(run_id)  # under the lock: two DELETEs of one run are one 204 and one 404
            try:
                self._remove(run_id)
            except FileNotFoundError:
                raise NotFound(f"no run {run_id!r}") from None
            except OSError as exc:
                if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                    log.warning("storage: cannot delete run %s: %s", run_id, exc)
                    raise Forbidden(f"run {run_id!r} was not deleted: the storage is not writable ({exc.strerror})") from None
                raise

    def _remove(self, run_id: str) -> None:
        # Rename first so the run disappears at once even if removal is slow.
        self._staging.mkdir(exist_ok=True)
        trash = self._staging / f"deleted-{run_id}"
        os.replace(self.root / run_id, trash)
        self._discard(trash)
        self._forget(run_id)


MAX_MANIFEST_BYTES = 16 * 2**20  # ours are a few KiB; a planted giant is not read whole


def _read_manifest(run_dir: Path) -> dict:
    # Non-blocking and no symlink: a FIFO planted as the manifest hung start-up before the port was bound.
    fd = os.open(run_dir / MANIFEST, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("manifest is not a regular file")
        if info.st_size > MAX_MANIFEST_BYTES:
            raise ValueError(f"manifest of {info.st_size} bytes is over {MAX_MANIFEST_BYTES}")
        text = f.read(MAX_MANIFEST_BYTES + 1)
    try:
        manifest = json.loads(text)
    except RecursionError:  # 5000 nested arrays: json's recursion limit, not a run's manifest
        raise ValueError("manifest is nested too deeply") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not all(
            isinstance(entry, dict) for entry in manifest["files"].values()):
        raise ValueError("manifest is not a run manifest")
    return manifest


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
