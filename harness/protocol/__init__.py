"""The protocol library: talking to a capture server and judging what it answers. No pytest, no server code."""
