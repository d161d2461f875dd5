"""``capture-plot RUN``: a PNG of one run, per position; or of a whole collection run.

RUN is a directory holding a run's tensor files: a server storage run
(``<storage>/<run_id>/``, with ``manifest.json``) or one problem of a
``capture-collect`` output (``<out>/files/<id>/``). From the logits savepoint
(``_logits``, ``lm_head``, ``logits``, or one whose width is the model's
vocabulary) it plots the top-1 probability and the entropy at each position;
without one those two panels are not drawn (they cannot be computed from a
hidden layer). For every other savepoint, the L2 norm of its vector at each
position, a line per savepoint. Prompt positions (``--positions prompt`` or
``sequence`` collections) are drawn too, with a marker where the completion
starts; the x axis is labelled with the tokens when the model's tokenizer is
available locally.

RUN may also be a whole ``capture-collect`` output directory (with
``manifest.jsonl``): then each hidden savepoint's norm per position is averaged
over the problems (positions counted from the first), with the spread (one
standard deviation) as a band. Files are read with the harness's safe loaders
(no pickle code runs).
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
    kind = {"generated": "generated token", "prompt": "prompt position", "sequence": "position"}[info.positions]
    title = f"{run_dir.name}: {length} {kind}s"
    panel = 0
    if logits_name:
        logits = arrays[logits_name]
        top1, entropy = token_statistics(logits.reshape(-1, logits.shape[-1]))
        steps = np.arange(len(top1))
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
            axes[panel].plot(np.arange(len(norms)), norms, marker=".", label=info.selectors.get(name, name))
        axes[panel].set_ylabel("L2 norm")
        axes[panel].legend(fontsize="small")
    axes[0].set_title(title)
    if info.positions == "sequence" and info.prompt_ids and length > len(info.prompt_ids):
        for ax in axes:  # position P holds the first completion token as input
            ax.axvline(len(info.prompt_ids) - 0.5, color="tab:red", linestyle="--", linewidth=1)
        axes[0].annotate("completion starts", (len(info.prompt_ids) - 0.5, 1.0), xycoords=("data", "axes fraction"),
                         color="tab:red", fontsize="small", ha="left", va="top")
    labels = token_labels(info, length)
    if labels:
        axes[-1].set_xticks(np.arange(length))
        axes[-1].set_xticklabels(labels, rotation=90, fontsize="small")
        axes[-1].set_xlabel(kind + " (token)")
    else:
        axes[-1].set_xlabel(kind)
        axes[-1].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _length(arrays: dict[str, np.ndarray]) -> int:
    return max(a.shape[0] for a in arrays.values())


def plot_collection(directory: Path, out: Path) -> Path:
    """Each hidden savepoint's norm per position, averaged over the run's problems, with one std as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from capture_conformance.harness.tools.dataset import load_run as load_collection

    run = load_collection(directory)
    vocab = _vocab_size(run.settings.get("model"))
    hidden = [n for n in run.savepoints if n not in LOGIT_NAMES and (vocab is None or run.arrays[n][0].shape[-1] != vocab)]
    if not hidden:
        raise SystemExit(f"capture-plot: {directory} holds no hidden-layer savepoint to draw norms of "
                         f"(savepoints: {run.savepoints})")
    positions = run.settings.get("positions", "generated")
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name in hidden:
        values, mask = run.padded(name)
        norms = np.linalg.norm(values.reshape(*values.shape[:2], -1), axis=-1)
        counts = mask.sum(0)
        mean = np.where(counts > 0, (norms * mask).sum(0) / np.maximum(counts, 1), np.nan)
        spread = np.sqrt(np.where(counts > 0, (((norms - mean) ** 2) * mask).sum(0) / np.maximum(counts, 1), np.nan))
        x = np.arange(len(mean))
        ax.plot(x, mean, label=name)
        ax.fill_between(x, mean - spread, mean + spread, alpha=0.25)
    ax.set_xlabel({"generated": "generated token", "prompt": "prompt position",
                   "sequence": "position"}[positions] + " (from the first)")
    ax.set_ylabel("L2 norm: mean ± 1 std over problems")
    ax.set_title(f"{directory.name}: {len(run.rows)} problems, positions={positions}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="capture-plot", description=help_text.summary(__doc__))
    parser.add_argument("run", type=Path,
                        help="directory of one run's tensor files, or a whole capture-collect output directory")
    parser.add_argument("--out", type=Path, help="PNG to write (default: RUN/run.png)")
    args = parser.parse_args(argv)
    if not args.run.is_dir():
        print(f"capture-plot: {args.run} is not a directory", file=sys.stderr)
        return 2
    out = args.out or args.run / "run.png"
    if (args.run / "manifest.jsonl").is_file():
        print(plot_collection(args.run, out))
    else:
        print(plot_run(args.run, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
