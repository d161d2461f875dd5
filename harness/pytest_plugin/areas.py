"""The conformance areas: the one list that the suites, the report and the fault matrix share.

Each suite module declares its area with ``pytestmark = pytest.mark.area("<name>")``;
the plugin refuses a suite module without one, the report groups results by it,
and every fault of the fault matrix names the area that must catch it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Area:
    name: str
    title: str
    required: bool = True  # needed for capture level "full"; an optional area is reported, never required


AREAS: tuple[Area, ...] = (
    Area("health", "/health: 503 while loading, then ok with the loaded models"),
    Area("models", "/v1/models and /models/load"),
    Area("chat", "OpenAI chat completions: usage, max_tokens, stop, the chat template"),
    Area("single_token", "first- and last-token capture"),
    Area("multi_token", "one captured step per generated token"),
    Area("savepoints", "decoder layers, inputs, submodules, names and execution order"),
    Area("dtype_size", "capture dtypes, file formats, metadata against the stored file"),
    Area("out_of_order", "concurrency, sampling and OutOfOrderError"),
    Area("bad_input", "a bad request is a 4xx naming the problem, and the server carries on"),
    Area("values", "captured values against an independent forward pass of the same checkpoint"),
    Area("streaming", "server-sent events, one chunk per token", required=False),
    Area("positions", "protocol 1.1 prompt and whole-sequence capture (capture.positions)", required=False),
    Area("parity", "a fleet (several --host): the same greedy requests give the same ids and captures on every "
                   "host", required=False),
)

BY_NAME = {area.name: area for area in AREAS}
REQUIRED_AREAS = [area.name for area in AREAS if area.required]
OPTIONAL_AREAS = [area.name for area in AREAS if not area.required]
MARKER = "area"
# The user property under which the plugin records each suite test's area: it reaches the xdist controller.
AREA_PROPERTY = "capture_conformance_area"
# ... and, in a fleet run, the host it ran against.
HOST_PROPERTY = "capture_conformance_host"
# The area that talks to every host of a fleet at once; it runs only when there are two or more.
FLEET_AREA = "parity"

# Optional protocol features (message_forms: list-of-parts content and the `developer` role). A target that lacks one is reported as lacking it (a skip naming it);
# with --require-feature, and always for the bundled reference server, which has them all, it fails.
FEATURES = ("streaming", "message_forms", "prompt", "sequence")
