"""``capture-plot RUN``: a PNG of one run, per position; or of a whole collection run.

RUN is a directory holding a run's tensor files: a server storage run
(``<storage>/<run_id>/``, with ``manifest.json``) or one problem of a
``capture-collect`` output (``<out>/files/<id>/``). From the logits savepoint
(``_logits``, ``lm_head``, ``logits``, or one whose width is the model's
vocabulary) it plots the top-1 probability and the entropy at each position;
without one those two panels are not drawn (they cannot be computed from a
hidden layer). For every other savepoint, the L2 norm of its vector at each
position, a line per savepoint. Positions are aligned to the completion's
start: generated steps count from 0, prompt positions (``--positions prompt``)
count back from the prompt's end (-1 is its last token), and with ``--positions
sequence`` the prompt is negative, left of a marker where the completion starts
(0: the first completion token). The x axis is labelled with the tokens when the
model's tokenizer is available locally.

RUN may also be a whole ``capture-collect`` output directory (with
``manifest.jsonl``): then each hidden savepoint's norm per position is averaged
over the problems at that aligned position, with the spread (one standard
deviation) as a band, and a panel below shows how many problems each position
has (the mean of few is worth little). The PNG is written beside RUN, never in
it: ``<RUN>.png`` (a collection's problem: ``<collection>.<id>.png`` beside the
collection), or --out. Files are read with the harness's safe loaders (no pickle
code runs).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from capture_conformance.harness.protocol.tensors import load_tensor_file
from capture_conformance.harness.tools import help_text

LOGIT_NAMES = ("_logits", "logits", "lm_head", "lm_head.output")
MAX_TOKEN_LABELS = 48  # more labels than this are unreadable: the axis then shows positions


def load_run(run_dir: Path) -> dict[str, np.ndarray]:
    """Savepoint name -> float32 array ``[T, ...]`` (the batch dimension dropped)."""
    manifest = run_dir / "manifest.json"
    if manifest.exists():  # a server run: names come from its manifest
        files = {name: run_dir / entry["file"] for name, entry in json.loads(manifest.read_text())["files"].items()}
    else:
        files = {p.stem: p for p in sorted(run_dir.iterdir()) if p.suffix in (".pt", ".safetensors")}
    if not files:
        raise SystemExit(f"capture-plot: no tensor files in {run_dir}")
    arrays = {}
    for name, path in files.items():
        loaded = load_tensor_file(path.read_bytes(), what=str(path))
        values = loaded.values
        arrays[name] = values[0] if values.ndim >= 3 else values
    return arrays


@dataclass
class RunInfo:
    """What is known about a run's positions, from the collection manifest when there is one."""

    positions: str = "generated"
    prompt_ids: list[int] = field(default_factory=list)
    completion_ids: list[int] = field(default_factory=list)
    model: str | None = None
    selectors: dict[str, str] = field(default_factory=dict)  # file stem -> savepoint name


def run_info(run_dir: Path) -> RunInfo:
    info = RunInfo()
    manifest = run_dir / "manifest.json"
    if manifest.exists():  # a server run
        data = json.loads(manifest.read_text())
        info.completion_ids = list(data.get("completion_token_ids") or [])
        return info
    out = run_dir.parent.parent
    if run_dir.parent.name == "files" and (out / "manifest.jsonl").is_file():  # one problem of a collection
        settings = out / "settings.json"
        if settings.is_file():
            info.model = json.loads(settings.read_text()).get("model")
        for line in (out / "manifest.jsonl").read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            files = [Path(a.get("file", "")).parent.name for a in row.get("activations", {}).values()]
            if run_dir.name in files:
                info.positions = row.get("positions") or "generated"
                info.prompt_ids = list(row.get("prompt_token_ids") or [])
                info.completion_ids = list(row.get("completion_token_ids") or [])
                info.selectors = {Path(a["file"]).stem: name for name, a in row["activations"].items() if "file" in a}
                break
    return info


@dataclass
class PositionStatistics:
    """Per aligned position ``x``: the mean and (population) standard deviation over the series that have it, and
    how many do (NaN where none)."""

    x: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    count: np.ndarray


def aligned_statistics(series: list[np.ndarray], starts: list[int]) -> PositionStatistics:
    """Ragged 1-D ``series``, element ``j`` of series ``i`` at ``x = j - starts[i]``: mean, std, count per ``x``."""
    if not series:
        empty = np.zeros(0)
        return PositionStatistics(empty.astype(int), empty, empty, empty.astype(int))
    lows = [-s for s in starts]
    highs = [len(v) - s for v, s in zip(series, starts)]
    low, high = min(lows), max(highs)
    width = max(0, high - low)
    total = np.zeros(width)
    squares = np.zeros(width)
    count = np.zeros(width, dtype=int)
    for values, start in zip(series, starts):
        at = np.arange(len(values)) - start - low
        values = np.asarray(values, dtype=np.float64)
        np.add.at(total, at, values)
        np.add.at(count, at, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        for values, start in zip(series, starts):  # two passes: no cancellation in the variance
            at = np.arange(len(values)) - start - low
            np.add.at(squares, at, (np.asarray(values, dtype=np.float64) - mean[at]) ** 2)
        std = np.where(count > 0, np.sqrt(squares / np.maximum(count, 1)), np.nan)
    return PositionStatistics(np.arange(low, high), mean, std, count)


def completion_start(positions: str, length: int, prompt_length: int | None) -> int:
    """The index of a row's captured array that sits at ``x = 0`` (the completion's start)."""
    if positions == "prompt":
        return length  # the prompt's last token at -1
    if positions == "sequence":
        return prompt_length if prompt_length is not None else 0
    return 0  # generated: step 0 produced the first completion token


AXIS_LABELS = {
    "generated": "generated step (0: the pass that produced the first completion token)",
    "prompt": "prompt position from the prompt's end (-1: its last token)",
    "sequence": "position from the completion's start (negative: the prompt; 0: the first completion token)",
}


def _mark_completion(axes, x_min: float, x_max: float) -> None:
    """A line left of position 0 on every panel, labelled inside the top panel's frame."""
    for ax in axes:
        ax.axvline(-0.5, color="tab:red", linestyle="--", linewidth=1)
    right_side = x_max > x_min and (-0.5 - x_min) / (x_max - x_min) > 0.7
    axes[0].annotate("completion starts", (-0.5, 0.97), xycoords=("data", "axes fraction"),
                     xytext=(-4 if right_side else 4, 0), textcoords="offset points",
                     color="tab:red", fontsize="small", ha="right" if right_side else "left", va="top",
                     bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1})  # over the data


def default_output(run_dir: Path) -> Path:
    """Beside the run, never inside it: ``<run>.png``; a collection's problem: ``<collection>.<id>.png``."""
    run_dir = run_dir.resolve()
    collection = run_dir.parent.parent
    if run_dir.parent.name == "files" and (collection / "manifest.jsonl").is_file():
        return collection.parent / f"{collection.name}.{run_dir.name}.png"
    return run_dir.parent / f"{run_dir.name}.png"


def inside_collection_files(out: Path) -> Path | None:
    """The collection whose ``files/`` would hold ``out`` (a file there is one no row lists), or None."""
    for parent in out.resolve().parents:
        if parent.name == "files" and (parent.parent / "manifest.jsonl").is_file():
            return parent.parent
    return None


def token_statistics(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 probability and entropy (nats) per row of ``[T, V]`` logits."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=-1, keepdims=True)
    entropy = -(probs * np.log(np.clip(probs, 1e-300, None))).sum(axis=-1)
    return probs.max(axis=-1), entropy


def pick_logits(arrays: dict[str, np.ndarray], vocab_size: int | None = None) -> str | None:
    """The logits savepoint, or None: a hidden layer's vector is not a distribution over tokens."""
    for name in LOGIT_NAMES:
        if name in arrays:
            return name
    if vocab_size:
        wide = [n for n, a in arrays.items() if a.shape[-1] == vocab_size]
        if wide:
            return wide[0]
    return None


def _vocab_size(model: str | None) -> int | None:
    if not model:
        return None
    from capture_conformance.harness.protocol.ground_truth import locate_model_dir, read_model_config

    model_dir = locate_model_dir(model)
    return read_model_config(model_dir).get("vocab_size") if model_dir else None


def token_labels(info: RunInfo, length: int) -> list[str] | None:
    """The text of the token at each position (generated: the token each step produced), or None."""
    if length > MAX_TOKEN_LABELS or not info.model:
        return None
    ids = info.completion_ids if info.positions == "generated" else info.prompt_ids + info.completion_ids
    if len(ids) < length:
        return None
    from capture_conformance.harness.protocol.ground_truth import resolve_ground_truth

    tokenizer = resolve_ground_truth(info.model).tokenizer
    if tokenizer is None:
        return None
    return [repr(tokenizer.decode([i]))[1:-1] or "·" for i in ids[:length]]


def plot_run(run_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    arrays = load_run(run_dir)
    info = run_info(run_dir)
    logits_name = pick_logits(arrays, _vocab_size(info.model))
    if logits_name is None:
        print(f"capture-plot: {run_dir.name}: no logits savepoint, so no top-1 probability or entropy "
              "(they need logits); drawing the norms only", file=sys.stderr)
    others = {n: a for n, a in arrays.items() if n != logits_name}
    rows = (2 if logits_name else 0) + (1 if others else 0)
    fig, axes = plt.subplots(rows, 1, figsize=(max(9, min(24, 0.3 * _length(arrays))), 2.7 * rows + 0.5),
                             sharex=True, squeeze=False)
    axes = axes[:, 0]
    length = _length(arrays)
    kind = {"generated": "generated step", "prompt": "prompt position", "sequence": "position"}[info.positions]
    title = f"{run_dir.name}: {length} {kind}s"
    start = completion_start(info.positions, length, len(info.prompt_ids) if info.prompt_ids else None)
    panel = 0
    if logits_name:
        logits = arrays[logits_name]
        top1, entropy = token_statistics(logits.reshape(-1, logits.shape[-1]))
        steps = np.arange(len(top1)) - start
        axes[0].plot(steps, top1, marker="o")
        axes[0].set_ylabel("top-1 probability")
        axes[0].set_ylim(0, 1.05)
        axes[1].plot(steps, entropy, marker="o", color="tab:orange")
        axes[1].set_ylabel("entropy (nats)")
        title += f" ({logits_name})"
        panel = 2
    if others:
        for name, values in others.items():
            norms = np.linalg.norm(values.reshape(values.shape[0], -1), axis=-1)
            axes[panel].plot(np.arange(len(norms)) - start, norms, marker=".", label=info.selectors.get(name, name))
        axes[panel].set_ylabel("L2 norm")
        axes[panel].legend(fontsize="small")
    axes[0].set_title(title)
    if info.positions == "sequence" and info.prompt_ids and length > len(info.prompt_ids):
        _mark_completion(axes, -start, length - start - 1)  # position P holds the first completion token as input
    labels = token_labels(info, length)
    axes[-1].set_xlabel(AXIS_LABELS[info.positions])
    if labels:
        axes[-1].set_xticks(np.arange(length) - start)
        axes[-1].set_xticklabels(labels, rotation=90, fontsize="small")
    else:
        axes[-1].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _length(arrays: dict[str, np.ndarray]) -> int:
    return max(a.shape[0] for a in arrays.values())


def collection_statistics(run, name: str) -> PositionStatistics:
    """The norm of savepoint ``name`` per aligned position over a loaded collection's rows (what the plot draws)."""
    positions = run.settings.get("positions") or "generated"
    series, starts = [], []
    for row, values in zip(run.rows, run.arrays[name]):
        norms = np.linalg.norm(values.reshape(values.shape[0], -1).astype(np.float64), axis=-1)
        prompt = row.get("prompt_token_ids")
        series.append(norms)
        starts.append(completion_start(row.get("positions") or positions, len(norms),
                                       len(prompt) if prompt else (row.get("usage") or {}).get("prompt_tokens")))
    return aligned_statistics(series, starts)


def plot_collection(directory: Path, out: Path) -> Path:
    """Each hidden savepoint's norm per aligned position, averaged over the run's problems, with one std as a band,
    over a panel of how many problems each position has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from capture_conformance.harness.tools.dataset import load_run as load_collection

    run = load_collection(directory)
    vocab = _vocab_size(run.settings.get("model"))
    hidden = [n for n in run.savepoints if n not in LOGIT_NAMES and (vocab is None or run.arrays[n][0].shape[-1] != vocab)]
    if not hidden:
        raise SystemExit(f"capture-plot: {directory} holds no hidden-layer savepoint to draw norms of "
                         f"(savepoints: {run.savepoints})")
    positions = run.settings.get("positions", "generated")
    fig, (ax, counts_ax) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    stats = None
    for name in hidden:
        stats = collection_statistics(run, name)
        ax.plot(stats.x, stats.mean, label=name)
        ax.fill_between(stats.x, stats.mean - stats.std, stats.mean + stats.std, alpha=0.25)
    counts_ax.bar(stats.x, stats.count, width=0.9, color="tab:gray")  # the same rows for every savepoint
    counts_ax.set_ylabel("problems")
    counts_ax.set_ylim(0, len(run.rows) * 1.05)
    counts_ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    counts_ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    counts_ax.set_xlabel(AXIS_LABELS[positions])
    if positions == "sequence" and len(stats.x) and stats.x[0] < 0 <= stats.x[-1]:
        _mark_completion([ax, counts_ax], float(stats.x[0]), float(stats.x[-1]))
    ax.set_ylabel("L2 norm: mean ± 1 std")
    ax.set_title(f"{directory.name}: {len(run.rows)} problems, positions={positions}")
    ax.legend(fontsize="small", loc="lower left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="capture-plot", description=help_text.summary(__doc__))
    parser.add_argument("run", type=Path,
                        help="directory of one run's tensor files, or a whole capture-collect output directory")
    parser.add_argument("--out", type=Path,
                        help="PNG to write (default: beside RUN, RUN.png; for a collection's problem "
                             "files/ID: COLLECTION.ID.png beside the collection)")
    args = parser.parse_args(argv)
    if not args.run.is_dir():
        print(f"capture-plot: {args.run} is not a directory", file=sys.stderr)
        return 2
    out = args.out or default_output(args.run)
    collection = inside_collection_files(out)
    if collection is not None:
        print(f"capture-plot: {out} is inside {collection}'s files/, where it would be a file no row lists "
              "(capture-collect verify reports it): write it elsewhere", file=sys.stderr)
        return 2
    if (args.run / "manifest.jsonl").is_file():
        print(plot_collection(args.run, out))
    else:
        print(plot_run(args.run, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
