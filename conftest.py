"""Repository-level pytest configuration.

The conformance machinery lives in the ``capture_conformance.harness.pytest_plugin.plugin`` pytest plugin, which
pip installs as a ``pytest11`` entry point, so the suites run the same from any
directory. The one thing done here: with plugin autoloading switched off
(``PYTEST_DISABLE_PLUGIN_AUTOLOAD``), load it explicitly for this repository.
"""

import os

if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
    pytest_plugins = ["capture_conformance.harness.pytest_plugin.plugin"]
