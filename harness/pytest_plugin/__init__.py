"""The pytest face: the plugin, its options (shared with the CLI), fixtures, snapshots and the report."""
