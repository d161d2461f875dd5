"""``capture-server --tp N``: one model sharded over N ranks with transformers' tensor parallelism.

How it runs:

- ``capture-server --tp N`` outside ``torchrun`` starts N copies of itself with torch's own launcher
  (``torch.distributed.run``, the code behind ``torchrun``: ``--standalone``, no restarts). Run by
  hand under ``torchrun`` (``WORLD_SIZE`` set), the same command is one rank of a group that may span
  nodes; ``--tp`` must then equal ``WORLD_SIZE``.
- Every rank loads the model with ``from_pretrained(..., tp_plan="auto")`` (NCCL on GPUs, gloo on
  CPU). Rank 0 serves HTTP; the others run ``follow`` and do nothing but what rank 0 tells them.
- Lockstep: rank 0's model worker hands each batch to ``LockstepModel.generate_batch``, which
  broadcasts the batch's job spec (the requests' ids, parameters and savepoints; a sampled request
  without a seed gets one here, so every rank draws the same tokens) over a gloo control group, and
  then every rank runs the same nnsight trace. nnsight gathers sharded values whole before a
  savepoint sees them, so rank 0's captures are whole tensors; only rank 0 stores them.
- Liveness: while idle, rank 0 pings the group every ``HEARTBEAT_S`` and waits for every rank at a
  monitored barrier; a failed ping, broadcast or generation collective makes /health 503 ("failed")
  and stops the server (the launcher then stops the other ranks). A follower that hears nothing for
  ``liveness_timeout_s()`` exits (the control group's timeout). Under ``torch.distributed.run`` a rank
  that dies stops the whole group at once.

Turned off under TP (said in the start-up log and in ``/health``'s ``layout.disabled``):
- cancelling a generation mid-way (a client that hangs up): a row that stopped on rank 0 only would
  end the ranks' generate at different steps, and their collectives would no longer match. Queued
  requests of a client that left are still dropped before they start.
- ``POST /models/load`` of another model (403, the protocol's answer to a load a rule forbids): every
  rank would have to load it in lockstep; serve it with a server of its own.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import replace
from datetime import timedelta

from .errors import Forbidden, Unprocessable
from .registry import ModelRegistry
from .settings import Settings
from .types import GenerationRequest

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0  # an idle rank 0 pings the group this often
# The model's own collectives wait this long each, and so does the ranks' first meeting after loading
# (a hand-run group's ranks start and load at their own pace).
COLLECTIVE_TIMEOUT_S = 600.0
DISABLED = {
    "mid_generation_cancellation": (
        "a client that hangs up no longer stops its running generation: a row stopped on rank 0 only would "
        "end the ranks' generate at different steps and their collectives would no longer match (queued "
        "requests of a client that left are still dropped)"),
    "models_load": ("POST /models/load of another model is 403: every rank would have to load it in lockstep; "
                    "serve it with a server of its own"),
}
# Parallel styles whose module output nnsight 0.8.1 cannot gather: a vocabulary-parallel embedding's
# value carries a single-use _MaskPartial, and parking on it fails inside torch with a bare AssertionError
# (nnsight.modeling.tp.fragments says so). Such a savepoint is served from a site that holds the same tensor.
UNGATHERABLE_OUTPUTS = ("embedding_rowwise",)


def liveness_timeout_s() -> float:
    """How long a ping waits for every rank, and a follower for rank 0 (``CAPTURE_TP_TIMEOUT_S``, default 30)."""
    return float(os.environ.get("CAPTURE_TP_TIMEOUT_S", "30"))


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


# -- the nnsight / transformers compatibility shim ----------------------------------------

def ensure_tp_compat() -> None:
    """nnsight 0.8.1 imports ``_get_parameter_plan`` from ``transformers.distributed.tensor_parallel``;
    transformers 5.24 moved it to ``transformers.distributed.parallel_utils`` (an ImportError on every
    rank at the first trace). Put it back where nnsight looks, only when it is missing there."""
    import transformers.distributed.tensor_parallel as tensor_parallel

    if hasattr(tensor_parallel, "_get_parameter_plan"):
        return
    from transformers.distributed import parallel_utils

    tensor_parallel._get_parameter_plan = parallel_utils._get_parameter_plan


# -- the launcher ---------------------------------------------------------------------------

def launch(tp: int, argv: list[str]) -> None:
    """Start ``tp`` ranks of ``capture-server argv`` with torch.distributed.run on this host."""
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = run.parse_args([
        "--standalone", f"--nproc-per-node={tp}", "--max-restarts=0", "--monitor-interval=0.5",
        "--module", "capture_conformance.reference_server", *argv,
    ])
    try:
        run.run(args)
    except SignalException as exc:
        # Asked to stop (SIGTERM, Ctrl-C): the launcher has stopped the ranks; a stop, not a failure.
        log.info("stopped by %s", exc.sigval.name)
    except ChildFailedError as exc:
        failures = ", ".join(f"rank {rank} (exit code {f.exitcode})" for rank, f in sorted(exc.failures.items()))
        raise SystemExit(f"capture-server: tensor-parallel group stopped: {failures} failed") from None


# -- rank setup -------------------------------------------------------------------------------

def _device(requested: str) -> str:
    """transformers places each rank's shard on the accelerator (cuda:LOCAL_RANK), else the CPU: --device must agree."""
    import torch

    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if requested not in ("auto", accelerator):
        raise SystemExit(f"capture-server: --device {requested} under --tp: transformers' tensor parallelism "
                         f"places the shards on this machine's accelerator ({accelerator}); use --device auto")
    return accelerator


def _init_group(device: str):
    """The default process group (the model's collectives) and a gloo group for rank 0's job specs."""
    import torch
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    # gloo's send waits for the receiver: the control group's timeout bounds every job broadcast and ping.
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=liveness_timeout_s()))


def _load(settings: Settings, model_id: str, device: str):
    ensure_tp_compat()
    from capture_conformance.fixtures.tiny_model import resolve_model_path

    from .nnsight_core import CaptureModel

    model = CaptureModel.load(model_id, resolve_model_path(model_id), device=device, dtype=settings.dtype,
                              tp_plan="auto")
    # Only nnsight gathers a sharded value whole; a plain forward hook (the solo fast path) would
    # store this rank's piece: a column-parallel projection's half width.
    if hasattr(model, "fast_path"):
        model.fast_path = False
    model.tp_stand_ins = _stand_ins(model)  # a forward on every rank: its collectives must match
    return model


def _stand_ins(model) -> dict:
    """(module path, "output") of an ungatherable site -> a later site that holds the very same tensor,
    or None where none does; found by one hooked forward (hooks see the finished, whole values)."""
    import torch
    from transformers.distributed.tensor_parallel import _get_parameter_plan

    module = model._module  # the transformers model under the nnsight wrapper
    plan = getattr(module, "tp_plan", None) or {}
    bad = [name for name, _ in module.named_modules()
           if name and (name, "output") in model.sites
           and _get_parameter_plan(name, plan, is_weight=False) in UNGATHERABLE_OUTPUTS]
    if not bad:
        return {}
    values: dict = {}

    def record(key, value) -> None:
        while isinstance(value, (tuple, list)) and value:
            value = value[0]
        if torch.is_tensor(value) and key not in values:
            values[key] = value.detach().clone()

    handles = []
    for name, sub in module.named_modules():
        handles.append(sub.register_forward_pre_hook(
            lambda mod, args, kwargs, n=name: record((n, "input"), args[0] if args else None), with_kwargs=True))
        handles.append(sub.register_forward_hook(lambda mod, args, out, n=name: record((n, "output"), out)))
    try:
        ids = torch.arange(1, 8, dtype=torch.long, device=model.device).reshape(1, 7)
        with torch.inference_mode():
            module(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    found = {}
    for name in bad:
        site, want = model.sites[(name, "output")], values.get((name, "output"))
        # The first block's input where it is the same tensor (the plainest name for it), else the earliest.
        first_block = f"{getattr(model, 'block_stack', None)}.0"
        later = sorted((s for s in model.sites.values() if s.rank > site.rank),
                       key=lambda s: (s.module_path != first_block, s.rank))
        found[(name, "output")] = next(
            (s for s in later if want is not None and (v := values.get((s.module_path, s.io))) is not None
             and v.shape == want.shape and torch.equal(v, want)), None)
    return found


def _meet(device: str) -> list[str]:
    """Every rank's device, in rank order: the ranks' first meeting after loading, on the default group
    (its timeout allows for ranks that load at different speeds; the control group's is short)."""
    import torch.distributed as dist

    here = [None] * dist.get_world_size()
    dist.all_gather_object(here, (socket.gethostname(), device))
    hosts = {host for host, _ in here}
    return [f"{host}/{dev}" if len(hosts) > 1 else dev for host, dev in here]


# -- rank 0 ------------------------------------------------------------------------------------

class GroupFailed(RuntimeError):
    """The tensor-parallel group cannot go on (a rank died, hangs, or the ranks diverged)."""


class LockstepModel:
    """Rank 0's model: every batch is broadcast to the other ranks, then generated by all of them.

    Everything else (tokenizer, savepoints, sizes) is the wrapped CaptureModel's.
    """

    def __init__(self, inner, control, layout: dict, on_failure):
        import torch.distributed as dist

        self._inner = inner
        self._control = control
        self._dist = dist
        self.layout = layout
        self._on_failure = on_failure
        self._lock = threading.Lock()  # one use of the control group at a time: the worker's jobs, the pings
        self._last_contact = time.monotonic()
        self.failed: str | None = None
        threading.Thread(target=self._heartbeat, name="tp-heartbeat", daemon=True).start()

    def __getattr__(self, name):
        if name == "_inner":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self._inner, name)

    def site(self, selector):
        found = self._inner.site(selector)
        key = (found.module_path, found.io)
        stand_ins = getattr(self._inner, "tp_stand_ins", {})
        if key not in stand_ins:
            return found
        if stand_ins[key] is None:
            raise Unprocessable(f"selector {selector.text!r} cannot be captured under --tp: nnsight 0.8.1 cannot "
                                "gather a vocabulary-parallel embedding's output, and no later module takes it as is")
        return stand_ins[key]  # the same tensor, at a site nnsight can gather

    def _send(self, job) -> None:
        self._dist.broadcast_object_list([job], src=0, group=self._control)

    def _ping(self) -> None:
        self._send(("ping",))
        # Two-way: a broadcast completes into a dead or stopped peer's socket buffer; a barrier does not.
        self._dist.monitored_barrier(group=self._control, timeout=timedelta(seconds=liveness_timeout_s()))
        self._last_contact = time.monotonic()

    def _fail(self, why: str, exc: BaseException | None = None) -> None:
        if self.failed is None:
            self.failed = f"{why}: {exc}" if exc is not None else why
            log.error("tensor-parallel group failed, stopping: %s", self.failed)
            self._on_failure(self.failed)

    def generate_batch(self, requests: list[GenerationRequest]):
        if self.failed is not None:
            raise GroupFailed(self.failed)
        # The same generation on every rank: no client's event may stop rank 0 alone (cancellation is off),
        # and an unseeded sample gets its seed here, where every rank can be told it.
        requests = [replace(r, params=_seeded(r.params), cancelled=threading.Event()) for r in requests]
        specs = [_spec(r) for r in requests]
        with self._lock:
            try:
                self._send(("generate", specs))
            except Exception as exc:
                self._fail("broadcasting a batch to the other ranks failed", exc)
                raise GroupFailed(self.failed) from exc
            try:
                return self._inner.generate_batch(requests)
            except Exception:
                # The same request fails the same way on every rank; anything else (a dead peer, ranks out
                # of step) shows as a ping that does not come back.
                try:
                    self._ping()
                except Exception as exc:
                    self._fail("a rank did not answer after a failed generation", exc)
                raise
            finally:
                self._last_contact = time.monotonic()

    def _heartbeat(self) -> None:
        while self.failed is None:
            time.sleep(HEARTBEAT_S / 4)
            if time.monotonic() - self._last_contact < HEARTBEAT_S:
                continue
            with self._lock:
                if self.failed is not None:
                    return
                try:
                    self._ping()
                except Exception as exc:
                    self._fail("a rank did not answer the heartbeat", exc)

    def stop_group(self) -> None:
        """Tell the other ranks to exit (the server is stopping)."""
        with self._lock:
            if self.failed is None:
                self.failed = "stopped"
                try:
                    self._send(("stop",))
                except Exception:  # already gone: nothing to tell
                    pass


def _seeded(params):
    if params.temperature > 0 and params.seed is None:
        return replace(params, seed=int.from_bytes(os.urandom(7), "little"))
    return params


def _spec(request: GenerationRequest) -> dict:
    """What another rank needs to run the same generation (no callbacks, no events: those stay on rank 0)."""
    return {"prompt_ids": request.prompt_ids, "params": request.params, "savepoints": request.savepoints,
            "tokens": request.tokens, "capture_dtype": request.capture_dtype, "positions": request.positions,
            # Streaming changes nothing the model computes, but keep the flag: the batch key reads it.
            "streams": request.on_token is not None}


def _request(spec: dict) -> GenerationRequest:
    spec = dict(spec)
    streams = spec.pop("streams")
    return GenerationRequest(**spec, on_token=(lambda _token: None) if streams else None)


class TensorParallelRegistry(ModelRegistry):
    """The registry of a TP server: its one model loaded on every rank; loading another is 403."""

    def __init__(self, settings: Settings, control, device: str, on_failure):
        super().__init__(device=device, dtype=settings.dtype, max_batch=settings.max_batch,
                         max_batch_tokens=settings.max_batch_tokens, max_loaded=1)
        self._settings = settings
        self._control = control
        self._on_failure = on_failure
        self.lockstep: LockstepModel | None = None

    def _load(self, model_id: str, device: str, dtype: str):
        import torch.distributed as dist

        inner = _load(self._settings, model_id, device)
        devices = _meet(str(inner.device))
        layout = {"tp_size": dist.get_world_size(), "backend": dist.get_backend(), "devices": devices,
                  "disabled": DISABLED}
        self.lockstep = LockstepModel(inner, self._control, layout, self._on_failure)
        log.info("tensor parallel: %d ranks, backend %s, devices %s", layout["tp_size"], layout["backend"], devices)
        for what, why in DISABLED.items():
            log.warning("tensor parallel turns off %s: %s", what, why)
        for (path, io), stand_in in getattr(inner, "tp_stand_ins", {}).items():
            log.info("tensor parallel: %s.%s is served from %s.%s, the same tensor (nnsight 0.8.1 cannot gather a "
                     "vocabulary-parallel embedding's output)%s", path, io, *(
                         (stand_in.module_path, stand_in.io, "") if stand_in else ("-", "-", ": refused, 422")))
        return self.lockstep

    def load(self, model_id: str, device: str | None = None, dtype: str | None = None) -> bool:
        if self.ids():
            if self.loaded_id(model_id) is not None:
                return False
            raise Forbidden(f"this tensor-parallel server (--tp {self.lockstep.layout['tp_size']}) serves only its "
                           f"startup model {self.ids()[0]!r}: loading {model_id!r} would need every rank to load "
                           "it in lockstep; serve it with a server of its own")
        return super().load(model_id, device, dtype)

    def layout(self) -> dict:
        if self.lockstep is not None:
            return self.lockstep.layout
        return super().layout()


# -- the ranks ---------------------------------------------------------------------------------

def serve_rank(settings: Settings, tp: int, serve) -> None:
    """This process's part of a TP server (under torch.distributed.run or torchrun)."""
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    if tp != world:
        raise SystemExit(f"capture-server: --tp {tp} but torchrun started {world} ranks (WORLD_SIZE): they must agree")
    if not settings.model:
        raise SystemExit("capture-server: --tp needs a startup model (--model): every rank loads it at start")
    device = _device(settings.device)
    control = _init_group(device)
    if rank == 0:
        _serve_rank0(settings, control, device, serve)
    else:
        follow(settings, control, device, rank)


def _serve_rank0(settings: Settings, control, device: str, serve) -> None:
    from .app import create_app

    stop: dict = {}

    def on_failure(reason: str) -> None:
        app = stop.get("app")
        if app is not None:  # /health says why until the process is gone
            app.state.readiness.failure = f"tensor-parallel group failed: {reason}"
            app.state.readiness.ready.clear()
        if "stop" in stop:
            stop["stop"](reason)

    registry = TensorParallelRegistry(settings, control, device, on_failure)

    def factory(settings: Settings, on_startup_failure=None):
        stop["stop"] = on_startup_failure or (lambda reason: None)
        stop["app"] = create_app(settings, registry=registry, on_startup_failure=on_startup_failure)
        return stop["app"]

    try:
        serve(settings, app_factory=factory)
    except SystemExit:
        lockstep = registry.lockstep
        if lockstep is not None and lockstep.failed not in (None, "stopped"):
            raise SystemExit(f"capture-server: tensor-parallel group failed: {lockstep.failed}") from None
        raise
    finally:
        registry.shutdown()
        if registry.lockstep is not None:
            registry.lockstep.stop_group()


def follow(settings: Settings, control, device: str, rank: int) -> None:
    """A rank other than 0: load the model, then run every job rank 0 broadcasts, until told to stop."""
    import torch.distributed as dist

    logging.basicConfig(level=settings.log_level.upper(), format=f"%(asctime)s %(levelname)s rank {rank}: %(message)s")
    model = _load(settings, settings.model, device)
    _meet(str(model.device))
    while True:
        box = [None]
        try:
            # Rank 0 pings every HEARTBEAT_S while idle: silence past the control group's timeout means it is gone.
            dist.broadcast_object_list(box, src=0, group=control)
        except Exception as exc:
            raise SystemExit(f"capture-server rank {rank}: lost rank 0: {exc}") from None
        job = box[0]
        if job[0] == "stop":
            return
        if job[0] == "ping":
            dist.monitored_barrier(group=control, timeout=timedelta(seconds=liveness_timeout_s()))
            continue
        try:
            model.generate_batch([_request(spec) for spec in job[1]])
        except Exception as exc:  # rank 0 met the same error and answers it; its ping follows
            log.info("a generation failed here too: %s", exc)


def main(tp: int, argv: list[str], settings: Settings, serve) -> None:
    """The CLI's way in: launch the ranks, or be one of them. ``serve`` is ``cli.serve`` (rank 0's HTTP server)."""
    if under_torchrun():
        serve_rank(settings, tp, serve)
    else:
        launch(tp, argv)

