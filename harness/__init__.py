"""Conformance harness for NNsight activation-capture servers.

The pieces, one responsibility each:

- ``client``: the only HTTP client the suites use (timeouts, readable failures, size-capped downloads);
- ``tensors``: loading downloaded tensor files safely (safetensors or ``torch.load(weights_only=True)``);
- ``responses``: typed, validating views of the server's JSON answers;
- ``server``: starting, watching and stopping a capture server process;
- ``ground_truth``: expected dimensions and tokenizer, from the model itself rather than the server;
- ``snapshots``: the syrupy extension that stores tensor metadata per model;
- ``plugin``: the pytest plugin (options, profiles, server lifetime, xdist hand-off);
- ``fixtures``: the fixtures the suites use (only active where the suites are collected);
- ``report`` and ``cli``: the per-area table, the JSON report and ``capture-conformance``.
"""

PROTOCOL_VERSION = "1.1"
# What /health may report: a 1.0 server stays conformant to 1.0 (1.1 features are reported as missing).
PROTOCOL_VERSIONS = ("1", "1.1")
