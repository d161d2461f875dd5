"""Conformance harness for NNsight activation-capture servers, in three layers.

- ``protocol``: the protocol library. Talking to a capture server (``client``, the one
  launcher ``server``, ``probe``), reading what it answers (``responses``, ``tensors``,
  ``dialects``, ``features``, ``missing``), judging it (``checks``, ``ground_truth``,
  ``reference`` and ``values`` for the values area, ``stops``, ``prompts``, ``runs``).
  No pytest, no server code.
- ``pytest_plugin``: the pytest face. The plugin (``plugin``; options declared once in
  ``options`` and shared with the ``cli``), the run's ``state``, the declared ``areas``,
  the suites' ``fixtures`` and ``value_fixtures``, ``snapshots``, and the report
  (``report``, ``diagnoses``, ``html_report``).
- ``tools``: everyday tools on the library: ``collect`` (collection runs), ``dataset``
  (loading them), ``plot``, ``soak``.

The layer rules are checked by import-linter (``pyproject.toml``, ``tests/test_architecture.py``).
"""

PROTOCOL_VERSION = "1.1"
# What /health may report: a 1.0 server stays conformant to 1.0 (1.1 features are reported as missing).
PROTOCOL_VERSIONS = ("1", "1.1")
