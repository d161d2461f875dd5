"""Read a ``capture-collect`` output directory: from collection to a probe in a few lines.

    from capture_conformance.harness.tools.dataset import load_run
    run = load_run("runs/gsm")
    X, mask = run.padded("layer_0")            # [R, T_max, D] float32, [R, T_max] bool
    y = run.correct                            # [R] bool, aligned with the manifest rows

Files are read with the harness's safe loaders (no pickle code runs), bfloat16
included (numpy has no bfloat16: values are widened to float32). Rows whose
files are missing (``--no-download``) are refused with the row named.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from capture_conformance.harness.protocol.tensors import load_tensor_file


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

    def to_numpy(self, out_dir: str | Path) -> Path:
        """One ``.npz`` per savepoint (values, mask) plus ``rows.json``; returns the directory."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in self.arrays:
            values, mask = self.padded(name)
            np.savez(out / f"{_file_name(name)}.npz", values=values, mask=mask, ids=np.array(self.ids))
        (out / "rows.json").write_text(json.dumps({"settings": self.settings, "rows": self.rows}, indent=1))
        return out

    def to_datasets(self):
        """A Hugging Face ``datasets.Dataset``: one row per problem, one column per savepoint (``[T, D]`` lists)."""
        try:
            from datasets import Dataset
        except ImportError as exc:
            raise ImportError("to_datasets needs the `datasets` package (pip install datasets); "
                              "to_numpy needs nothing more") from exc
        columns = {"id": self.ids, "prompt": self.prompts, "completion": self.completions,
                   "answer": self.answers, "gold": self.gold, "correct": self.correct.tolist()}
        for name, items in self.arrays.items():
            columns[name] = [a.tolist() for a in items]
        return Dataset.from_dict(columns)


def load_run(directory: str | Path, savepoints: list[str] | None = None) -> CollectedRun:
    """Rows of ``manifest.jsonl`` in order, with each savepoint's array (batch dimension dropped)."""
    directory = Path(directory)
    manifest = directory / "manifest.jsonl"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} does not exist: not a capture-collect output directory")
    rows = []
    for line in manifest.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by an interruption
    settings_path = directory / "settings.json"
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    run = CollectedRun(directory, settings, rows)
    names = savepoints or (list(rows[0]["activations"]) if rows else [])
    for name in names:
        run.arrays[name] = []
        for row in rows:
            entry = row["activations"].get(name)
            if entry is None or "file" not in entry:
                raise ValueError(f"row {row['id']!r} has no downloaded file for savepoint {name!r}")
            path = directory / entry["file"]
            loaded = load_tensor_file(path.read_bytes(), what=str(path))
            values = loaded.values
            run.arrays[name].append(values[0] if values.ndim >= 3 else values)
    return run


def _file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
