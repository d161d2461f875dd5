"""``capture-plot RUN``: a PNG of one run, per generated token.

RUN is a directory holding a run's tensor files: a server storage run
(``<storage>/<run_id>/``, with ``manifest.json``) or one problem of a
``capture-collect`` output (``<out>/files/<id>/``). From the logits savepoint
(the one whose width is the vocabulary: ``_logits``, ``lm_head``, ``logits``
or the widest) it plots the top-1 probability and the entropy of each
generated token; for every other savepoint, the L2 norm of its vector at each
token. Files are read with the harness's safe loaders (no pickle code runs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .tensors import load_tensor_file

LOGIT_NAMES = ("_logits", "logits", "lm_head", "lm_head.output")


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


def token_statistics(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 probability and entropy (nats) per row of ``[T, V]`` logits."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=-1, keepdims=True)
    entropy = -(probs * np.log(np.clip(probs, 1e-300, None))).sum(axis=-1)
    return probs.max(axis=-1), entropy


def pick_logits(arrays: dict[str, np.ndarray]) -> str:
    for name in LOGIT_NAMES:
        if name in arrays:
            return name
    return max(arrays, key=lambda n: arrays[n].shape[-1])


def plot_run(run_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    arrays = load_run(run_dir)
    logits_name = pick_logits(arrays)
    top1, entropy = token_statistics(arrays[logits_name].reshape(-1, arrays[logits_name].shape[-1]))
    others = {n: a for n, a in arrays.items() if n != logits_name}
    fig, axes = plt.subplots(3 if others else 2, 1, figsize=(9, 8 if others else 5.5), sharex=True)
    steps = np.arange(len(top1))
    axes[0].plot(steps, top1, marker="o")
    axes[0].set_ylabel("top-1 probability")
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title(f"{run_dir.name}: {len(top1)} tokens ({logits_name})")
    axes[1].plot(steps, entropy, marker="o", color="tab:orange")
    axes[1].set_ylabel("entropy (nats)")
    if others:
        for name, values in others.items():
            norms = np.linalg.norm(values.reshape(values.shape[0], -1), axis=-1)
            axes[2].plot(np.arange(len(norms)), norms, marker=".", label=name)
        axes[2].set_ylabel("L2 norm")
        axes[2].legend(fontsize="small")
    axes[-1].set_xlabel("generated token")
    axes[-1].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="capture-plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="directory of one run's tensor files")
    parser.add_argument("--out", type=Path, help="PNG to write (default: RUN/run.png)")
    args = parser.parse_args(argv)
    if not args.run.is_dir():
        print(f"capture-plot: {args.run} is not a directory", file=sys.stderr)
        return 2
    print(plot_run(args.run, args.out or args.run / "run.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
