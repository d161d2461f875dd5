"""Area chat: the OpenAI response, the chat template, ``usage``, ``max_tokens`` and ``stop``."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from capture_conformance.harness.protocol import prompts
from capture_conformance.harness.protocol.checks import expect_client_error, expect_token_counts, usage_diagnosis
from capture_conformance.harness.protocol.responses import Completion
from capture_conformance.harness.protocol.stops import stop_for

pytestmark = pytest.mark.area("chat")


def _needs_tokenizer(ground_truth) -> None:
    if ground_truth.tokenizer is None:
        pytest.skip(f"not verifiable without the model's tokenizer: {ground_truth.tokenizer_note}")


@pytest.mark.smoke
def test_response_is_an_openai_chat_completion(capture_runs, capture_model):
    completion = capture_runs.chat(prompts.STORY, 4)
    body = completion.body
    assert isinstance(body.get("id"), str) and body["id"], f"'id' should be a non-empty string: {body.get('id')!r}"
    assert body.get("object") == "chat.completion", f"'object' should be 'chat.completion': {body.get('object')!r}"
    assert isinstance(body.get("created"), int), f"'created' should be a unix time: {body.get('created')!r}"
    assert body.get("model") == capture_model, f"'model' should echo {capture_model!r}: {body.get('model')!r}"
    choice = completion.choice
    assert choice.get("index") == 0, f"choices[0].index should be 0: {choice}"
    assert choice.get("message", {}).get("role") == "assistant", f"message role should be 'assistant': {choice}"
    assert isinstance(completion.content, str) and completion.content, "the completion's content is empty"
    assert completion.finish_reason in ("stop", "length"), f"finish_reason {completion.finish_reason!r}"
    usage = completion.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, f"usage does not add up: {usage}"
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0, f"usage counts nothing: {usage}"


def test_no_capture_fields_unless_asked(capture_runs):
    body = capture_runs.chat(prompts.STORY, 4).body
    extra = [k for k in ("activations_meta", "activation_run_id") if k in body]
    assert not extra, f"capture was not asked for, yet the response has {extra}: the server captures every request"


@pytest.mark.parametrize("conversation", list(prompts.CONVERSATIONS), ids=list(prompts.CONVERSATIONS))
def test_prompt_tokens_equal_the_chat_template_rendering(capture_runs, ground_truth, conversation):
    _needs_tokenizer(ground_truth)
    messages = prompts.CONVERSATIONS[conversation]
    completion = capture_runs.chat(messages, 2)
    expected = len(ground_truth.prompt_ids(messages))
    got = completion.usage.prompt_tokens
    if got != expected:
        raw = len(ground_truth.tokenizer("\n".join(m["content"] for m in messages), add_special_tokens=False)["input_ids"])
        hint = " (close to the raw contents' length: was the chat template applied?)" if abs(got - raw) < abs(got - expected) else ""
        raise AssertionError(
            f"usage.prompt_tokens is {got}, but the model's chat template renders this conversation to "
            f"{expected} tokens{hint}; raw contents are {raw} tokens")


def test_usage_counts_the_generated_tokens(capture_runs, ground_truth):
    completion = capture_runs.chat(prompts.STORY, 8, store_activations=True)
    expect_token_counts(completion, expected_steps=8, tokenizer=_tokenizer_if_any(ground_truth))
    usage = completion.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, f"usage does not add up: {usage}"


def test_completion_token_ids_decode_to_the_content(capture_runs, ground_truth):
    _needs_tokenizer(ground_truth)
    completion = capture_runs.chat(prompts.STORY, 8, store_activations=True)
    decoded = ground_truth.decode(completion.token_ids)
    assert decoded.strip() == completion.content.strip(), (
        f"completion_token_ids decode to {decoded!r}, the message content is {completion.content!r}")


@pytest.mark.parametrize("max_tokens", [1, 3, 8])
def test_max_tokens_is_honoured(capture_runs, ground_truth, max_tokens):
    completion = capture_runs.chat(prompts.STORY, max_tokens)
    counted = completion.usage.completion_tokens
    if counted != max_tokens:
        # Blame what is measurably wrong: the generated ids may show max_tokens honoured and usage miscounted.
        ids = _generated_ids(capture_runs, max_tokens)
        tokenizer = _tokenizer_if_any(ground_truth)
        if ids is not None and len(ids) == max_tokens:
            raise AssertionError(f"max_tokens={max_tokens} was honoured ({len(ids)} completion_token_ids), but "
                                 + usage_diagnosis(counted, ids, completion.content, tokenizer))
        raise AssertionError(f"max_tokens={max_tokens} on a story prompt gave {counted} tokens"
                             + (f" ({len(ids)} completion_token_ids)" if ids is not None else ""))
    assert completion.finish_reason == "length", (
        f"stopping at max_tokens should give finish_reason 'length', got {completion.finish_reason!r}")


def test_max_completion_tokens_is_honoured(capture_runs, ground_truth):
    completion = capture_runs.chat(prompts.STORY, None, max_completion_tokens=4)
    counted = completion.usage.completion_tokens
    if counted != 4:
        ids = _generated_ids(capture_runs, 4)
        if ids is not None and len(ids) == 4 and len(completion.content) > 0:
            raise AssertionError("max_completion_tokens=4 gave 4 completion_token_ids (max_tokens=4), but "
                                 + usage_diagnosis(counted, ids, completion.content, _tokenizer_if_any(ground_truth)))
        raise AssertionError(f"max_completion_tokens=4 gave {counted} tokens")


def test_stop_string_ends_the_completion_before_it(capture_runs, ground_truth):
    free = capture_runs.chat(prompts.STORY, 16)
    text = free.content
    pick = stop_for(capture_runs, prompts.STORY, free, tokenizer=_tokenizer_if_any(ground_truth))
    assert pick is not None, (
        f"no stop string can be cut at a token boundary of the greedy output {text!r}: every piece occurs earlier")
    stop, expected = pick.stop, pick.expected_content
    stopped = capture_runs.chat(prompts.STORY, 16, stop=[stop])
    assert stopped.finish_reason == "stop", (
        f"stop={stop!r} (the text of generated token {pick.boundary} onwards of the model's own greedy output "
        f"{text!r}) should end with finish_reason 'stop', got {stopped.finish_reason!r} and content {stopped.content!r}")
    assert stopped.content == expected, (
        f"with stop={stop!r} the content should be the greedy text up to it, {expected!r}; got {stopped.content!r}")
    assert free.usage.completion_tokens > 0, (
        f"usage counts nothing: usage.completion_tokens is 0 for the reply {text!r}; cannot tell whether "
        f"stop={stop!r} shortened generation")
    assert stopped.usage.completion_tokens < free.usage.completion_tokens, (
        f"stop={stop!r} did not shorten generation: {stopped.usage.completion_tokens} tokens")


def _generated_ids(capture_runs, max_tokens: int) -> list[int] | None:
    """The ids of the same greedy request, where the server gives any (a capture carries them)."""
    try:
        ids = capture_runs.chat(prompts.STORY, max_tokens, store_activations=True).body.get("completion_token_ids")
    except AssertionError:
        return None
    return ids if isinstance(ids, list) else None


def _tokenizer_if_any(ground_truth):
    try:
        return ground_truth.tokenizer
    except Exception:  # a broken local tokenizer: the server's own prefixes do instead
        return None


def test_greedy_answers_are_deterministic(capture_runs):
    first = capture_runs.chat(prompts.STORY, 8, cached=False)
    second = capture_runs.chat(prompts.STORY, 8, cached=False)
    assert first.content == second.content, (
        f"temperature 0 gave two different answers: {first.content!r} vs {second.content!r}")


def test_explicit_n_1_is_accepted(capture_runs):
    completion = capture_runs.chat(prompts.STORY, 2, n=1)
    assert len(completion.body.get("choices", [])) == 1


@pytest.mark.full
def test_seed_makes_sampling_reproducible(capture_runs):
    runs = [capture_runs.chat(prompts.STORY, 12, temperature=1.5, seed=1234, cached=False) for _ in range(2)]
    assert runs[0].content == runs[1].content, (
        f"the same seed sampled two different answers: {runs[0].content!r} vs {runs[1].content!r}")


# Sampling (spec 1.2). The prompt and lengths keep false alarms negligible: four sampled answers of 16
# tokens at temperature 1.5 all equal to the greedy one needs every one of 64 draws to hit the greedy
# token; even at p = 0.9 per draw that is 0.9^64 = 0.1 %, and 1.5 flattens p well below 0.9.
SAMPLED_TOKENS = 16
SAMPLING_SEEDS = (11, 22, 33, 44)


def test_temperature_samples(capture_runs):
    greedy = capture_runs.chat(prompts.STORY, SAMPLED_TOKENS, temperature=0)
    sampled = [capture_runs.chat(prompts.STORY, SAMPLED_TOKENS, temperature=1.5, seed=s, cached=False)
               for s in SAMPLING_SEEDS]
    assert any(c.content != greedy.content for c in sampled), (
        f"temperature 1.5 gave the greedy answer for all {len(SAMPLING_SEEDS)} seeds: sampling is not honoured "
        f"({greedy.content!r})")


def test_seeded_sampling_is_reproducible_among_concurrent_requests(capture_runs):
    """A seeded request gives its solo answer whatever runs beside it (a generator per request)."""
    def sample(seed):
        extra = {"seed": seed} if seed is not None else {}
        return capture_runs.chat(prompts.STORY, SAMPLED_TOKENS, temperature=1.5, cached=False, **extra).content

    solo = {seed: sample(seed) for seed in SAMPLING_SEEDS[:3]}
    mixed = list(SAMPLING_SEEDS[:3]) + [None, None, None]  # unseeded neighbours draw from their own randomness
    with ThreadPoolExecutor(len(mixed)) as pool:
        answers = list(pool.map(sample, mixed))
    differing = {seed: (solo[seed], answer) for seed, answer in zip(mixed, answers) if seed is not None
                 and answer != solo[seed]}
    assert not differing, (
        f"seeded sampled answers changed when sent concurrently with other sampled requests "
        f"(seed: solo vs concurrent): {differing}")


# -- message forms of current OpenAI clients (protocol 1.1: "Messages") ------------------------------
#
# A server that refuses a form is reported as lacking it ("no list-of-parts content: ..."), with what
# it answered; the bundled reference server accepts them, so there it is a failure.

def _lacks(capture_options, message: str) -> None:
    if capture_options.requires("message_forms"):
        pytest.fail(message + " (required: --require-feature message_forms, or the bundled server)")
    pytest.skip(message)


def _chat_or_lacks(capture_client, capture_options, capture_model, messages, form: str) -> Completion:
    body = {"model": capture_model, "messages": messages, "max_tokens": 4, "temperature": 0.0}
    answer = capture_client.post("/v1/chat/completions", body)
    if answer.status in (400, 422):
        _lacks(capture_options, f"no {form}: {answer.describe()}")
    return Completion(answer.ok_json(), body)


def test_content_as_a_list_of_text_parts_is_the_joined_text(capture_client, capture_options, capture_model,
                                                            capture_runs, ground_truth):
    parts = [{"type": "text", "text": "You are terse."}, {"type": "text", "text": prompts.SHORT_ANSWER}]
    listed = _chat_or_lacks(capture_client, capture_options, capture_model, [{"role": "user", "content": parts}],
                            "list-of-parts content")
    joined = capture_runs.chat([{"role": "user", "content": "\n".join(p["text"] for p in parts)}], 4)
    assert listed.usage.prompt_tokens == joined.usage.prompt_tokens, (
        f"content as two text parts gave prompt_tokens {listed.usage.prompt_tokens}, the same text joined by a "
        f"newline as one string {joined.usage.prompt_tokens}: parts were dropped or joined otherwise")
    if ground_truth.tokenizer is not None:
        expected = len(ground_truth.prompt_ids([{"role": "user", "content": joined.request["messages"][0]["content"]}]))
        assert listed.usage.prompt_tokens == expected, (
            f"list-of-parts prompt_tokens {listed.usage.prompt_tokens}; the chat template renders the joined "
            f"text to {expected} tokens")
    assert listed.content == joined.content, (
        f"under greedy decoding the list-of-parts request answered {listed.content!r}, the joined string "
        f"{joined.content!r}: the model did not see the same prompt")


def test_developer_role_is_read_as_system(capture_client, capture_options, capture_model, capture_runs, ground_truth):
    template = str(getattr(ground_truth.tokenizer, "chat_template", "") or "")
    if "developer" in template:
        pytest.skip("this model's chat template has a 'developer' role of its own; nothing to compare with 'system'")
    conversation = prompts.CONVERSATIONS["system+user"]
    as_developer = [{**conversation[0], "role": "developer"}, *conversation[1:]]
    developer = _chat_or_lacks(capture_client, capture_options, capture_model, as_developer, "'developer' role")
    system = capture_runs.chat(conversation, 4)
    assert developer.usage.prompt_tokens == system.usage.prompt_tokens and developer.content == system.content, (
        f"a 'developer' message gave prompt_tokens {developer.usage.prompt_tokens} and {developer.content!r}; "
        f"the same as 'system' gives {system.usage.prompt_tokens} and {system.content!r}: "
        "'developer' was dropped or rendered as a role the template does not know")


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
], ids=lambda p: p["type"])
def test_a_non_text_part_is_a_client_error_naming_its_type(capture_client, capture_options, capture_model,
                                                          capture_runs, part):
    # Only a server that takes list-of-parts content owes a reason naming the part type.
    _chat_or_lacks(capture_client, capture_options, capture_model,
                   [{"role": "user", "content": [{"type": "text", "text": prompts.SHORT_ANSWER}]}],
                   "list-of-parts content")
    content = [{"type": "text", "text": "What is in this?"}, part]
    answer = capture_client.chat(capture_model, [{"role": "user", "content": content}], 2)
    expect_client_error(answer, (400, 422), mention=part["type"])
    assert capture_runs.chat(prompts.STORY, 1, cached=False).usage.completion_tokens == 1, (
        "after the refused part, a valid request was not served")
