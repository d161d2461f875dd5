"""Prompts the suites use, chosen so the embedded tiny model and real chat models behave alike.

- ``STORY`` makes any chat model write on for dozens of tokens, so ``max_tokens``
  up to 16 is always reached (the multi-token shapes need exactly N steps).
- ``SHORT_ANSWER`` makes chat models answer in a few tokens and stop (early EOS).
- ``RAW_PROMPT`` is a plain-text opening for ``/test_pure_nnsight`` (no chat template),
  which any base or chat model continues for more than a handful of tokens.
- ``VARIED`` are eight distinct requests for the concurrency and isolation checks.
"""

STORY = "Tell me a short story about a fox."
SHORT_ANSWER = "Say OK."
RAW_PROMPT = "Once upon a time, in a small village by the sea,"

VARIED = [
    "Tell me a short story about a fox.",
    "Say OK.",
    "What is 2+2?",
    "Tell me a short story about a robot.",
    "Name a colour.",
    "Write one sentence about the sea.",
    "Say hello.",
    "Tell me a short story about a river.",
]

# Conversations whose rendering differs by template: one turn, a system prompt, several turns.
CONVERSATIONS = {
    "user": [{"role": "user", "content": STORY}],
    "system+user": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": SHORT_ANSWER},
    ],
    "multi-turn": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": SHORT_ANSWER},
    ],
}
