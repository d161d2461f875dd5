"""A verified collection: what ``capture-collect`` records about each file, and the check of a run against it.

Every activation file a ``manifest.jsonl`` row references carries its ``size`` (bytes) and
``sha256``; every row carries ``settings_sha256``, the hash of the ``settings.json`` it was
collected under. ``settings.json`` is written once, with the first row: the run's settings,
the ``provenance`` block (model, weights, dtypes, servers, protocol, tool, conformance
verdict) and ``first_row`` (that row's id and files with their sizes and hashes). So a file
changed, truncated, swapped or removed after collection, a row edited, and a settings.json
rewritten are each found, and named by row (problem id) and file.

``verify_run(directory, level)`` returns the problems; ``capture-collect verify RUN`` prints
them and ``load_run`` refuses a run that has any (``RunVerificationError``). Levels:
``"sizes"`` checks that every file exists with its recorded size (cheap: no file is read),
``"full"`` hashes every file too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

SETTINGS_FILE = "settings.json"
MANIFEST_FILE = "manifest.jsonl"
FILES_DIR = "files"
LEVELS = ("sizes", "full")
_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_record(relative: str, data: bytes) -> dict:
    """What a row records about one file it wrote: where (relative to the run), how big, its hash."""
    return {"file": relative, "size": len(data), "sha256": sha256_bytes(data)}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a run: which row (problem id; None: the run itself), which file, what."""

    row: str | None
    file: str | None
    kind: str  # missing file, size mismatch, hash mismatch, row without files, settings mismatch, ...
    detail: str

    def line(self) -> str:
        where = f"row {self.row!r}" if self.row is not None else "run"
        return f"{where}: {self.file or '-'}: {self.kind}: {self.detail}"


class RunVerificationError(ValueError):
    """A run whose files or rows do not match what was recorded: ``problems`` lists each, ``rows`` the ids."""

    def __init__(self, directory: Path, problems: list[Problem]):
        self.directory = directory
        self.problems = problems
        self.rows = sorted({p.row for p in problems if p.row is not None})
        shown = "\n  ".join(p.line() for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{directory} fails verification ({len(problems)} problem"
                         f"{'s' if len(problems) != 1 else ''}; rows {self.rows}):\n  {shown}{more}\n"
                         "(capture-collect verify RUN lists them all; load_run(..., verify=False) loads anyway)")


def read_rows(directory: Path) -> tuple[list[dict], list[Problem]]:
    """The manifest's rows in order, and a problem for each line that does not parse (cut short?)."""
    manifest = directory / MANIFEST_FILE
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} does not exist: not a capture-collect output directory")
    rows, problems = [], []
    for number, line in enumerate(manifest.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "id" not in row:
                raise ValueError("not a row object with an id")
        except ValueError as exc:
            problems.append(Problem(None, f"{MANIFEST_FILE}:{number}", "unreadable row",
                                    f"{exc} (a line cut short by an interruption is redone by --resume)"))
            continue
        rows.append(row)
    return rows, problems


def read_settings(directory: Path) -> tuple[dict, bytes | None]:
    path = directory / SETTINGS_FILE
    if not path.is_file():
        return {}, None
    data = path.read_bytes()
    try:
        settings = json.loads(data)
    except ValueError:
        return {}, data
    return (settings if isinstance(settings, dict) else {}), data


def verify_rows(directory: Path, rows: list[dict], settings: dict, settings_bytes: bytes | None,
                level: str = "sizes", savepoints: list[str] | None = None) -> list[Problem]:
    """Each row against the settings and its files (``savepoints``: only those files; None: all)."""
    if level not in LEVELS:
        raise ValueError(f"verification level {level!r}: one of {LEVELS}")
    problems: list[Problem] = []
    if rows and settings_bytes is None:
        problems.append(Problem(None, SETTINGS_FILE, "settings mismatch",
                                "missing: the rows' settings cannot be checked"))
    elif settings_bytes is not None and not settings:
        problems.append(Problem(None, SETTINGS_FILE, "settings mismatch", "not a JSON object"))
    settings_hash = sha256_bytes(settings_bytes) if settings_bytes is not None else None
    first = settings.get("first_row") if isinstance(settings.get("first_row"), dict) else None
    expected_names = sorted(first.get("files", {})) if first else None
    seen: set[str] = set()
    root = directory.resolve()
    for row in rows:
        rid = str(row["id"])
        if rid in seen:
            problems.append(Problem(rid, None, "duplicate row", "the id appears more than once in the manifest"))
        seen.add(rid)
        if settings_hash is not None and settings:
            recorded = row.get("settings_sha256")
            if recorded is None:
                problems.append(Problem(rid, SETTINGS_FILE, "settings mismatch",
                                        "the row records no settings_sha256 (collected before verified collections)"))
            elif recorded != settings_hash:
                problems.append(Problem(rid, SETTINGS_FILE, "settings mismatch",
                                        f"settings.json changed since the row was collected (sha256 {recorded[:12]}… "
                                        f"recorded, {settings_hash[:12]}… now)"))
            if settings.get("positions") is not None and row.get("positions") != settings["positions"]:
                problems.append(Problem(rid, None, "settings mismatch",
                                        f"positions {row.get('positions')!r}, the run's are {settings['positions']!r}"))
        activations = row.get("activations") if isinstance(row.get("activations"), dict) else {}
        if not activations:
            problems.append(Problem(rid, None, "row without files", "no activations recorded"))
            continue
        if expected_names is not None and sorted(activations) != expected_names:
            problems.append(Problem(rid, None, "settings mismatch",
                                    f"savepoints {sorted(activations)}, the run's first row has {expected_names}"))
        if first and first.get("id") == row["id"]:
            if {n: _recorded(e) for n, e in activations.items()} != first.get("files"):
                problems.append(Problem(rid, SETTINGS_FILE, "settings mismatch",
                                        "settings.json's first_row files differ from the manifest's row"))
        for name, entry in sorted(activations.items()):
            if savepoints is not None and name not in savepoints:
                continue
            if not isinstance(entry, dict) or "file" not in entry:
                problems.append(Problem(rid, None, "row without files",
                                        f"savepoint {name!r} has no downloaded file (--no-download?)"))
                continue
            if settings.get("dtype") and _dtype(entry.get("dtype")) not in (None, settings["dtype"]):
                problems.append(Problem(rid, entry["file"], "settings mismatch",
                                        f"dtype {entry.get('dtype')!r}, the run's is {settings['dtype']!r}"))
            problems.extend(check_file(directory, root, rid, entry, level))
    return problems


def _dtype(name: object) -> str | None:
    """``"torch.float32"`` (the metadata's spelling) -> ``"float32"`` (the --dtype spelling)."""
    return None if name is None else str(name).removeprefix("torch.")


def _recorded(entry: dict) -> dict:
    return {k: entry.get(k) for k in ("file", "size", "sha256")}


def check_file(directory: Path, root: Path, rid: str, entry: dict, level: str, data: bytes | None = None) -> list[Problem]:
    """One file against its record: present, inside the run, its size, and (``full`` or ``data`` given) its hash."""
    relative = str(entry["file"])
    path = directory / relative
    try:
        inside = path.resolve().is_relative_to(root)
    except OSError:
        inside = False
    if not inside:
        return [Problem(rid, relative, "file outside the run", "the path leaves the run directory")]
    if "size" not in entry or "sha256" not in entry:
        return [Problem(rid, relative, "no hash recorded",
                        "the row records no size/sha256 (collected before verified collections)")]
    if not path.is_file():
        return [Problem(rid, relative, "missing file", "not on disk")]
    size = len(data) if data is not None else path.stat().st_size
    if size != entry["size"]:
        return [Problem(rid, relative, "size mismatch", f"{size} bytes on disk, {entry['size']} recorded")]
    if data is not None or level == "full":
        digest = sha256_bytes(data) if data is not None else sha256_file(path)
        if digest != entry["sha256"]:
            return [Problem(rid, relative, "hash mismatch",
                            f"sha256 {digest[:12]}… on disk, {str(entry['sha256'])[:12]}… recorded")]
    return []


def unlisted_files(directory: Path, rows: list[dict]) -> list[Problem]:
    """Files under ``files/`` that no row references (left by a crash, or put there by hand)."""
    base = directory / FILES_DIR
    if not base.is_dir():
        return []
    listed = {str(e["file"]) for r in rows for e in (r.get("activations") or {}).values()
              if isinstance(e, dict) and "file" in e}
    return [Problem(None, rel, "unlisted file", "no row references it")
            for rel in sorted(str(p.relative_to(directory)) for p in base.rglob("*") if p.is_file())
            if rel not in listed]


def verify_run(directory: str | Path, level: str = "full") -> list[Problem]:
    """Every problem of the run at ``directory``: rows, settings, files (``level`` sizes or full), unlisted files."""
    directory = Path(directory)
    rows, problems = read_rows(directory)
    settings, settings_bytes = read_settings(directory)
    problems += verify_rows(directory, rows, settings, settings_bytes, level)
    problems += unlisted_files(directory, rows)
    return problems


def summary(directory: Path) -> dict:
    """Rows, files and bytes of a run, from its manifest (what ``verify`` reports when all is well)."""
    rows, _ = read_rows(directory)
    entries = [e for r in rows for e in (r.get("activations") or {}).values() if isinstance(e, dict) and "file" in e]
    return {"rows": len(rows), "files": len(entries), "bytes": sum(int(e.get("size") or 0) for e in entries)}
