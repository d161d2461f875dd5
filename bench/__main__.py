"""``python -m capture_conformance.bench`` and the ``capture-bench`` console script."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["overhead"]:  # capture-bench overhead: the outside ratio and its gate (bench/overhead.py)
        from .overhead import main as overhead

        return overhead(args[1:])
    from .cli import main as run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
