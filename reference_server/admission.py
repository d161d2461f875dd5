"""Admission against an in-flight capture budget.

``--max-capture-mb`` bounds one request; this bounds their sum. A capturing
request is admitted only while the worst-case host memory of every admitted,
unfinished capture stays within the budget; otherwise it is answered 503 with
``Retry-After`` at once (no queue: the client, or the ``openai`` SDK's own
retries, decide when to come back, and nothing waits inside the server holding
a connection). A reservation is held from admission until the capture's files
are written by the storage writer, so the tensors on the host and the files
waiting for the writer are both counted.

What a request is charged (issue 20: the files alone did not bound memory):

- its files, ``HOST_COPIES`` times (the per-step pieces and the stacked tensor);
- what the generate holds beyond the files: every step of every savepoint while
  it runs, whatever ``tokens`` keeps (a ``tokens: "first"`` of prompt positions
  holds the whole prompt's values until they are cut to one);
- the forward's whole-prompt logits when the output head is captured at prompt
  positions (``logits_to_keep=0``): prompt length x vocabulary x 4 bytes, float32
  whatever the capture's dtype. A batch pads every row to its longest prompt, so
  the worker batches such requests only while the padded logits stay within what
  its rows were charged, or what the budget can add for the batch
  (``Reservation.try_extend``); otherwise a request runs alone.
"""

from __future__ import annotations

import os
import threading

from .errors import Overloaded, Unprocessable

MIB = 2**20
# Worst-case host bytes per captured byte. On CPU the per-step pieces and the
# stacked tensor coexist while the capture is assembled, and safetensors
# serialises through one more in-memory copy of the stacked tensor; on CUDA the
# pieces live on the device and the host holds one copy. Two covers both.
HOST_COPIES = 2
DEFAULT_SHARE = 0.5  # of the memory available once the startup model is loaded, when --capture-budget-mb is not given
RETRY_AFTER_S = 1
LOGIT_ITEMSIZE = 4  # the forward's logits are float32 even for a bfloat16 capture (or model) on the host


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), else free physical pages; None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_budget_bytes() -> tuple[int, str]:
    """The budget when none is given, and how it was derived (for the startup log)."""
    available = available_memory_bytes()
    if available is None:
        return 4096 * MIB, "4096 MiB (available memory unknown)"
    budget = int(available * DEFAULT_SHARE)
    return budget, f"{DEFAULT_SHARE:.0%} of the {available / MIB:.0f} MiB of memory available"


class Reservation:
    """Budget held by one request, given back once the request is done with it *and* every held future is.

    ``release`` is idempotent, so every exit path may call it. ``hold(future)``
    keeps the budget past ``release`` until the future is done: a client that
    hangs up ends its response early, but the generation on the model's worker
    and the storage writer's write go on holding their tensors.
    """

    def __init__(self, budget: "CaptureBudget | None", nbytes: int, logits_bytes: int = 0):
        self._budget = budget
        self.nbytes = nbytes
        self.logits_bytes = logits_bytes  # of nbytes: the whole-prompt logits of its forward (ModelWorker batches by it)
        self._lock = threading.Lock()
        self._holds = 0
        self._released = False

    def hold(self, future) -> None:
        if self._budget is None:
            return
        with self._lock:
            self._holds += 1
        future.add_done_callback(self._drop_hold)  # asyncio or concurrent.futures: both call back once done

    def _drop_hold(self, _future) -> None:
        with self._lock:
            self._holds -= 1
        self._give_back()

    def release(self) -> None:
        with self._lock:
            self._released = True
        self._give_back()

    def try_extend(self, nbytes: int) -> bool:
        """Hold ``nbytes`` more (a batch's padding) if the budget has them now; False (nothing held) if not."""
        if nbytes <= 0:
            return True
        with self._lock:  # one step with _give_back's: an extension is never lost to a release racing it
            if self._budget is None or not self._budget._try_add(nbytes):
                return False
            self.nbytes += nbytes
            return True

    def _give_back(self) -> None:
        with self._lock:
            if not self._released or self._holds or self._budget is None:
                return
            budget, self._budget = self._budget, None
        budget._release(self.nbytes)

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


NO_RESERVATION = Reservation(None, 0)


class CaptureBudget:
    """The sum of worst-case host bytes of the captures in flight, against a limit."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = int(limit_bytes)
        self._lock = threading.Lock()
        self._in_use = 0
        self._in_flight = 0
        self._peak = 0
        self._admitted = 0
        self._refused = 0

    @staticmethod
    def charge(capture_bytes: int) -> int:
        """What a capture of ``capture_bytes`` (its files' size) holds of the budget."""
        return HOST_COPIES * capture_bytes

    def reserve(self, capture_bytes: int, held_bytes: int = 0, logits_bytes: int = 0) -> Reservation:
        """Admit a capture, or refuse it: 422 if it can never fit, else 503.

        ``capture_bytes``: its files; ``held_bytes``: what its generate keeps beyond them
        (steps that ``tokens`` drops later); ``logits_bytes``: its forward's whole-prompt logits.
        """
        if capture_bytes <= 0 and held_bytes <= 0 and logits_bytes <= 0:
            return NO_RESERVATION
        need = self.charge(capture_bytes) + held_bytes + logits_bytes
        if need > self.limit_bytes:
            parts = [f"{HOST_COPIES} x its {capture_bytes / MIB:.1f} MiB of files"]
            if held_bytes:
                parts.append(f"{held_bytes / MIB:.1f} MiB of steps held while generating")
            if logits_bytes:
                parts.append(f"{logits_bytes / MIB:.1f} MiB of whole-prompt float32 logits")
            raise Unprocessable(
                f"this capture could need {need / MIB:.1f} MiB of host memory ({' + '.join(parts)}), more than "
                f"the whole capture budget of {self.limit_bytes / MIB:.1f} MiB (--capture-budget-mb); ask for "
                "fewer tokens, savepoints, a shorter prompt or a smaller dtype")
        with self._lock:
            if self._in_use + need > self.limit_bytes:
                self._refused += 1
                in_use, flight = self._in_use, self._in_flight
            else:
                self._in_use += need
                self._in_flight += 1
                self._admitted += 1
                self._peak = max(self._peak, self._in_use)
                return Reservation(self, need, logits_bytes)
        raise Overloaded(
            f"capture budget busy: {flight} capture(s) in flight hold {in_use / MIB:.1f} of "
            f"{self.limit_bytes / MIB:.1f} MiB (--capture-budget-mb) and this one needs {need / MIB:.1f} MiB; "
            f"retry after {RETRY_AFTER_S} s", retry_after_s=RETRY_AFTER_S)

    def _try_add(self, nbytes: int) -> bool:
        """Add to what is in use if it fits now (a batch's padding, not a new capture)."""
        with self._lock:
            if self._in_use + nbytes > self.limit_bytes:
                return False
            self._in_use += nbytes
            self._peak = max(self._peak, self._in_use)
            return True

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self._in_use -= nbytes
            self._in_flight -= 1

    def snapshot(self) -> dict:
        """What /health reports."""
        with self._lock:
            return {
                "limit_mb": round(self.limit_bytes / MIB, 2),
                "in_use_mb": round(self._in_use / MIB, 2),
                "in_flight": self._in_flight,
                "peak_mb": round(self._peak / MIB, 2),
                "admitted": self._admitted,
                "refused": self._refused,
            }
