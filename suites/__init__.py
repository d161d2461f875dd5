"""The conformance suites: one module per area of the capture protocol (see docs/harness.md)."""
