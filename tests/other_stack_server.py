"""A capture server written on another stack, for testing the harness against a server it has never seen.

No nnsight, no FastAPI, nothing of ``reference_server`` or of the project's
fixtures: the standard library's ``http.server``, plain ``transformers`` with
PyTorch forward hooks, and its own random-weight model, built into
``--model-dir`` on first start (a second or two) when the directory holds no
``config.json``. ``--arch`` picks the family it builds, each with other sizes
than ``tiny-qwen3`` and than each other, its own byte-level BPE tokenizer
(trained at build time), its family's special tokens and a chat template in
its family's style:

    qwen3  Qwen3ForCausalLM       model.layers.N     ChatML (<|im_start|>, <|im_end|>)
    gpt2   GPT2LMHeadModel        transformer.h.N    <|endoftext|> only, content + eos per message
    neox   GPTNeoXForCausalLM     gpt_neox.layers.N  OpenAssistant (<|prompter|>, <|assistant|>)
    opt    OPTForCausalLM         model.decoder.layers.N  </s> as bos, "User: ..." lines
    llama  LlamaForCausalLM       model.layers.N     Llama 3 headers (<|start_header_id|>, <|eot_id|>)
    phi3   Phi3ForCausalLM        model.layers.N     <|user|> ... <|end|> (fused qkv_proj, gate_up_proj)
    gemma  GemmaForCausalLM       model.layers.N     <start_of_turn>user ... <end_of_turn> (tied head, one KV head)
    mistral MistralForCausalLM    model.layers.N     [INST] ... [/INST] answer</s>
    neox-japanese GPTNeoXJapaneseForCausalLM  gpt_neox_japanese.layers.N  head embed_out; "ユーザー:" turns

The server itself assumes no architecture: selectors resolve against the
model's ``named_modules()`` (``a.b[3]`` and ``a.b.3`` alike, ``.output`` or
``.input``), the protocol's alias ``logits`` is ``get_output_embeddings()``'s
path, ``/v1/models`` lists the modules that give a per-token tensor (found by a
forward pass at start-up, in execution order), and the sizes come from the
config through transformers' attribute names. It implements protocol v1 and
1.1's positions (``prompt``, ``sequence``: its own decode loop keeps the
prefill pass whole and feeds the last completion token once more) as written in
``docs/protocol.md``, so the harness must pass it, on its first run, with no
snapshot set for its model, the positions area included.

``--defect NAME`` (repeatable) makes it misbehave the way deployed servers do,
so the harness's tests can check that the report names each defect:

    four_d_logits   every savepoint stored [1, N, 1, D] (stacked per-step [1,1,D] tensors)
    list_of_steps   capture answers 500 (an unstacked list of per-step tensors cannot be saved)
    truncated_file  files keep 128 features while the metadata keeps the full width
    zero_usage      usage is all zeros
    retokenised_usage  usage.completion_tokens counts the reply text tokenised again
    no_load_route   no POST /models/load (the framework's 404 "Not Found")
    bad_input_500   max_tokens 0 and a body without a model answer 500
    probability_logits  the head's captures stored as softmax probabilities (same argmax, same shape)
    files_elsewhere     file_path names a path on the server's own machine that this one has not (a remote
                        server's files); nothing is downloadable in the older family then

``--family store_activations`` makes it speak the older family's dialect instead:
no ``protocol`` in ``/health``, no ``capture`` block in ``/v1/models``, and chat
responses without ``completion_token_ids``, ``activation_run_id`` or ``url``
(files only at ``file_path``), as the deployed servers this protocol extends.

    python tests/other_stack_server.py --port 8011 --model-dir /tmp/other-gpt2 --arch gpt2 [--defect ...]
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

DEFECTS = ("four_d_logits", "list_of_steps", "truncated_file", "zero_usage", "retokenised_usage", "no_load_route",
           "bad_input_500", "probability_logits", "files_elsewhere")
NAME_RE = re.compile(r"[A-Za-z0-9_.\[\]-]{1,128}")
SEGMENT_RE = re.compile(r"(?:([A-Za-z][A-Za-z0-9_]*)|(\d+))(?:\[(\d+)\])?")
DTYPES = ("float32", "bfloat16", "float16")
POSITIONS = ("generated", "prompt", "sequence")  # protocol 1.1
HEAD_ALIAS = "logits"  # the protocol's name for the output head, whatever the module is called
SEED = 20261201
WIDE_INIT = 0.6  # a wide init, so that greedy output depends on the prompt instead of one token forever
CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_corpus.jsonl"
TOPIC_LINES = 600  # lines of the standard library's pydoc topics added to the corpus: enough text for 2048 tokens


class BadRequest(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


# -- the models it builds ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Arch:
    """One family: its special tokens (ids 0.. in this order), chat template and a small config."""

    vocab: int
    special: tuple[str, ...]
    roles: dict[str, str]  # tokenizer role -> special token: bos_token, eos_token, pad_token, unk_token
    eos: tuple[str, ...]  # generation_config's end-of-sequence tokens (config.json names the first)
    template: str
    config: Callable[[dict[str, int], "Arch"], Any]  # token ids -> a transformers config


def _qwen3(ids, arch):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=arch.vocab, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=1024,
                       tie_word_embeddings=False, initializer_range=WIDE_INIT, eos_token_id=ids["<|im_end|>"],
                       bos_token_id=None, pad_token_id=ids["<|endoftext|>"])


def _gpt2(ids, arch):
    from transformers import GPT2Config

    eos = ids["<|endoftext|>"]
    return GPT2Config(vocab_size=arch.vocab, n_positions=1024, n_embd=80, n_layer=3, n_head=4, n_inner=208,
                      initializer_range=WIDE_INIT, bos_token_id=eos, eos_token_id=eos)


def _neox(ids, arch):
    from transformers import GPTNeoXConfig

    eos = ids["<|endoftext|>"]
    return GPTNeoXConfig(vocab_size=arch.vocab, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=176, max_position_embeddings=1024, tie_word_embeddings=False,
                         initializer_range=WIDE_INIT, bos_token_id=eos, eos_token_id=eos,
                         pad_token_id=ids["<|padding|>"])


def _opt(ids, arch):
    from transformers import OPTConfig

    return OPTConfig(vocab_size=arch.vocab, hidden_size=112, num_hidden_layers=2, ffn_dim=144, num_attention_heads=4,
                     word_embed_proj_dim=112, max_position_embeddings=1024, init_std=WIDE_INIT,
                     bos_token_id=ids["</s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])


def _llama(ids, arch):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=arch.vocab, hidden_size=88, intermediate_size=232, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=False, initializer_range=WIDE_INIT,
                       bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|end_of_text|>"])


def _phi3(ids, arch):
    from transformers import Phi3Config

    return Phi3Config(vocab_size=arch.vocab, hidden_size=120, intermediate_size=200, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      original_max_position_embeddings=1024, tie_word_embeddings=False,
                      initializer_range=WIDE_INIT, bos_token_id=None, eos_token_id=ids["<|endoftext|>"],
                      pad_token_id=ids["<|endoftext|>"])


def _gemma(ids, arch):
    from transformers import GemmaConfig

    # Gemma: tied head, embeddings scaled by sqrt(hidden), GELU MLP, one KV head (multi-query).
    return GemmaConfig(vocab_size=arch.vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                       tie_word_embeddings=True, initializer_range=WIDE_INIT, bos_token_id=ids["<bos>"],
                       eos_token_id=ids["<end_of_turn>"], pad_token_id=ids["<pad>"])


def _mistral(ids, arch):
    from transformers import MistralConfig

    return MistralConfig(vocab_size=arch.vocab, hidden_size=80, intermediate_size=200, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=20, max_position_embeddings=1024,
                         sliding_window=None, tie_word_embeddings=False, initializer_range=WIDE_INIT,
                         bos_token_id=ids["<s>"], eos_token_id=ids["</s>"])


def _neox_japanese(ids, arch):
    from transformers import GPTNeoXJapaneseConfig

    # Its head is still called embed_out (GPT-NeoX's became lm_head in transformers 5), and it is untied here.
    return GPTNeoXJapaneseConfig(vocab_size=arch.vocab, hidden_size=72, num_hidden_layers=3, num_attention_heads=4,
                                 intermediate_multiple_size=2, max_position_embeddings=1024, attention_dropout=0.0,
                                 tie_word_embeddings=False, initializer_range=WIDE_INIT,
                                 bos_token_id=ids["<|startoftext|>"], eos_token_id=ids["<|endoftext|>"],
                                 pad_token_id=ids["<|padding|>"])


ARCHS: dict[str, Arch] = {
    "qwen3": Arch(
        1536, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, ("<|im_end|>", "<|endoftext|>"),
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}", _qwen3),
    # GPT-2 has one special token; transformers' old default template for it: each message's content, then eos.
    "gpt2": Arch(
        2048, ("<|endoftext|>",),
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
        ("<|endoftext|>",),
        "{% for message in messages %}{{ message['content'] }}{{ eos_token }}{% endfor %}", _gpt2),
    # Pythia's tokens, and OpenAssistant's chat format for its GPT-NeoX models.
    "neox": Arch(
        1792, ("<|endoftext|>", "<|padding|>", "<|system|>", "<|prompter|>", "<|assistant|>"),
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
         "pad_token": "<|padding|>"}, ("<|endoftext|>",),
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}<|prompter|>{% elif message['role'] == 'system' %}<|system|>"
        "{% else %}<|assistant|>{% endif %}{{ message['content'] }}<|endoftext|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}", _neox),
    # OPT's four tokens; its tokenizer starts every text with </s>.
    "opt": Arch(
        1664, ("<s>", "<pad>", "</s>", "<unk>"),
        {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, ("</s>",),
        "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}", _opt),
    "llama": Arch(
        1920, ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, ("<|end_of_text|>", "<|eot_id|>"),
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim }}"
        "{{ '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
        _llama),
    "phi3": Arch(
        1600, ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        {"eos_token": "<|end|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
        ("<|endoftext|>", "<|end|>"),
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}", _phi3),
    # Gemma's turn markers; a system message is folded into the user turn (Gemma has no system role).
    "gemma": Arch(
        1472, ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        {"bos_token": "<bos>", "eos_token": "<end_of_turn>", "pad_token": "<pad>", "unk_token": "<unk>"},
        ("<end_of_turn>", "<eos>"),
        "{{ bos_token }}{% for message in messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
        "{{ '<start_of_turn>' + role + '\\n' + message['content'] + '<end_of_turn>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}", _gemma),
    # Mistral's instruction format: the answer follows [/INST] and ends with </s>.
    "mistral": Arch(
        1344, ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, ("</s>",),
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
        "{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}{% endfor %}", _mistral),
    # rinna-style turns ("ユーザー:" / "システム:" split by <NL>), as served for GPT-NeoX-Japanese models.
    "neox-japanese": Arch(
        1280, ("<|endoftext|>", "<|startoftext|>", "<|padding|>", "<NL>"),
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|padding|>",
         "unk_token": "<|endoftext|>"}, ("<|endoftext|>",),
        "{% for message in messages %}{% if not loop.first %}<NL>{% endif %}"
        "{% if message['role'] == 'assistant' %}システム: {{ message['content'] }}{{ eos_token }}"
        "{% else %}ユーザー: {{ message['content'] }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<NL>システム:{% endif %}", _neox_japanese),
}


def _training_text() -> list[str]:
    """A few hundred lines: the project's small chat corpus, then the standard library's pydoc topics."""
    lines: list[str] = []
    if CORPUS.is_file():
        for row in CORPUS.read_text().splitlines():
            if row.strip():
                lines += [str(value) for value in json.loads(row).values()]
    try:
        from pydoc_data.topics import topics

        lines += [line for key in sorted(topics) for line in topics[key].splitlines() if line.strip()][:TOPIC_LINES]
    except ImportError:
        pass
    return lines


def train_tokenizer(arch: Arch):
    """A byte-level BPE of exactly ``arch.vocab`` tokens, the family's special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = _training_text()
    for use_regex in (True, False):  # without the word regex, merges cross spaces: more tokens from less text
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=arch.vocab, special_tokens=list(arch.special),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(text, trainer=trainer)
        if tok.get_vocab_size() == arch.vocab:
            break
    else:
        raise RuntimeError(f"the training text gives {tok.get_vocab_size()} tokens, not {arch.vocab}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1024, **arch.roles)
    tokenizer.chat_template = arch.template
    return tokenizer


def build_model(model_dir: Path, arch: str = "qwen3") -> None:
    """A random-weight model of family ``arch`` with its own tokenizer, written once into ``model_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    spec = ARCHS[arch]
    tokenizer = train_tokenizer(spec)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in spec.special}
    config = spec.config(ids, spec)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[ids[t] for t in spec.eos], bos_token_id=config.bos_token_id,
        pad_token_id=config.pad_token_id, do_sample=False)
    model_dir = Path(model_dir)
    tmp = model_dir.with_name(model_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(model_dir)


# -- the engine -------------------------------------------------------------------------------------

def _as_ids(value) -> list[int]:
    items = value if isinstance(value, (list, tuple)) else [value]
    return [item for item in items if isinstance(item, int) and not isinstance(item, bool)]


def _layout(value, positions: int) -> str | None:
    """How a value holds one row per position: "batch" ([1, T, ...]), "flat" ([T, ...]: a batch of one whose
    batch and position axes the model merged, as OPT's fc1/fc2 see them) or None (not per token)."""
    import torch

    if isinstance(value, (tuple, list)):
        value = value[0] if value else None
    if not isinstance(value, torch.Tensor) or value.ndim < 2:
        return None
    if tuple(value.shape[:2]) == (1, positions):
        return "batch"
    return "flat" if value.shape[0] == positions else None


def _positions(value, layout: str, last_only: bool):
    """[1, T, ...] of the pass's positions (only its last one, [1, 1, ...], with ``last_only``)."""
    batch = value.unsqueeze(0) if layout == "flat" else value
    return batch[:, -1:] if last_only else batch


class Engine:
    """The model and one generation at a time (hooks are per request, so requests must not overlap)."""

    def __init__(self, model_dir: Path, model_id: str, defects: set[str]):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.model_id = model_id
        self.defects = defects
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.config = self.model.config
        text = self.config.get_text_config()
        # transformers' own attribute names: GPT-2's n_embd/n_layer answer as hidden_size/num_hidden_layers
        self.vocab_size, self.hidden_size, self.num_layers = text.vocab_size, text.hidden_size, text.num_hidden_layers
        self.context = getattr(text, "max_position_embeddings", None)  # GPT-2's n_positions, by its alias
        self.eos = set(_as_ids(self.config.eos_token_id)) | set(_as_ids(self.model.generation_config.eos_token_id))
        self.modules = dict(self.model.named_modules(remove_duplicate=False))
        head = self.model.get_output_embeddings()
        self.head_path = next(name for name, module in self.modules.items() if module is head and name)
        self.first_param = {}
        for name, module in self.modules.items():
            params = list(inspect.signature(module.forward).parameters)
            self.first_param[name] = params[0] if params else None
        self.capturable = self._probe()
        # the KV cache's keyword: `cache` since transformers 5.2x, `past_key_values` before
        forward = inspect.signature(self.model.forward).parameters
        self.cache_arg = "cache" if "cache" in forward else "past_key_values"
        self.lock = threading.Lock()

    def check_context(self, prompt_tokens: int, max_new: int) -> None:
        """A request must fit the model's positions (GPT-2's and OPT's position tables end there)."""
        if self.context and prompt_tokens + max_new > self.context:
            raise BadRequest(400, f"the prompt ({prompt_tokens} tokens) and max_tokens ({max_new}) exceed the "
                                  f"model's context of {self.context} tokens")

    def _probe(self) -> dict[str, dict[str, str | None]]:
        """Which modules give a per-token tensor, output and input (and laid out how), in execution order."""
        torch = self.torch
        seen: dict[str, dict[str, str | None]] = {}
        positions = 7  # not a size of anything in the model, so no other axis passes for the positions
        handles = []
        for name, module in self.modules.items():
            if not name or isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)):
                continue

            def hook(mod, args, kwargs, output, name=name):
                if name not in seen:
                    seen[name] = {"output": _layout(output, positions),
                                  "input": _layout(self._input_of(name, args, kwargs), positions)}
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        try:
            with torch.inference_mode():
                self.model(input_ids=torch.arange(positions).unsqueeze(0) % self.vocab_size, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return seen

    def _input_of(self, name: str, args, kwargs):
        """The module's first positional argument, however the caller passed it."""
        return args[0] if args else kwargs.get(self.first_param.get(name) or "", None)

    def savepoints(self) -> list[str]:
        """The selectors of every module with a per-token output, in execution order (head included)."""
        return [name for name, sides in self.capturable.items() if sides["output"]]

    # -- selectors ------------------------------------------------------------------------------

    def resolve(self, selector: str):
        """(module, "output"|"input") for a selector; looks names up in the module tree, never evaluates text."""
        if not isinstance(selector, str) or not selector:
            raise BadRequest(422, f"selector must be a non-empty string: {selector!r}")
        text, where = selector, "output"
        if text.endswith((".output", ".input")):
            text, _, where = text.rpartition(".")
        if text == HEAD_ALIAS:
            text = self.head_path
        parts: list[str] = []
        for segment in text.split("."):
            match = SEGMENT_RE.fullmatch(segment)
            if not match:
                raise BadRequest(422, f"unknown selector {selector!r}: bad segment {segment!r}")
            name, index, sub = match.groups()
            parts.append(name if name is not None else index)
            if sub is not None:
                parts.append(sub)
        path = ".".join(parts)
        module = self.modules.get(path)
        if module is None:
            parent = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)
                           if ".".join(parts[:i]) in self.modules), "")
            raise BadRequest(422, f"unknown selector {selector!r}: no module {path!r}"
                                  + (f" under {parent!r}" if parent else ""))
        if not self.capturable.get(path, {}).get(where):
            raise BadRequest(422, f"selector {selector!r} names {type(module).__name__} {path!r}, whose {where} "
                                  f"is not a per-token tensor")
        return module, where

    # -- generation -----------------------------------------------------------------------------

    def generate(self, prompt_ids: list[int], max_new: int, *, stop: list[str], temperature: float,
                 top_p: float, seed: int | None, savepoints: list[tuple[str, object, str]],
                 positions: str = "generated"):
        """Ids, text, finish reason and per savepoint its passes' values: [1, T, ...] each, T = 1 but for the
        prefill of a prompt or sequence capture (every prompt position); a sequence capture gets one more
        pass, over the last completion token, which generation alone never feeds."""
        with self.lock:  # hooks fire for every forward pass: no other request's pass may run meanwhile
            return self._generate(prompt_ids, max_new, stop=stop, temperature=temperature, top_p=top_p, seed=seed,
                                  savepoints=savepoints, positions=positions)

    def _generate(self, prompt_ids, max_new, *, stop, temperature, top_p, seed, savepoints, positions):
        torch = self.torch
        steps: dict[str, list] = {name: [] for name, _, _ in savepoints}
        paths = {id(module): path for path, module in self.modules.items()}
        handles = []
        for name, module, where in savepoints:
            path = paths[id(module)]
            layout = self.capturable[path][where]

            def hook(mod, args, kwargs, output, name=name, where=where, path=path, layout=layout):
                value = self._input_of(path, args, kwargs) if where == "input" else output
                if isinstance(value, (tuple, list)):
                    value = value[0]
                whole = positions != "generated" and not steps[name]  # the prefill of a prompt or sequence capture
                steps[name].append(_positions(value, layout, last_only=not whole).detach().clone())
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        try:
            with torch.inference_mode():
                ids: list[int] = []
                finish = "length"
                past = None
                feed = torch.tensor([prompt_ids])
                text = ""
                for _ in range(max_new):
                    out = self.model(input_ids=feed, use_cache=True, **{self.cache_arg: past})
                    past = out.get(self.cache_arg)
                    logits = out.logits[0, -1].float()
                    if temperature and temperature > 0:
                        probs = torch.softmax(logits / temperature, -1)
                        if top_p < 1.0:
                            sorted_p, order = probs.sort(descending=True)
                            keep = sorted_p.cumsum(-1) - sorted_p < top_p
                            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
                        token = int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
                    else:
                        token = int(logits.argmax())
                    ids.append(token)
                    if token in self.eos:
                        finish = "stop"
                        break
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                    if any(s in text for s in stop):
                        finish = "stop"
                        break
                    feed = torch.tensor([[token]])
                if positions == "sequence" and ids:  # position P+N-1: the last completion token as input
                    self.model(input_ids=torch.tensor([[ids[-1]]]), use_cache=True, **{self.cache_arg: past})
        finally:
            for handle in handles:
                handle.remove()
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for s in stop:
            if s in text:
                text = text[: text.index(s)]
        return ids, text, finish, steps


class Handler(BaseHTTPRequestHandler):
    server_version = "other-stack-capture/1.0"
    engine: Engine
    storage: Path
    family = "protocol-v1"

    def log_message(self, fmt, *args):
        pass

    def _send(self, status: int, body: object = None, raw: bytes | None = None, ctype: str = "application/json"):
        data = raw if raw is not None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _body(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            raise BadRequest(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest(422, "the body must be a JSON object")
        return body

    def _guard(self, work):
        try:
            work()
        except BadRequest as exc:
            self._send(exc.status, {"detail": exc.detail})
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # a bug of this server: a 500 without a traceback
            self._send(500, {"detail": f"internal error: {type(exc).__name__}"})

    # -- routes ---------------------------------------------------------------------------------

    def do_GET(self):
        self._guard(self._get)

    def do_POST(self):
        self._guard(self._post)

    def do_DELETE(self):
        self._guard(self._delete)

    def _get(self):
        engine = self.engine
        if self.path == "/health":
            health = {"status": "ok", "loaded_models": [engine.model_id], "protocol": "1.1"}
            if self.family == "store_activations":
                del health["protocol"]
            return self._send(200, health)
        if self.path == "/v1/models" and self.family == "store_activations":
            return self._send(200, {"object": "list", "data": [{"id": engine.model_id, "object": "model"}]})
        if self.path == "/v1/models":
            return self._send(200, {"object": "list", "data": [{
                "id": engine.model_id, "object": "model", "created": 0, "owned_by": "other-stack",
                "capture": {"vocab_size": engine.vocab_size, "hidden_size": engine.hidden_size,
                            "num_layers": engine.num_layers, "dtype": "float32",
                            "savepoints": engine.savepoints(),
                            # What of the optional features it has (no streaming).
                            "features": ["prompt", "sequence", "safetensors", "bfloat16", "float16"]}}]})
        match = re.fullmatch(r"/v1/activations/([0-9a-f]{32})/([A-Za-z0-9_.\[\]%-]{1,200})", self.path)
        if match:
            manifest = self.storage / match.group(1) / "manifest.json"
            if manifest.is_file():
                files = json.loads(manifest.read_text())
                from urllib.parse import unquote

                name = unquote(match.group(2))
                if name in files:
                    return self._send(200, raw=(self.storage / match.group(1) / files[name]).read_bytes(),
                                      ctype="application/octet-stream")
                raise BadRequest(404, f"run {match.group(1)!r} has no file {name!r}")
            raise BadRequest(404, f"no run {match.group(1)!r}")
        if self.path.startswith("/v1/activations/"):
            raise BadRequest(404, "no such run or file")
        self._send(404, {"detail": "Not Found"})

    def _delete(self):
        match = re.fullmatch(r"/v1/activations/([0-9a-f]{32})", self.path)
        if match and (self.storage / match.group(1)).is_dir():
            shutil.rmtree(self.storage / match.group(1))
            return self._send(204, raw=b"")
        if self.path.startswith("/v1/activations/"):
            raise BadRequest(404, "no such run")
        self._send(404, {"detail": "Not Found"})

    def _post(self):
        engine = self.engine
        if self.path == "/models/load" and "no_load_route" not in engine.defects:
            body = self._body()
            model_id = body.get("model_id")
            if not isinstance(model_id, str) or not model_id:
                raise BadRequest(422, "model_id is required")
            if "dtype" in body and body["dtype"] not in DTYPES:
                raise BadRequest(422, f"dtype must be one of {list(DTYPES)}")
            if model_id != engine.model_id:
                raise BadRequest(404, f"model {model_id!r} cannot be loaded by this server")
            return self._send(200, {"ok": True, "model": engine.model_id})
        if self.path == "/test_pure_nnsight":
            body = self._body()
            steps = body.get("max_new_tokens", 1)
            if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
                raise BadRequest(422, "max_new_tokens must be a positive integer")
            if body.get("model", engine.model_id) != engine.model_id:
                raise BadRequest(404, "model not loaded")
            ids = engine.tokenizer(body.get("prompt") or "Hello", add_special_tokens=False)["input_ids"]
            engine.check_context(len(ids), steps)
            head, where = engine.resolve(HEAD_ALIAS)
            gen, _, _, captured = engine.generate(ids, steps, stop=[], temperature=0, top_p=1.0, seed=None,
                                                  savepoints=[("_logits", head, where)])
            return self._send(200, {"success": True, "logits_shape": [1, len(captured["_logits"]),
                                                                      engine.vocab_size],  # a pass each
                                    "logits_dtype": "torch.float32",
                                    "generated_text": engine.tokenizer.decode(gen, skip_special_tokens=True)})
        if self.path == "/v1/chat/completions":
            return self._chat(self._body())
        self._send(404, {"detail": "Not Found"})

    # -- chat -----------------------------------------------------------------------------------

    def _chat(self, body: dict):
        engine = self.engine
        bad_500 = "bad_input_500" in engine.defects
        if bad_500 and ("model" not in body or body.get("max_tokens") == 0):
            raise RuntimeError("unchecked input")  # the defect: a client mistake reaches the model
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest(422, "messages must be a non-empty list")
        for message in messages:
            if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant") or \
                    not isinstance(message.get("content"), str):
                raise BadRequest(422, "each message needs a role and a string content")
            try:
                message["content"].encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest(422, "content is not valid Unicode text (a lone surrogate)") from None
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 16))
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise BadRequest(422, "max_tokens must be a positive integer")
        temperature = body.get("temperature", 1.0)
        top_p = body.get("top_p", 1.0)
        for key, value in (("temperature", temperature), ("top_p", top_p)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise BadRequest(422, f"{key} must be a finite number")
        if body.get("n", 1) != 1:
            raise BadRequest(400, "only n=1 is supported")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise BadRequest(422, "stop must be a string or a list of non-empty strings")
        if body.get("model") != engine.model_id:
            raise BadRequest(404, f"model {body.get('model')!r} is not loaded")
        capture = self._capture_request(body)
        prompt_ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(prompt_ids, "keys"):
            prompt_ids = prompt_ids["input_ids"]
        prompt_ids = list(prompt_ids)
        engine.check_context(len(prompt_ids), max_tokens)
        seed = body.get("seed")
        ids, text, finish, steps = engine.generate(
            prompt_ids, max_tokens, stop=stop, temperature=float(temperature), top_p=float(top_p),
            seed=seed if isinstance(seed, int) else None, savepoints=capture["savepoints"] if capture else [],
            positions=capture["positions"] if capture else "generated")
        completion_tokens = len(ids)
        if "zero_usage" in engine.defects:
            usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        else:
            if "retokenised_usage" in engine.defects:
                completion_tokens = len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
            usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                     "total_tokens": len(prompt_ids) + completion_tokens}
        answer = {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": engine.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": usage,
        }
        if capture is not None:
            answer.update(self._store(capture, ids, steps))
            if self.family == "protocol-v1":
                answer["prompt_token_ids"] = prompt_ids  # protocol 1.1: the ids the model was fed
        self._send(200, answer)

    def _capture_request(self, body: dict):
        engine = self.engine
        options = body.get("capture")
        if options is None and not body.get("store_activations"):
            return None
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise BadRequest(422, "capture must be an object")
        known = {"savepoints", "tokens", "dtype", "format"} | ({"positions"} if self.family == "protocol-v1" else set())
        unknown = set(options) - known
        if unknown:
            raise BadRequest(422, f"unknown capture options {sorted(unknown)}")
        positions = options.get("positions", "generated")
        if positions not in POSITIONS:
            raise BadRequest(422, f"positions must be one of {list(POSITIONS)}, not {positions!r}")
        tokens = options.get("tokens", "all")
        dtype = options.get("dtype", "float32")
        file_format = options.get("format", "pt")
        if tokens not in ("all", "first", "last"):
            raise BadRequest(422, f"tokens must be all, first or last, not {tokens!r}")
        if dtype not in DTYPES:
            raise BadRequest(422, f"dtype must be one of {list(DTYPES)}, not {dtype!r}")
        if file_format not in ("pt", "safetensors"):
            raise BadRequest(422, f"format must be pt or safetensors, not {file_format!r}")
        wanted = options.get("savepoints", [{"name": "_logits", "selector": engine.head_path}])  # the head
        if not isinstance(wanted, list) or not wanted:
            raise BadRequest(422, "savepoints must be a non-empty list")
        savepoints, selectors = [], {}
        for item in wanted:
            if isinstance(item, str):
                name, selector = item, item
            elif isinstance(item, dict) and isinstance(item.get("selector"), str):
                name, selector = item.get("name", item["selector"]), item["selector"]
            else:
                raise BadRequest(422, f"a savepoint is a selector or {{name, selector}}: {item!r}")
            if not isinstance(name, str) or not NAME_RE.fullmatch(name):
                raise BadRequest(422, f"bad savepoint name {name!r}")
            if name in selectors:
                raise BadRequest(422, f"duplicate savepoint name {name!r}")
            module, where = engine.resolve(selector)
            selectors[name] = selector
            savepoints.append((name, module, where))
        if "list_of_steps" in engine.defects:
            raise RuntimeError("cannot save a list of per-step tensors")  # the defect: answered 500
        return {"savepoints": savepoints, "selectors": selectors, "tokens": tokens, "dtype": dtype,
                "format": file_format, "positions": positions}

    def _store(self, capture: dict, ids: list[int], steps: dict) -> dict:
        torch = self.engine.torch
        defects = self.engine.defects
        run_id = uuid.uuid4().hex
        run_dir = self.storage / run_id
        run_dir.mkdir(parents=True)
        meta, files = {}, {}
        for index, (name, _, _) in enumerate(capture["savepoints"]):
            passes = steps[name]
            if capture["positions"] == "prompt":
                tensor = passes[0]  # [1, P, D]: the prefill
            elif capture["positions"] == "sequence":
                tensor = torch.cat(passes, dim=1)  # [1, P + N, D]: the prefill, then each later pass
            else:
                tensor = torch.cat(passes[:len(ids)], dim=1)  # [1, N, D]: the pass that produced each token
            if capture["tokens"] == "first":
                tensor = tensor[:, :1].clone()  # a slice saved as is writes its whole storage
            elif capture["tokens"] == "last":
                tensor = tensor[:, -1:].clone()
            if "probability_logits" in defects and capture["selectors"][name] in (HEAD_ALIAS, self.engine.head_path):
                tensor = tensor.float().softmax(-1)
            tensor = tensor.to(getattr(torch, capture["dtype"])).contiguous()
            if "four_d_logits" in defects:
                tensor = tensor.unsqueeze(2)  # [1, N, 1, D]
            shape = list(tensor.shape)
            stored = tensor[..., :128].contiguous().clone() if "truncated_file" in defects else tensor
            file = f"sp{index}.{capture['format']}"
            if capture["format"] == "pt":
                torch.save(stored, run_dir / file)
            else:
                from safetensors.torch import save_file

                save_file({name: stored}, str(run_dir / file))
            files[name] = file
            numel = math.prod(shape)
            meta[name] = {"shape": shape, "dtype": str(tensor.dtype), "numel": numel,
                          "size_mb": round(numel * tensor.element_size() / 2**20, 2),
                          "file_path": (f"/srv/capture-host/{run_id}/{file}" if "files_elsewhere" in defects
                                        else str(run_dir / file)),
                          "url": f"/v1/activations/{run_id}/{name}",
                          "selector": capture["selectors"][name], "tokens": capture["tokens"],
                          "format": capture["format"], "positions": capture["positions"]}
        (run_dir / "manifest.json").write_text(json.dumps(files))
        if self.family == "store_activations":
            for entry in meta.values():
                for key in ("url", "selector", "tokens", "format", "positions"):
                    entry.pop(key)
            return {"activations_meta": meta}
        return {"activation_run_id": run_id, "completion_token_ids": ids, "activations_meta": meta}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--model-dir", required=True, help="built here on first start; the model id is this path")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="qwen3",
                        help="the family built into an empty --model-dir (a built one is served as it is)")
    parser.add_argument("--storage-dir", default=os.path.join(os.getcwd(), "other-stack-storage"))
    parser.add_argument("--defect", action="append", default=[], choices=DEFECTS)
    parser.add_argument("--family", choices=("protocol-v1", "store_activations"), default="protocol-v1")
    args = parser.parse_args()
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        build_model(model_dir, args.arch)
    Handler.engine = Engine(model_dir, args.model_dir, set(args.defect))
    Handler.family = args.family
    Handler.storage = Path(args.storage_dir)
    Handler.storage.mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"other-stack capture server on http://{args.host}:{args.port} ({args.model_dir})", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
