"""Export a loaded collection run to what researchers load: Hugging Face ``datasets``, safetensors or NumPy shards.

Shards (``safetensors`` or ``numpy``): ``index.json`` plus ``shard-NNNNN.safetensors`` (or
``.npz``), each holding a run of consecutive rows. In a shard, savepoint ``S`` is stored as
``S`` (its rows' ``[T, D]`` float32 arrays concatenated along the first axis: ragged lengths
without padding) and ``S.offsets`` (int64, one more than the shard's rows: row ``i`` of the
shard is ``S[offsets[i]:offsets[i+1]]``). ``index.json`` holds the settings and provenance
of the run, the rows (manifest fields, the activation entries replaced by each savepoint's
length and the row's shard) and each shard's rows, size and sha256; ``read_shards`` checks
them. Neither format runs code when read (no pickle).

``datasets``: one row per problem, one ``ArrayND`` column per savepoint (first dimension
ragged), ``save_to_disk``-ed to the directory; the run's settings and provenance are in
``ds.info.description`` as JSON (``json.loads(ds.info.description)["settings"]["provenance"]``).

This module works on any object with ``rows``, ``arrays`` and ``settings`` (a
``dataset.CollectedRun``); ``dataset.load_export`` reads shards back into one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from capture_conformance.harness.tools.manifest import sha256_file

INDEX_FILE = "index.json"
FORMATS = ("datasets", "safetensors", "numpy")
EXPORT_VERSION = 1
DEFAULT_SHARD_BYTES = 512 << 20
ROW_COLUMNS = ("id", "prompt", "completion", "extracted_answer", "gold_answer", "correct",
               "prompt_token_ids", "completion_token_ids")


class ExportError(ValueError):
    """An export that cannot be written or read back as recorded."""


def source_of(run) -> dict:
    """Which run an export came from: its directory and the hashes of its manifest and settings."""
    directory = Path(run.directory)
    out = {"directory": str(directory.resolve())}
    for key, name in (("manifest_sha256", "manifest.jsonl"), ("settings_sha256", "settings.json")):
        path = directory / name
        out[key] = sha256_file(path) if path.is_file() else None
    return out


def export_run(run, to: str, out: str | Path, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    if to not in FORMATS:
        raise ExportError(f"export format {to!r}: one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty: choose another --out")
    if to == "datasets":
        dataset = to_datasets(run)
        dataset.save_to_disk(str(out))
        return out
    return write_shards(run, out, to, shard_bytes)


def _row_fields(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "activations"}


def write_shards(run, out: str | Path, tensor_format: str, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Shards of consecutive rows of at most ``shard_bytes`` each (a row is never split), and ``index.json``."""
    if tensor_format not in ("safetensors", "numpy"):
        raise ExportError(f"shard format {tensor_format!r}: safetensors or numpy")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(run.arrays)
    groups: list[list[int]] = [[]]
    size = 0
    for i in range(len(run.rows)):
        row_bytes = sum(run.arrays[n][i].nbytes for n in names)
        if groups[-1] and size + row_bytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += row_bytes
    suffix = "safetensors" if tensor_format == "safetensors" else "npz"
    shards, rows = [], []
    for number, members in enumerate(g for g in groups if g):
        tensors = {}
        for name in names:
            items = [np.ascontiguousarray(run.arrays[name][i], dtype=np.float32) for i in members]
            tensors[name] = np.concatenate(items, axis=0)
            tensors[f"{name}.offsets"] = np.cumsum([0] + [a.shape[0] for a in items], dtype=np.int64)
        path = out / f"shard-{number:05d}.{suffix}"
        if tensor_format == "safetensors":
            from safetensors.numpy import save_file

            save_file(tensors, str(path))
        else:
            with path.open("wb") as f:
                np.savez(f, **tensors)
        shards.append({"file": path.name, "rows": [members[0], members[-1] + 1],
                       "size": path.stat().st_size, "sha256": sha256_file(path)})
        for i in members:
            rows.append({**_row_fields(run.rows[i]), "shard": number,
                         "lengths": {n: int(run.arrays[n][i].shape[0]) for n in names}})
    index = {
        "format": "capture-collect export", "version": EXPORT_VERSION, "tensor_format": tensor_format,
        "layout": "in each shard, <savepoint> is its rows' arrays concatenated along axis 0 (float32) and "
                  "<savepoint>.offsets (int64) where each row starts: row i = <savepoint>[offsets[i]:offsets[i+1]]",
        "source": source_of(run), "settings": run.settings,
        "savepoints": {n: {"dims": list(run.arrays[n][0].shape[1:]) if run.arrays[n] else None, "dtype": "float32"}
                       for n in names},
        "shards": shards, "rows": rows,
    }
    (out / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    return out


def read_shards(directory: str | Path) -> tuple[dict, list[dict], dict[str, list[np.ndarray]]]:
    """``(index, rows, arrays)`` of a shard export; a shard whose size or sha256 differs is refused, named."""
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        raise ExportError(f"{index_path} does not exist: not a capture-collect shard export")
    index = json.loads(index_path.read_text())
    if index.get("format") != "capture-collect export" or index.get("version") != EXPORT_VERSION:
        raise ExportError(f"{index_path}: not a version-{EXPORT_VERSION} capture-collect export")
    names = list(index["savepoints"])
    arrays: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for shard in index["shards"]:
        path = directory / shard["file"]
        if not path.is_file():
            raise ExportError(f"{path}: shard missing (rows {shard['rows']})")
        if path.stat().st_size != shard["size"] or sha256_file(path) != shard["sha256"]:
            raise ExportError(f"{path}: shard differs from index.json's size/sha256 (rows {shard['rows']})")
        if index["tensor_format"] == "safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
        else:
            with np.load(path, allow_pickle=False) as npz:
                tensors = {k: npz[k] for k in npz.files}
        for name in names:
            values, offsets = tensors[name], tensors[f"{name}.offsets"]
            arrays[name] += [values[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    rows = [{k: v for k, v in r.items() if k not in ("shard", "lengths")} for r in index["rows"]]
    return index, rows, arrays


def to_datasets(run):
    """A Hugging Face ``datasets.Dataset``: one row per problem, one column per savepoint; provenance in its info."""
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("the datasets export needs the `datasets` package (pip install "
                          "'capture-conformance[export]'); the safetensors and numpy exports need nothing more") from exc
    columns: dict[str, list] = {}
    features = {}
    kinds = {"id": datasets.Value("string"), "prompt": datasets.Value("string"),
             "completion": datasets.Value("string"), "extracted_answer": datasets.Value("string"),
             "gold_answer": datasets.Value("string"), "correct": datasets.Value("bool"),
             "prompt_token_ids": datasets.Sequence(datasets.Value("int64")),
             "completion_token_ids": datasets.Sequence(datasets.Value("int64"))}
    for key in ROW_COLUMNS:
        columns[key] = [r.get(key) for r in run.rows]
        features[key] = kinds[key]
    array_types = {2: datasets.Array2D, 3: datasets.Array3D, 4: datasets.Array4D, 5: datasets.Array5D}
    for name, items in run.arrays.items():
        ndim = items[0].ndim if items else 2
        if ndim not in array_types:
            raise ExportError(f"savepoint {name!r}: [T, ...] arrays of {ndim} dimensions; datasets holds 2 to 5")
        features[name] = array_types[ndim](shape=(None, *items[0].shape[1:]) if items else (None, 0), dtype="float32")
        columns[name] = [np.asarray(a, dtype=np.float32) for a in items]
    description = json.dumps({"format": "capture-collect export", "version": EXPORT_VERSION,
                              "source": source_of(run), "settings": run.settings})
    info = datasets.DatasetInfo(description=description, features=datasets.Features(features))
    return datasets.Dataset.from_dict(columns, info=info)
