"""Which savepoints a model has, learnt from the model itself: the one place that answers it.

No suite, tool or diagnosis names a module. A GPT-2 keeps its blocks in
``transformer.h``, a GPT-NeoX in ``gpt_neox.layers`` (its head was ``embed_out`` before transformers 5), an OPT
in ``model.decoder.layers`` (no MLP module: ``fc1``/``fc2`` sit in the block), a
Llama or Qwen in ``model.layers``. What is common is structure, so that is what
is read:

- the **block stack** is the ``ModuleList`` of repeated blocks of one class (the
  longest such list, ties broken by parameter count);
- the **head** is ``get_output_embeddings()``, the **embeddings**
  ``get_input_embeddings()`` (transformers' own answers for every family);
- the **final norm** is the one norm-like module beside the block stack in its
  parent (``ln_f``, ``final_layer_norm``, ``norm``);
- in a block, the **attention** and **MLP** children by name and class, the
  **block norm** is the first norm-like child, and the **down projection** is the
  MLP's last linear layer (the block's own last linear layer where it has no MLP
  module): its input width is the intermediate size.

Sources, in order of trust:

1. the local model's module tree, built from its ``config.json`` on the ``meta``
   device (no weights are read or allocated; needs torch and transformers);
2. the server's own ``capture.savepoints`` list from ``/v1/models``: its word,
   read with name rules only, and reported as not independent.

Importing this module needs neither torch nor transformers (the light install
uses source 2).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

SOURCE_MODULE_TREE = "the model's module tree (built from its config on the meta device)"
SOURCE_SERVER_LIST = "server /v1/models capture.savepoints (not independent)"
HEAD_ALIAS = "logits"  # the protocol's name for the output head, whatever its module path

_NORM_NAME = re.compile(r"(^|_)(ln|norm|layernorm|layer_norm)(_|\d|$)|norm", re.IGNORECASE)
_ATTN_NAME = re.compile(r"attn|attention", re.IGNORECASE)
_MLP_NAME = re.compile(r"^(mlp|ffn|feed_forward|feedforward)$", re.IGNORECASE)
_DOWN_NAMES = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "fc_out", "w2", "wo", "out_proj", "down")
_EMBED_NAME = re.compile(r"embed|wte|tok", re.IGNORECASE)
_INDEXED = re.compile(r"^(?P<stem>.+?)\.(?P<index>\d+)(?P<rest>(\..+)?)$")


@dataclass(frozen=True)
class Layout:
    """A model's savepoints by role. Paths are dotted module paths; ``block_*`` are relative to a block."""

    blocks: str  # the block stack: "transformer.h", "gpt_neox.layers", "model.decoder.layers", "model.layers"
    num_blocks: int
    head: str  # "lm_head", "embed_out" (GPT-NeoX before transformers 5); ``logits`` when only the protocol's alias is known
    source: str
    independent: bool
    embeddings: str | None = None
    final_norm: str | None = None
    block_attention: str | None = None  # "attn", "self_attn", "attention"
    block_mlp: str | None = None  # "mlp"; None where the block has no MLP module (OPT)
    block_down_proj: str | None = None  # "mlp.c_proj", "mlp.down_proj", "fc2"
    block_norm: str | None = None  # "ln_1", "input_layernorm", "self_attn_layer_norm"
    # Sizes read off the structure (module tree only): width of the head, embeddings, down projection input.
    vocab_size: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    notes: list[str] = field(default_factory=list)

    # -- selectors, in the protocol's spelling -------------------------------------------------

    def block(self, index: int, sub: str | None = None, io: str = "output") -> str:
        """``transformer.h[1]``, ``model.layers[0].mlp.down_proj.input``."""
        if index < 0:
            index += self.num_blocks
        text = f"{self.blocks}[{index}]" + (f".{sub}" if sub else "")
        return f"{text}.input" if io == "input" else text

    def block_dotted(self, index: int, sub: str | None = None) -> str:
        """The same block written with dots only (``transformer.h.1``): the grammar's other spelling."""
        return f"{self.blocks}.{index}" + (f".{sub}" if sub else "")

    @property
    def last(self) -> int:
        return self.num_blocks - 1

    def selectors(self) -> dict[str, str | None]:
        """Role -> selector, for the report and the docs' table."""
        return {"blocks": self.block(0) + (f" .. [{self.last}]" if self.num_blocks > 1 else ""),
                "embeddings": self.embeddings, "attention": self._sub(self.block_attention),
                "mlp": self._sub(self.block_mlp), "down_proj": self._sub(self.block_down_proj),
                "block_norm": self._sub(self.block_norm), "final_norm": self.final_norm, "head": self.head}

    def _sub(self, rel: str | None) -> str | None:
        return self.block(0, rel) if rel else None

    # -- reading selectors back ----------------------------------------------------------------

    def canonical(self, module_path: str) -> str:
        """The alias ``logits`` resolved to the head's module path."""
        if module_path == HEAD_ALIAS or module_path.startswith(HEAD_ALIAS + "."):
            return self.head + module_path[len(HEAD_ALIAS):]
        return module_path

    def role(self, selector: str) -> str:
        """The selector with the model's names replaced by roles: ``transformer.h[0]`` -> ``{blocks}[0]``.

        What shape snapshots record, so that a snapshot names no module of its own.
        """
        for stem in (self.blocks + "[", self.blocks + "."):
            if selector.startswith(stem):
                return "{blocks}" + selector[len(self.blocks):]
        for head in {self.head, HEAD_ALIAS}:  # the alias and the module it means are one savepoint
            if selector == head or selector.startswith(head + "."):
                return "{head}" + selector[len(head):]
        return selector

    def is_head(self, module_path: str) -> bool:
        return self.canonical(module_path) == self.head or module_path == HEAD_ALIAS

    def block_of(self, module_path: str) -> tuple[int, str] | None:
        """``transformer.h.3.mlp`` -> (3, ".mlp"); None outside the block stack."""
        prefix = self.blocks + "."
        if not module_path.startswith(prefix):
            return None
        index, _, rest = module_path[len(prefix):].partition(".")
        if not index.isdigit():
            return None
        return int(index), f".{rest}" if rest else ""

    def describe(self) -> dict:
        data = asdict(self)
        data["selectors"] = self.selectors()
        return data


# -- source 1: the module tree --------------------------------------------------------------------

def layout_from_model_dir(model_dir: str | Path) -> Layout:
    """The layout of the model in ``model_dir``, from its config on the ``meta`` device (no weights)."""
    return _layout_of_dir(str(Path(model_dir).resolve()))


@lru_cache(maxsize=8)  # ground truth and the suites' layout ask for the same directory; building costs a second
def _layout_of_dir(model_dir: str) -> Layout:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return layout_from_module(model)


def layout_from_module(root: Any, *, source: str = SOURCE_MODULE_TREE) -> Layout:
    """The layout of a ``torch.nn.Module`` tree (any device, meta included)."""
    import torch

    names = {id(module): name for name, module in root.named_modules()}
    blocks_path, block_list = _block_stack(root, torch.nn.ModuleList)
    head_module = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
    embed_module = root.get_input_embeddings() if hasattr(root, "get_input_embeddings") else None
    notes: list[str] = []
    head = names.get(id(head_module)) if head_module is not None else None
    if not head:
        head = HEAD_ALIAS
        notes.append("the model names no output embeddings: the head is the protocol's alias `logits`")
    embeddings = names.get(id(embed_module)) if embed_module is not None else None
    parent_path = blocks_path.rpartition(".")[0]
    parent = root.get_submodule(parent_path) if parent_path else root
    beside = [(n, m) for n, m in parent.named_children()
              if m is not block_list and m is not embed_module and _is_norm(n, m)]
    final_norm = _join(parent_path, beside[0][0]) if len(beside) == 1 else None
    if len(beside) > 1:
        notes.append(f"several norms beside the block stack ({[n for n, _ in beside]}): no final norm named")
    block = block_list[0]
    children = list(block.named_children())
    # "post_attention_layernorm" and "post_attention_dropout" (GPT-NeoX) name attention too: skip norms and leaves.
    attention = next((n for n, m in children if not _is_norm(n, m) and any(True for _ in m.children())
                      and (_ATTN_NAME.search(n) or _ATTN_NAME.search(type(m).__name__))), None)
    mlp = next((n for n, m in children if _MLP_NAME.match(n) or "mlp" in type(m).__name__.lower()), None)
    block_norm = next((n for n, m in children if _is_norm(n, m)), None)
    down = _down_projection(block, mlp, attention)
    intermediate = _input_width(block.get_submodule(down)) if down else None
    return Layout(
        blocks=blocks_path, num_blocks=len(block_list), head=head, source=source, independent=True,
        embeddings=embeddings, final_norm=final_norm, block_attention=attention, block_mlp=mlp,
        block_down_proj=down, block_norm=block_norm,
        vocab_size=_output_width(head_module) if head_module is not None else None,
        hidden_size=_embedding_width(embed_module) if embed_module is not None else None,
        intermediate_size=intermediate, notes=notes)


def _block_stack(root: Any, module_list: type) -> tuple[str, Any]:
    best: tuple[tuple[int, int], str, Any] | None = None
    for name, module in root.named_modules():
        if not isinstance(module, module_list) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or not any(True for _ in module[0].children()):
            continue  # not repeated blocks: a list of leaves (heads, norms) or of mixed modules
        size = sum(p.numel() for p in module.parameters())
        key = (len(module), size)
        if best is None or key > best[0]:
            best = (key, name, module)
    if best is None:
        raise LookupError("no stack of repeated blocks (a ModuleList of one block class) in the model")
    return best[1], best[2]


def _is_norm(name: str, module: Any) -> bool:
    return bool(_NORM_NAME.search(type(module).__name__) or re.match(r"^(ln|norm)", name, re.IGNORECASE)
                or name.endswith(("norm", "layernorm", "layer_norm")))


def _linears(module: Any) -> list[tuple[str, Any]]:
    """Linear-like descendants (a 2-D weight, not an embedding or a norm), in declaration order."""
    found = []
    for name, sub in module.named_modules():
        weight = getattr(sub, "weight", None)
        if name and weight is not None and getattr(weight, "ndim", 0) == 2 and not _is_norm(name, sub) \
                and "embedding" not in type(sub).__name__.lower():
            found.append((name, sub))
    return found


def _down_projection(block: Any, mlp: str | None, attention: str | None) -> str | None:
    if mlp:
        inner = _linears(block.get_submodule(mlp))
        return f"{mlp}.{inner[-1][0]}" if inner else None
    # No MLP module: the block's last linear layer outside its attention (OPT's fc2).
    outside = [n for n, _ in _linears(block) if not (attention and n.startswith(attention + "."))]
    return outside[-1] if outside else None


def _input_width(module: Any) -> int | None:
    if isinstance(getattr(module, "in_features", None), int):
        return module.in_features
    weight = getattr(module, "weight", None)
    if weight is not None and getattr(module, "nf", None) is not None:  # GPT-2's Conv1D stores [in, out]
        return int(weight.shape[0])
    return int(weight.shape[1]) if weight is not None else None


def _output_width(module: Any) -> int | None:
    if isinstance(getattr(module, "out_features", None), int):
        return module.out_features
    weight = getattr(module, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def _embedding_width(module: Any) -> int | None:
    if isinstance(getattr(module, "embedding_dim", None), int):
        return module.embedding_dim
    weight = getattr(module, "weight", None)
    return int(weight.shape[1]) if weight is not None else None


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


# -- source 2: the server's list ------------------------------------------------------------------

def layout_from_selectors(selectors: Iterable[str]) -> Layout:
    """The layout read from a server's ``capture.savepoints`` by name rules alone (not independent).

    The block stack is the path prefix followed by the most consecutive indices
    from 0; the head is the protocol's alias ``logits`` (a list does not say which
    module the server's head is).
    """
    paths: list[str] = []
    for text in selectors:
        if not isinstance(text, str):
            continue
        path = re.sub(r"\[(\d+)\]", r".\1", text.strip())
        path = re.sub(r"\.(input|output)$", "", path)
        if path and path not in paths:
            paths.append(path)
    indices: dict[str, set[int]] = {}
    for path in paths:
        match = _INDEXED.match(path)
        if match and "." not in match.group("index"):
            indices.setdefault(match.group("stem"), set()).add(int(match.group("index")))
    stacks = [(stem, _run_from_zero(found)) for stem, found in indices.items()]
    stacks = [(stem, n) for stem, n in stacks if n > 0 and not re.search(r"\.\d+(\.|$)", stem)]
    if not stacks:
        raise LookupError(f"the server's capture.savepoints list no indexed block stack ({paths[:6]}...)")
    blocks, count = max(stacks, key=lambda item: item[1])
    first = f"{blocks}.0."
    children: list[str] = []
    for path in paths:
        if path.startswith(first):
            child = path[len(first):].split(".")[0]
            if child not in children:
                children.append(child)
    attention = next((c for c in children if _ATTN_NAME.search(c) and not re.search(r"norm|drop", c, re.I)), None)
    mlp = next((c for c in children if _MLP_NAME.match(c)), None)
    norm = next((c for c in children if re.search(r"norm|^ln", c, re.IGNORECASE)), None)
    inside = [p[len(first):] for p in paths if p.startswith(first)]
    down = _down_by_name(inside, mlp, attention)
    parent = blocks.rpartition(".")[0]
    outside = [p for p in paths if not p.startswith(blocks + ".") and p != blocks]
    beside = [p for p in outside if p.rpartition(".")[0] == parent and re.search(r"norm|(^|\.)ln", p, re.I)]
    embeddings = next((p for p in outside if _EMBED_NAME.search(p.rpartition(".")[2])
                       and "pos" not in p.rpartition(".")[2]), None)
    return Layout(blocks=blocks, num_blocks=count, head=HEAD_ALIAS, source=SOURCE_SERVER_LIST, independent=False,
                  embeddings=embeddings, final_norm=beside[0] if len(beside) == 1 else None,
                  block_attention=attention, block_mlp=mlp, block_down_proj=down, block_norm=norm,
                  notes=["read from the server's own list by name rules: the head is the alias `logits`"])


def _run_from_zero(found: set[int]) -> int:
    count = 0
    while count in found:
        count += 1
    return count


def _down_by_name(inside: list[str], mlp: str | None, attention: str | None) -> str | None:
    scope = [p for p in inside if (p.startswith(mlp + ".") if mlp else not (attention and p.startswith(attention)))]
    for name in _DOWN_NAMES:
        hit = next((p for p in scope if p.rpartition(".")[2] == name), None)
        if hit:
            return hit
    return None


# -- the one entry point ----------------------------------------------------------------------------

def discover_layout(model_dir: str | None, server_selectors: Callable[[], list | None] | None = None) -> Layout:
    """The layout from the most trusted source available; LookupError naming every source's failure."""
    failures: list[str] = []
    if model_dir is not None:
        try:
            return layout_from_model_dir(model_dir)
        except ImportError as exc:
            failures.append(f"module tree: {exc.name or 'torch/transformers'} is not installed (light install)")
        except Exception as exc:  # an architecture this transformers cannot build, a bad config
            failures.append(f"module tree of {model_dir}: {type(exc).__name__}: {str(exc)[:200]}")
    else:
        failures.append("module tree: no local copy of the model")
    if server_selectors is not None:
        listed = server_selectors()
        if listed:
            try:
                layout = layout_from_selectors(listed)
                return Layout(**{**asdict(layout), "notes": layout.notes + failures})
            except LookupError as exc:
                failures.append(str(exc))
        else:
            failures.append("the server's /v1/models lists no capture.savepoints")
    raise LookupError("; ".join(failures))
