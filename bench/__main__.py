"""``python -m capture_conformance.bench`` and the ``capture-bench`` console script."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from .cli import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
