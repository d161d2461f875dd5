"""Read a ``capture-collect`` output directory: from collection to a probe in a few lines.

    from capture_conformance.harness.tools.dataset import load_run
    run = load_run("runs/gsm")
    X, mask = run.padded("layer_0")            # [R, T_max, D] float32, [R, T_max] bool
    y = run.correct                            # [R] bool, aligned with the manifest rows
    run.to_datasets().save_to_disk("runs/gsm.hf")   # or run.to_safetensors(DIR), run.to_numpy(DIR)

Files are read with the harness's safe loaders (no pickle code runs), bfloat16
included (numpy has no bfloat16: values are widened to float32).

``load_run`` verifies the run by default (``harness/tools/manifest.py``, ``docs/collections.md``):
with ``verify="sizes"`` (the default) every file of every row must exist with the size the
row recorded, the rows must match ``settings.json``, and every file it *reads* (the
savepoints asked for) must match its recorded sha256 (those bytes are read anyway, so the
hash costs little next to parsing them); ``verify="full"`` hashes every file, the
savepoints not loaded too; ``verify=False`` checks nothing (an older run without hashes).
A tampered or incomplete run (a file changed, truncated, removed; a row without files;
settings.json rewritten) is refused with a ``RunVerificationError`` naming the rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from capture_conformance.harness.protocol.tensors import load_tensor_file
from capture_conformance.harness.tools.export import DEFAULT_SHARD_BYTES, read_shards, to_datasets, write_shards
from capture_conformance.harness.tools.manifest import (
    RunVerificationError,
    check_file,
    read_rows,
    read_settings,
    verify_rows,
)


@dataclass
class CollectedRun:
    """One collection run: per-row fields and, per savepoint, one ``[T, D]`` float32 array per row."""

    directory: Path
    settings: dict
    rows: list[dict]
    arrays: dict[str, list[np.ndarray]] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.rows]

    @property
    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.rows]

    @property
    def completions(self) -> list[str]:
        return [r["completion"] for r in self.rows]

    @property
    def answers(self) -> list[str | None]:
        """The extracted answers of the completions (``gold`` holds the dataset's)."""
        return [r["extracted_answer"] for r in self.rows]

    @property
    def gold(self) -> list[str | None]:
        return [r["gold_answer"] for r in self.rows]

    @property
    def correct(self) -> np.ndarray:
        return np.array([bool(r["correct"]) for r in self.rows])

    @property
    def savepoints(self) -> list[str]:
        return list(self.arrays)

    def _items(self, savepoint: str) -> list[np.ndarray]:
        try:
            return self.arrays[savepoint]
        except KeyError:
            raise KeyError(f"no savepoint {savepoint!r} in {self.directory}; it has {self.savepoints}") from None

    def padded(self, savepoint: str) -> tuple[np.ndarray, np.ndarray]:
        """``[R, T_max, D]`` zero-padded on the right, and the ``[R, T_max]`` mask of real positions."""
        items = self._items(savepoint)
        longest = max(a.shape[0] for a in items)
        out = np.zeros((len(items), longest, *items[0].shape[1:]), dtype=np.float32)
        mask = np.zeros((len(items), longest), dtype=bool)
        for row, values in enumerate(items):
            out[row, : values.shape[0]] = values
            mask[row, : values.shape[0]] = True
        return out, mask

    def last(self, savepoint: str) -> np.ndarray:
        """``[R, D]``: each row's last captured position (with ``--positions prompt``: the prompt's last token)."""
        return np.stack([a[-1] for a in self._items(savepoint)])

    def to_numpy(self, out_dir: str | Path, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
        """NumPy shards (``.npz``, ragged rows concatenated with offsets) and ``index.json``; see ``export``."""
        return write_shards(self, out_dir, "numpy", shard_bytes)

    def to_safetensors(self, out_dir: str | Path, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
        """safetensors shards and ``index.json``, as ``to_numpy``."""
        return write_shards(self, out_dir, "safetensors", shard_bytes)

    def to_datasets(self):
        """A Hugging Face ``datasets.Dataset``: one row per problem, one column per savepoint ([T, D] arrays),
        the settings and provenance as JSON in ``info.description`` (needs ``datasets``)."""
        return to_datasets(self)


def load_export(directory: str | Path) -> CollectedRun:
    """A safetensors or NumPy shard export read back (each shard checked against ``index.json``)."""
    index, rows, arrays = read_shards(directory)
    return CollectedRun(Path(directory), index["settings"], rows, arrays)


def load_run(directory: str | Path, savepoints: list[str] | None = None,
             verify: str | bool = "sizes") -> CollectedRun:
    """Rows of ``manifest.jsonl`` in order, with each savepoint's array (batch dimension dropped).

    ``verify``: ``"sizes"`` (default): every file exists with its recorded size, the rows match
    settings.json, and each file read matches its recorded sha256; ``"full"``: every file's
    sha256 too, also of savepoints not loaded; ``False``: no check. A run that fails is refused
    with ``RunVerificationError`` (a ``ValueError``) whose message and ``rows`` name the rows.
    A manifest line cut short by an interruption is skipped (that problem is not in the run).
    """
    directory = Path(directory)
    if verify not in ("sizes", "full", False):
        raise ValueError(f"verify={verify!r}: one of 'sizes', 'full', False")
    rows, _cut = read_rows(directory)
    settings, settings_bytes = read_settings(directory)
    if verify:
        problems = verify_rows(directory, rows, settings, settings_bytes, level=verify)
        if problems:
            raise RunVerificationError(directory, problems)
    run = CollectedRun(directory, settings, rows)
    names = savepoints or (list(rows[0]["activations"]) if rows else [])
    root = directory.resolve()
    problems = []
    for name in names:
        run.arrays[name] = []
        for row in rows:
            entry = row["activations"].get(name)
            if entry is None or "file" not in entry:
                raise ValueError(f"row {row['id']!r} has no downloaded file for savepoint {name!r}")
            path = directory / entry["file"]
            data = path.read_bytes()
            if verify == "sizes":  # "full" hashed every file already
                found = check_file(directory, root, str(row["id"]), entry, verify, data=data)
                if found:
                    problems += found
                    continue
            loaded = load_tensor_file(data, what=str(path))
            values = loaded.values
            run.arrays[name].append(values[0] if values.ndim >= 3 else values)
    if problems:
        raise RunVerificationError(directory, problems)
    return run
