"""The server's plain data: what a request asks the nnsight core for and what it gives back.

Kept apart from ``nnsight_core`` (the only module that imports nnsight) so that the
service, the registry and the storage can name these types without loading nnsight.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from .selectors import Selector

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class ModelInfo:
    vocab_size: int
    hidden_size: int
    num_layers: int
    dtype: str
    device: str


@dataclass(frozen=True)
class SavepointSite:
    """Where a selector lands: its rank in execution order and the per-token shape."""

    module_path: str
    io: str
    rank: int
    feature_shape: tuple[int, ...]  # the value's shape after [batch, position]
    # Computed for the last position only while generating (transformers 5 slices the hidden
    # states before the output head: logits_to_keep=1): prompt positions need logits_to_keep=0.
    last_only: bool = False
    # Laid out [batch * position, ...] (a block that flattens its tokens, OPT's fc1/fc2), not [batch, position, ...].
    flat: bool = False


@dataclass(frozen=True)
class PlannedSavepoint:
    name: str
    selector: Selector
    site: SavepointSite


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    params: GenerationParams
    savepoints: list[PlannedSavepoint]
    tokens: str = "all"
    capture_dtype: torch.dtype = torch.float32
    on_token: Callable[[int], None] | None = None  # called from the worker thread per generated token
    positions: str = "generated"  # "generated", "prompt" or "sequence" (protocol 1.1)
    # Set when the client is gone (registry.ModelWorker): the generation stops at its next step.
    cancelled: threading.Event = field(default_factory=threading.Event, compare=False)

    def batch_key(self):
        """Requests with equal keys may share one generate; None: run alone.

        Only greedy requests without stop strings are batched: one generate has one
        sampling configuration and one RNG (a seeded request must not depend on its
        neighbours), and stop strings would end other rows. max_tokens may differ.
        ``sequence`` requests stop one step late and prompt logits need every position's
        logits: both change the generate call, so they batch only with their own kind.
        """
        if self.params.temperature > 0 or self.params.stop or self.on_token is not None:
            return None
        return ("greedy", self.positions == "sequence", self.needs_all_logits())

    def needs_all_logits(self) -> bool:
        """Whether a last-only site (the output head) must be computed at every prompt position.

        Not for ``tokens: "last"``: the prompt's last position is step 0's, the sequence's
        last is the extra step's, both computed anyway.
        """
        return (self.positions != "generated" and self.tokens != "last"
                and any(sp.site.last_only for sp in self.savepoints))


@dataclass
class Generation:
    token_ids: list[int]  # the generated ids only
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [1, T, ...] on CPU
    hit_eos: bool = False
