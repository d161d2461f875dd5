"""A tensor-parallel reference server with one deliberate TP defect, for the fleet's parity test: test code.

    python -m torch.distributed.run --standalone --nproc-per-node 2 --max-restarts 0 \\
        tests/faulty_tp_server.py --tp 2 --port P [capture-server options]

torch.distributed.run starts this file once per rank. The defect: rank 1 serves a stale copy of its
shards (its weights off by 3% of each tensor's spread, as when one node of a multi-node group reads an
older checkpoint from its own disk). Every rank runs, every collective matches, shapes, dtypes and
usually the greedy ids stay right; the values that rank contributes to are wrong. Only a comparison
of values with another host (the fleet's parity) or with an independent forward pass tells.
"""

from __future__ import annotations

import os
import sys

import torch

from capture_conformance.reference_server import distributed

_load = distributed._load


def _stale_shards_on_rank_1(settings, model_id, device):
    model = _load(settings, model_id, device)
    if os.environ.get("RANK") == "1":
        generator = torch.Generator().manual_seed(12)
        with torch.no_grad():
            for param in model._module.parameters():
                local = param.to_local() if hasattr(param, "to_local") else param  # a DTensor's own shard
                noise = torch.randn(local.shape, generator=generator).to(local.device, local.dtype)
                local.add_(noise * (0.03 * local.float().std()).to(local.dtype))
    return model


distributed._load = _stale_shards_on_rank_1

if __name__ == "__main__":
    from capture_conformance.reference_server.cli import main

    sys.exit(main())
