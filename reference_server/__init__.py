"""Reference NNsight activation-capture server (capture protocol v1)."""
