"""A reference server with one deliberate fault, for the fault matrix: test code, never shipped.

    python tests/faulty_server.py --fault NAME [--fault NAME2] [capture-server options]

It builds the app with the reference server's own factory and installs the
fault (``tests/faults.py``) on the pieces that factory wired together, then
serves it exactly as ``capture-server`` would.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `faults` beside this file, however it is started

from faults import FAULTS, Target, install  # noqa: E402

from capture_conformance.reference_server.app import create_app  # noqa: E402
from capture_conformance.reference_server.cli import build_parser, serve, settings_from_args  # noqa: E402


def faulty_app_factory(*faults: str):
    # Several faults are installed only where they touch disjoint things (the structural value faults
    # of the zoo: blocks 0..L-2 from their next block, block L-1 after the final norm).
    def create(settings, **kwargs):
        app = create_app(settings, **kwargs)
        state = app.state
        for fault in faults:
            install(fault, Target(app, state.service, state.registry, state.readiness))
        return app

    return create


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    parser.prog = "faulty_server.py"
    parser.add_argument("--fault", required=True, action="append", choices=sorted(FAULTS),
                        help="the deliberate bug to install (repeatable)")
    args = parser.parse_args(argv)
    print(f"faulty_server: fault injected on purpose: {', '.join(args.fault)}", file=sys.stderr, flush=True)
    serve(settings_from_args(args), app_factory=faulty_app_factory(*args.fault))


if __name__ == "__main__":
    main()
