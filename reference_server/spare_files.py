"""Deleted runs' files kept for the next captures to write over, as databases recycle log segments.

Why: a capture's cost at the end is putting its bytes into the page cache. Into pages
the file already has, that is a copy (19 MiB of head logits: about 9 ms with
``torch.save``, docs/performance.md); into new pages, the kernel has to find and map
each one first, which on a VM that hands freed memory back to its host (free page
reporting, as on this project's CI machines) took 78 ms for the same 19 MiB. A
client that downloads each run and DELETEs it (the harness, the benchmark, any
collector that does not keep runs on the server) frees exactly the pages the next
capture needs. Keeping a deleted run's file under a hidden name and writing the next
capture over it (then truncating it to its new length) turns the second cost into
the first. PostgreSQL recycles WAL segments and RocksDB log files for the same reason.

What it never does: hand out a file somebody still reads. A DELETE racing a download
must leave the download whole (the reader keeps the old inode, storage.open_file).
Before a file is kept, a write lease is taken on it, and Linux grants one only when no
other descriptor, in this process or another, has the file open; a file that is open,
or on a filesystem without leases, or any error, is simply deleted as before. Once
kept its name is a random one inside the storage's staging directory, which no
request can name; start-up removes the staging directory, spares included.

The pool is bounded (``max_bytes``, ``--recycle-mb``); its files count against the
storage limit and are the first thing released when room is needed.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import stat
import uuid
from pathlib import Path

try:
    import fcntl
except ImportError:  # not a POSIX system: nothing is ever kept
    fcntl = None

log = logging.getLogger(__name__)
MAX_FILES = 64  # a pool of many tiny files would save nothing and cost a directory scan


class SpareFiles:
    """A bounded pool of regular files to write over; safe to call from any thread."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory = Path(directory)
        self.max_bytes = max(0, int(max_bytes))
        self._files: dict[Path, int] = {}  # path -> bytes
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._files)

    def keep(self, path: Path) -> bool:
        """Take ``path`` into the pool (renamed); False when it cannot be (the caller deletes it)."""
        if self.max_bytes == 0:
            return False
        try:
            info = os.lstat(path)
        except OSError:
            return False
        if not stat.S_ISREG(info.st_mode):
            return False
        size = info.st_size
        with self._lock:
            if len(self._files) >= MAX_FILES or self._bytes + size > self.max_bytes:
                return False
            if not _nobody_has_open(path):
                return False
            dest = self.directory / f"spare-{uuid.uuid4().hex}"
            try:
                self.directory.mkdir(exist_ok=True)
                os.replace(path, dest)
            except OSError:
                return False
            self._files[dest] = size
            self._bytes += size
            return True

    def take(self, dest: Path, size: int) -> bool:
        """Rename the best spare for a file of about ``size`` bytes to ``dest``; False when there is none.

        Best: the smallest that holds ``size`` (no new pages at all), else the largest.
        The caller opens ``dest`` for writing without truncating, writes, then truncates.
        """
        with self._lock:
            if not self._files:
                return False
            fitting = [p for p, n in self._files.items() if n >= size]
            chosen = min(fitting, key=self._files.get) if fitting else max(self._files, key=self._files.get)
            self._bytes -= self._files.pop(chosen)
            try:
                os.replace(chosen, dest)
            except OSError:  # removed from outside: write a new file
                return False
            return True

    def release(self, nbytes: int) -> int:
        """Delete spares until ``nbytes`` are freed (or none is left); the bytes freed."""
        freed = 0
        with self._lock:
            while freed < nbytes and self._files:
                path = max(self._files, key=self._files.get)
                size = self._files.pop(path)
                self._bytes -= size
                freed += size
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("storage: cannot remove spare file %s: %s", path, exc)
        return freed


def _nobody_has_open(path: Path) -> bool:
    """Whether no descriptor but ours has ``path`` open: Linux grants a write lease only then."""
    if fcntl is None or not hasattr(fcntl, "F_SETLEASE"):  # leases are Linux's: elsewhere, keep nothing
        return False
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if not os.path.samestat(os.fstat(fd), os.lstat(path)):
            return False
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return True
    except OSError as exc:  # EAGAIN: open elsewhere; EINVAL: no leases on this filesystem
        if exc.errno not in (errno.EAGAIN, errno.EBUSY, errno.EINVAL, errno.ENOLCK):
            log.debug("storage: no lease on %s: %s", path, exc)
        return False
    finally:
        os.close(fd)
