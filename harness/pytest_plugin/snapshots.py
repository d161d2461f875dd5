"""Shape snapshots as regression tests, the way Jest does them: recorded on the first run, compared after.

A snapshot holds tensor METADATA only: per savepoint its name, selector,
``tokens``, format, dtype and shape, the shape both concrete (``[1, 5, 151936]``)
and symbolic (``[1, "N", "V"]``, each size named after what it equals: ``N``
generated tokens, ``V`` vocabulary, ``H`` hidden, ``I`` intermediate). The
selector is written by role where the model's layout tells it (``{blocks}[0]``,
``{head}``): a snapshot names no module, and a server that echoes a path outside
the model's block stack still shows as a change. Never
values, token ids, run ids, timestamps or paths, so a set recorded on one host
matches every correct server running the same model.

Layout: ``<root>/<model-slug>/<test file>/<test name>.json``, one directory per
model, because the concrete sizes belong to the model.

Where sets live: ``--snapshot-dir`` if given (read and written there); else
``./capture-snapshots`` in the working directory, never inside the installed
package. The set shipped with the suites (``suites/__snapshots__``: every built-in
model of the bundled server, ``tiny-qwen3`` and the zoo's families, recorded against
it and reviewed against each model's config) is read when the working directory
has none for that test.

What a run does with one snapshot test (the contract checks of the same test
have already run; a snapshot only tells whether the metadata CHANGED):

- no snapshot yet: record it and pass; the report lists it as "recorded";
- ``--ci`` or ``CI=true`` and no snapshot: fail (CI must not invent its baseline);
- ``--snapshot-update``: rewrite it ("updated");
- a snapshot that differs: fail with a diff of the two.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from capture_conformance.harness.protocol.responses import Completion

SHIPPED_ROOT = Path(__file__).resolve().parent.parent.parent / "suites" / "__snapshots__"
DEFAULT_DIR_NAME = "capture-snapshots"
USER_PROPERTY = "capture_snapshot"
CI_TRUE = ("1", "true", "yes")


def model_slug(model_id: str) -> str:
    """A directory name for a model id: ``Qwen/Qwen3-0.6B`` -> ``qwen--qwen3-0.6b``."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", model_id.lower().replace("/", "--")).strip("-.")
    return slug or "model"


def ci_from_env(environ: dict | None = None) -> bool:
    """``CI=true`` (as GitHub Actions, GitLab and most CI systems set it)."""
    return (environ if environ is not None else os.environ).get("CI", "").strip().lower() in CI_TRUE


def snapshot_name(node: pytest.Item) -> str:
    """The test's name without the host of a fleet run: every host of a fleet compares with one snapshot."""
    callspec = getattr(node, "callspec", None)
    host = callspec.params.get("capture_target") if callspec is not None else None
    if not isinstance(host, str):
        return node.name
    from capture_conformance.harness.pytest_plugin.options import host_label

    label = host_label(host)  # the id the plugin gives the host's parametrisation
    name = node.name
    for old, new in ((f"[{label}]", ""), (f"[{label}-", "["), (f"-{label}]", "]"), (f"-{label}-", "-")):
        if old in name:
            return name.replace(old, new, 1)
    return name


def default_root() -> Path:
    return Path.cwd() / DEFAULT_DIR_NAME


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


def capture_record(completion: "Completion", *, dims: dict[str, int], steps: int | None = None,
                   selector_role: Callable[[str], str] | None = None) -> dict[str, Any]:
    """The snapshot of one capture: metadata of every savepoint, nothing run-specific."""
    if steps is None:  # N from the ids where the response has them: usage is checked elsewhere, not here
        ids = completion.body.get("completion_token_ids")
        steps = len(ids) if isinstance(ids, list) and ids else completion.usage.completion_tokens
    record: dict[str, Any] = {}
    for name, meta in sorted(completion.meta.items()):
        tokens = meta.raw.get("tokens", "all")
        selector = meta.raw.get("selector")
        record[name] = {
            "selector": selector_role(selector) if selector_role and isinstance(selector, str) else selector,
            "tokens": tokens,
            "format": meta.raw.get("format"),
            "dtype": meta.raw.get("dtype"),
            "shape": meta.shape,
            "symbolic": symbolic_shape(meta.shape, steps=steps, tokens=tokens, dims=dims),
        }
    return {"generated_tokens": steps, "savepoints": record}


def render(record: dict) -> str:
    """The file format (the same bytes syrupy's JSON extension wrote for the shipped set)."""
    return json.dumps(record, indent=2, sort_keys=True) + "\n"


class ShapeSnapshot:
    """``shape_snapshot.check(completion)``: compare a capture's metadata with the model's set, or record it."""

    def __init__(self, *, node: pytest.Item, model_id: str, dims: dict[str, int], root: Path | None,
                 updating: bool, ci: bool, selector_role: Callable[[str], str] | None = None):
        self.node = node
        self.selector_role = selector_role
        self.model_id = model_id
        self.dims = dims
        self.explicit = root is not None
        self.root = Path(root) if root is not None else default_root()
        self.updating = updating
        self.ci = ci
        module = Path(str(node.path)).stem
        self.relative = Path(model_slug(model_id)) / module / f"{snapshot_name(node)}.json"

    @property
    def write_path(self) -> Path:
        return self.root / self.relative

    def read_path(self) -> Path | None:
        """The snapshot this test compares with: the working set first, then (by default) the shipped one."""
        candidates = [self.write_path] + ([] if self.explicit else [SHIPPED_ROOT / self.relative])
        return next((p for p in candidates if p.is_file()), None)

    def _mark(self, outcome: str, path: Path) -> None:
        self.node.user_properties.append((USER_PROPERTY, {"outcome": outcome, "path": str(path),
                                                          "model": self.model_id}))

    def check(self, completion: "Completion", *, steps: int | None = None) -> None:
        record = capture_record(completion, dims=self.dims, steps=steps, selector_role=self.selector_role)
        text = render(record)
        existing = self.read_path()
        if self.updating:
            self._write(text)
            self._mark("updated", self.write_path)
            return
        if existing is None:
            if self.ci:
                pytest.fail(
                    f"no shape snapshot for model {self.model_id!r} ({self.write_path} does not exist) and this is a "
                    f"CI run (--ci or CI=true), which never records one: record the set by a run without --ci, "
                    f"review and commit it, and point --snapshot-dir at it. Captured metadata: "
                    f"{json.dumps(record['savepoints'], sort_keys=True)}", pytrace=False)
            self._write(text)
            self._mark("recorded", self.write_path)
            return
        old = existing.read_text()
        try:
            same = json.loads(old) == record
        except ValueError:
            same = False
        if same:
            self._mark("compared", existing)
            return
        diff = "".join(difflib.unified_diff(old.splitlines(keepends=True), text.splitlines(keepends=True),
                                            fromfile=f"snapshot {existing}", tofile="this run"))
        pytest.fail(f"capture metadata of {self.model_id} differs from its snapshot (a regression, or an intended "
                    f"change to record with --snapshot-update):\n{diff}", pytrace=False)

    def _write(self, text: str) -> None:
        path = self.write_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)  # xdist workers may record side by side; never a half-written file
