"""``capture-bench`` / ``python -m capture_conformance.bench``: what capture costs, measured side by side.

One run, one model: plain transformers ``generate`` and a hand-written forward
hook (the anchors, no server, no nnsight), nnsight's own per-step capture in
process, and the reference server over HTTP with and without capture, each
variant alternated round-robin over repetitions after a warm-up; then K
concurrent clients for throughput and identical-to-solo results; then the
server's resident memory. Prints a table of medians and ratios and writes JSON.

``stats`` and ``variants`` are pure (no torch, no server) and unit-tested;
``anchors`` runs in this process, ``server`` drives a server subprocess.
"""
