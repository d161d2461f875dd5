"""``capture-savepoints MODEL``: which selectors a model has, by role, as the suites discover them.

MODEL is a built-in id (``tiny-gpt2``...), a local model directory, or a hub id
already in the local Hugging Face cache (nothing is downloaded); with ``--url``
the server's own ``capture.savepoints`` list is read instead (not independent).
The answer is the same one every suite and tool uses (``harness/protocol/layout.py``),
so what it prints is what ``capture-collect --layers`` and the suites will ask for.

    capture-savepoints tiny-gpt2
    capture-savepoints ~/models/pythia-160m --json
    capture-savepoints some-model --url http://127.0.0.1:8006
    capture-savepoints --markdown tiny-qwen3 tiny-gpt2 ...   (the table of docs/architectures.md)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from capture_conformance.harness.protocol.layout import Layout, discover_layout

if TYPE_CHECKING:
    from capture_conformance.harness.protocol.client import CaptureClient
from capture_conformance.harness.tools import help_text

ROLES = ("blocks", "attention", "mlp", "down_proj", "block_norm", "final_norm", "embeddings", "head")


def model_layout(model: str, client: "CaptureClient | None" = None, *, local: bool = True) -> Layout:
    """The tools' one way to a model's layout: its local copy (``local``), else ``client``'s server's list."""
    from capture_conformance.harness.protocol.ground_truth import locate_model_dir

    found = locate_model_dir(model) if local else None
    server_list = (lambda: client.listed_savepoints(model)) if client is not None else None
    return discover_layout(str(found) if found else None, server_list)


def layout_for(model: str, url: str | None = None, api_key: str | None = None) -> Layout:
    """The model's layout: from its local copy, or (with ``url``) from that server's list instead."""
    if url is None:
        return model_layout(model)
    from capture_conformance.harness.protocol.client import CaptureClient

    return model_layout(model, CaptureClient(url, api_key=api_key, timeout_s=30), local=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="capture-savepoints", description=help_text.summary(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=help_text.details(__doc__))
    parser.add_argument("model", nargs="+", help="built-in id, local model directory, or a hub id in the local cache")
    parser.add_argument("--url", help="read the server's capture.savepoints for MODEL instead (not independent)")
    parser.add_argument("--api-key", help="the server's key, with --url, if it has one")
    parser.add_argument("--json", action="store_true", help="the whole layout as JSON")
    parser.add_argument("--markdown", action="store_true", help="one Markdown table row per model")
    args = parser.parse_args(argv)
    layouts = {}
    for model in args.model:
        try:
            layouts[model] = layout_for(model, args.url, args.api_key)
        except LookupError as exc:
            print(f"capture-savepoints: {model}: {exc}", file=sys.stderr)
            return 2
    if args.json:
        described = {model: layout.describe() for model, layout in layouts.items()}
        print(json.dumps(described[args.model[0]] if len(described) == 1 else described, indent=2))
        return 0
    if args.markdown:
        print(markdown_header())
        for model, layout in layouts.items():
            print(markdown_row(model, layout))
        return 0
    for model, layout in layouts.items():
        roles = layout.selectors()
        print(f"{model}: {layout.num_blocks} blocks, from {layout.source}")
        for role in ROLES:
            print(f"  {role:<12} {roles.get(role) or '-'}")
        for note in layout.notes:
            print(f"  note: {note}")
    return 0


def markdown_header() -> str:
    return ("| model | blocks | " + " | ".join(ROLES[1:]) + " |\n|" + "---|" * (len(ROLES) + 1))


def markdown_row(model: str, layout: Layout) -> str:
    """Block-relative roles as paths inside block 0; `-` where the family has no such module."""
    roles = layout.selectors()
    cells = [f"`{layout.blocks}` x {layout.num_blocks}"]
    for role in ROLES[1:]:
        value = roles.get(role)
        prefix = layout.block(0) + "."
        shown = value[len(prefix):] if value and value.startswith(prefix) else value
        cells.append(f"`{shown}`" if shown else "-")
    return f"| {model} | " + " | ".join(cells) + " |"


if __name__ == "__main__":
    raise SystemExit(main())
