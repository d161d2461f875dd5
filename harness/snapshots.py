"""Shape snapshots: what a capture looks like, recorded once per model, compared on every run.

A snapshot holds tensor METADATA only: per savepoint its name, selector,
``tokens``, format, dtype and shape, the shape both concrete (``[1, 5, 151936]``)
and symbolic (``[1, "N", "V"]``, each size named after what it equals: ``N``
generated tokens, ``V`` vocabulary, ``H`` hidden, ``I`` intermediate). Never
values, token ids, run ids, timestamps or paths, so a set recorded on one host
matches every correct server running the same model.

Layout: ``<root>/<model-slug>/<test file>/<test name>.json``, root being the
suites' ``__snapshots__`` (or ``--snapshot-dir``). One directory per model,
because the concrete sizes belong to the model.

A model with no snapshot set FAILS the snapshot tests (never a silent pass):
the message says the set is missing, that the symbolic checks of the same test
already ran, and how to record one (``--snapshot-update``, after reviewing).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from syrupy.extensions.json import JSONSnapshotExtension

if TYPE_CHECKING:
    from syrupy.location import PyTestLocation

    from harness.responses import Completion

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "suites" / "__snapshots__"


def model_slug(model_id: str) -> str:
    """A directory name for a model id: ``Qwen/Qwen3-0.6B`` -> ``qwen--qwen3-0.6b``."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", model_id.lower().replace("/", "--")).strip("-.")
    return slug or "model"


class TensorMetaExtension(JSONSnapshotExtension):
    """JSON snapshots under a per-model directory. Configured by subclassing (see ``extension_for``)."""

    snapshot_root: Path = DEFAULT_ROOT
    model_dir_name: str = "model"

    @classmethod
    def dirname(cls, *, test_location: "PyTestLocation") -> str:
        return str(Path(cls.snapshot_root) / cls.model_dir_name / test_location.basename)


_EXTENSIONS: dict[tuple[str, str], type[TensorMetaExtension]] = {}


def extension_for(model_id: str, root: Path | None = None) -> type[TensorMetaExtension]:
    root = Path(root or DEFAULT_ROOT)
    key = (str(root), model_slug(model_id))
    if key not in _EXTENSIONS:  # one class per model, so syrupy's discovery sees a stable set
        _EXTENSIONS[key] = type(
            f"TensorMetaExtension_{len(_EXTENSIONS)}",
            (TensorMetaExtension,),
            {"snapshot_root": root, "model_dir_name": key[1]},
        )
    return _EXTENSIONS[key]


def symbolic_shape(shape: list[int], *, steps: int | None, tokens: str, dims: dict[str, int]) -> list[Any]:
    """Name each size after what it equals; a size that equals nothing known stays a number."""
    named: list[Any] = []
    for position, size in enumerate(shape):
        if position == 1 and tokens == "all" and steps is not None and size == steps:
            named.append("N")
            continue
        if position == len(shape) - 1 and position > 0:
            symbol = next((name for name, value in dims.items() if value == size), None)
            if symbol:
                named.append(symbol)
                continue
        named.append(size)
    return named


def capture_record(completion: "Completion", *, dims: dict[str, int]) -> dict[str, Any]:
    """The snapshot of one capture: metadata of every savepoint, nothing run-specific."""
    steps = completion.usage.completion_tokens
    record: dict[str, Any] = {}
    for name, meta in sorted(completion.meta.items()):
        tokens = meta.raw.get("tokens", "all")
        record[name] = {
            "selector": meta.raw.get("selector"),
            "tokens": tokens,
            "format": meta.raw.get("format"),
            "dtype": meta.raw.get("dtype"),
            "shape": meta.shape,
            "symbolic": symbolic_shape(meta.shape, steps=steps, tokens=tokens, dims=dims),
        }
    return {"generated_tokens": steps, "savepoints": record}


class ShapeSnapshot:
    """``shape_snapshot.check(completion)``: compare a capture's metadata with the model's set."""

    def __init__(self, snapshot: Any, model_id: str, root: Path, dims: dict[str, int], updating: bool):
        self._extension = extension_for(model_id, root)
        self._snapshot = snapshot.use_extension(self._extension)
        self.model_id = model_id
        self.model_dir = Path(root) / model_slug(model_id)
        self.dims = dims
        self.updating = updating

    def check(self, completion: "Completion") -> None:
        record = capture_record(completion, dims=self.dims)
        if not self.updating and not self.model_dir.is_dir():
            pytest.fail(
                f"no shape snapshot set for model {self.model_id!r} (expected in {self.model_dir}); the symbolic "
                f"shape checks of this test passed; review the captured metadata {record['savepoints']} and record "
                f"a set with --snapshot-update (see docs/harness.md)",
                pytrace=False,
            )
        assert self._snapshot == record, f"capture metadata differs from the recorded snapshot of {self.model_id}"
