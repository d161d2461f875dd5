"""Area positions (protocol 1.1, optional): prompt and whole-sequence capture (``capture.positions``).

``"prompt"`` is ``[1, P, D]`` over the prompt, ``"sequence"`` is ``[1, P+N, D]`` over
prompt and completion, the last completion token included; both agree with the
``"generated"`` capture where they overlap. A server without the feature (it says
so in ``/v1/models`` ``capture.features``, or its answer shows it) is reported as
"no prompt capture", not failed; the bundled reference server has it, so there
the same finding is a failure. A 4xx that the same savepoints also get without
``capture.positions`` is a request the server refuses (a selector it does not
have, say), never a missing feature; and a server that lists the feature in
``capture.features`` fails, not skips, when it then refuses it.

The savepoints are the model's head and first block, as ``model_layout``
discovered them.
"""

from __future__ import annotations

import numpy as np
import pytest

from capture_conformance.harness.protocol import prompts
from capture_conformance.harness.protocol.checks import expect_argmax_matches, expect_close, expect_token_counts, rounding_tolerance, symbolic
from capture_conformance.harness.protocol.dialects import V1, missing
from capture_conformance.harness.protocol.responses import Completion, field
from capture_conformance.harness.protocol.tensors import LoadedTensor

pytestmark = pytest.mark.area("positions")

STEPS = 5
HEAD, LAYER = "head", "layer_0"  # the savepoints' names; their selectors come from the model's layout
SAVEPOINTS = [HEAD, LAYER]
FEATURE = {"prompt": "prompt", "sequence": "sequence"}


def _lacking(capture_options, feature: str, message: str) -> None:
    message = f"no prompt capture: {message}"
    if capture_options.requires(feature):
        pytest.fail(message + f" (required: --require-feature {feature}, or the bundled server)")
    pytest.skip(message)


def _advertised_features(capture_client, capture_model) -> list | None:
    features = (capture_client.capture_block(capture_model) or {}).get("features")
    return features if isinstance(features, list) else None


class Positions:
    """Greedy captures of one prompt at each position kind, asked once per session and shared."""

    def __init__(self, capture_runs, capture_client, capture_options, capture_model, capture_dialect, layout):
        if capture_dialect != V1:  # no per-request `capture` object there, let alone its positions
            missing("no prompt capture (capture.positions of protocol 1.1)", capture_dialect)
        self.runs = capture_runs
        self.client = capture_client
        self.options = capture_options
        self.features = _advertised_features(capture_client, capture_model)
        self.selectors = {HEAD: layout.head, LAYER: layout.block(0)}

    def completion(self, positions: str, *, savepoints=SAVEPOINTS, steps: int = STEPS, tokens: str | None = None,
                   prompt: str = prompts.STORY) -> Completion:
        savepoints = [{"name": name, "selector": self.selectors[name]} for name in savepoints]
        if positions != "generated" and self.features is not None and FEATURE[positions] not in self.features:
            _lacking(self.options, FEATURE[positions], f"/v1/models capture.features is {self.features}, without {positions!r}")
        capture = {"savepoints": savepoints, **({"positions": positions} if positions != "generated" else {}),
                   **({"tokens": tokens} if tokens else {})}
        body = self.runs.request_body(prompt, steps, capture=capture)
        answer = self.client.post("/v1/chat/completions", body) if positions != "generated" else None
        if answer is not None and answer.status != 200:
            if 400 <= answer.status < 500:
                self._refused(positions, body, answer)
            answer.ok_json()  # a 5xx is a defect: fails with what the server said
        completion = (Completion(answer.ok_json(), body) if answer is not None
                      else self.runs.chat(prompt, steps, capture=capture))
        if positions != "generated":
            meta = completion.meta
            if meta and not any("positions" in m.raw for m in meta.values()):
                shapes = {name: m.raw.get("shape") for name, m in meta.items()}
                _lacking(self.options, FEATURE[positions], f"asked with capture.positions={positions!r}, the answer's activations_meta "
                                      f"has no 'positions' (shapes {shapes}): the option was ignored")
        return completion

    def _refused(self, positions: str, body: dict, answer) -> None:
        """A 4xx to a positions request: a missing feature only when the request is fine without the option."""
        said = f"asked with capture.positions={positions!r}, {answer.describe()}"
        plain = {**body, "capture": {k: v for k, v in body["capture"].items() if k != "positions"}}
        without = self.client.post("/v1/chat/completions", plain)
        if without.status != 200:  # (a run it stored is deleted at the end like every other: the ledger saw it)
            pytest.fail(f"{said}; the same request without capture.positions is refused too "
                        f"({without.describe()}): the request itself is refused (savepoints "
                        f"{[s['selector'] for s in body['capture']['savepoints']]}), not a missing feature")
        if self.features is not None and FEATURE[positions] in self.features:
            pytest.fail(f"{said}, although /v1/models capture.features lists {FEATURE[positions]!r}")
        _lacking(self.options, FEATURE[positions], said)

    def tensor(self, completion: Completion, name: str) -> LoadedTensor:
        return self.runs.tensor(completion, name)


@pytest.fixture(scope="module")
def positions(capture_runs, capture_client, capture_options, capture_model, capture_dialect, model_layout) -> Positions:
    return Positions(capture_runs, capture_client, capture_options, capture_model, capture_dialect, model_layout)


def prompt_len(completion: Completion, ground_truth) -> int:
    """P from ``usage.prompt_tokens``, checked against ``prompt_token_ids`` and the harness's own rendering."""
    p = completion.usage.prompt_tokens
    ids = field(completion.body, "prompt_token_ids", list)
    assert len(ids) == p, f"usage.prompt_tokens is {p} but prompt_token_ids has {len(ids)} ids"
    rendered = ground_truth.prompt_ids(completion.request["messages"])
    if rendered is not None:
        assert ids == rendered, (
            f"prompt_token_ids ({len(ids)} ids) are not the chat-template rendering of the prompt "
            f"({len(rendered)} ids): {ids[:12]}... vs {rendered[:12]}...")
    return p


def _width(ground_truth, name: str) -> int:
    return ground_truth.vocab_size if name == HEAD else ground_truth.hidden_size


@pytest.mark.parametrize("kind", ["prompt", "sequence"])
def test_shapes_count_the_prompt_positions(positions, ground_truth, kind):
    completion = positions.completion(kind)
    n = expect_token_counts(completion, expected_steps=STEPS)
    p = prompt_len(completion, ground_truth)
    length = p if kind == "prompt" else p + n
    for name in SAVEPOINTS:
        meta = completion.savepoint(name)
        expected = [1, length, _width(ground_truth, name)]
        hint = ""
        if kind == "sequence" and meta.shape[1:2] == [p + n - 1]:
            hint = " (one short: the last completion token, which generation never feeds, is missing)"
        assert meta.shape == expected, (
            f"positions={kind!r}: `{name}` is {meta.shape} = {symbolic(meta.shape, ground_truth)}, expected "
            f"{expected} = {symbolic(expected, ground_truth)} with P={p} (usage.prompt_tokens) and N={n}{hint}")
        assert meta.raw.get("positions") == kind, f"`{name}` metadata says positions={meta.raw.get('positions')!r}"
        tensor = positions.tensor(completion, name)
        assert list(tensor.shape) == expected, f"`{name}`: the stored tensor is {list(tensor.shape)}, metadata {expected}"


def test_the_prompts_last_position_is_generated_step_0(positions, ground_truth):
    prompt = positions.completion("prompt")
    generated = positions.completion("generated")
    assert prompt.token_ids == generated.token_ids, "the same greedy request generated other ids with positions=prompt"
    p = prompt_len(prompt, ground_truth)
    rtol, atol = rounding_tolerance("float32")
    for name in SAVEPOINTS:
        whole = positions.tensor(prompt, name).values
        assert whole.shape[1] == p, f"`{name}` has {whole.shape[1]} prompt positions, P={p}"
        step0 = positions.tensor(generated, name).values[:, :1]
        if not np.allclose(whole[:, p - 1:p], step0, rtol=rtol, atol=atol) and p > 1 and np.allclose(
                whole[:, p - 2:p - 1], step0, rtol=rtol, atol=atol):
            raise AssertionError(f"`{name}`: prompt position P-2 holds generated step 0: the prompt capture is "
                                 f"shifted by one position (position j holds j+1)")
        expect_close(whole[:, p - 1:p], step0, what=f"`{name}` prompt position P-1={p - 1} vs generated step 0",
                     rtol=rtol, atol=atol)


def test_sequence_positions_p_minus_1_on_are_the_generated_steps(positions, ground_truth):
    sequence = positions.completion("sequence")
    generated = positions.completion("generated")
    assert sequence.token_ids == generated.token_ids, "the same greedy request generated other ids with positions=sequence"
    p, n = prompt_len(sequence, ground_truth), len(sequence.token_ids)
    rtol, atol = rounding_tolerance("float32")
    for name in SAVEPOINTS:
        whole = positions.tensor(sequence, name).values
        assert whole.shape[1] >= p + n - 1, f"`{name}` has {whole.shape[1]} positions for P={p}, N={n}"
        steps = positions.tensor(generated, name).values
        expect_close(whole[:, p - 1:p + n - 1], steps, what=f"`{name}` sequence positions {p - 1}..{p + n - 2} vs "
                     f"generated steps 0..{n - 1}", rtol=rtol, atol=atol)


def test_greedy_sequence_logits_argmax_to_the_completion(positions, ground_truth):
    sequence = positions.completion("sequence")
    p, n = prompt_len(sequence, ground_truth), len(sequence.token_ids)
    logits = positions.tensor(sequence, HEAD)
    values = logits.values[:, p - 1:p + n - 1]
    window = LoadedTensor(logits.dtype, tuple(values.shape), values)
    expect_argmax_matches(window, sequence.token_ids,
                          name=f"{positions.selectors[HEAD]} positions {p - 1}..{p + n - 2}")


@pytest.mark.parametrize("tokens", ["first", "last"])
def test_first_and_last_pick_the_ends_of_the_prompt(positions, tokens):
    whole = positions.completion("prompt", savepoints=[LAYER])
    one = positions.completion("prompt", savepoints=[LAYER], tokens=tokens)
    values = positions.tensor(whole, LAYER).values
    single = positions.tensor(one, LAYER).values
    rtol, atol = rounding_tolerance("float32")
    expect_close(single, values[:, :1] if tokens == "first" else values[:, -1:],
                 what=f"positions=prompt tokens={tokens!r} vs the {tokens} prompt position", rtol=rtol, atol=atol)
