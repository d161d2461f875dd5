"""The reference server under adversaries, round two (issue 20): stop strings, storage, the small items."""

from __future__ import annotations

import random
import string
import threading
import time

import pytest

from conftest import chat_body
from capture_conformance.reference_server.input_rules import MAX_STOP_CHARS, MAX_STOP_STRINGS

CHAT = "/v1/chat/completions"


@pytest.mark.parametrize("stop,named", [
    (["a"] * (MAX_STOP_STRINGS + 1), f"at most {MAX_STOP_STRINGS}"),
    (["x" * (MAX_STOP_CHARS + 1)], f"limit of {MAX_STOP_CHARS} characters"),
    ("y" * 240_000, f"limit of {MAX_STOP_CHARS} characters"),
    (["ok", ""], "one empty"),
])
def test_stop_strings_over_the_cap_are_422_naming_it(client, stop, named):
    answer = client.post(CHAT, json=chat_body(max_tokens=3, stop=stop))
    assert answer.status_code == 422 and named in answer.json()["detail"], answer.text[:300]


def test_a_one_token_request_is_answered_within_a_second_beside_the_largest_stop_strings(client):
    rng = random.Random(20)
    # The worst case for transformers' tables: long runs of one character (every token overlaps),
    # each string new (its tables are cached per distinct stop list).
    stops = ["a" * (MAX_STOP_CHARS - 8) + "".join(rng.choice(string.ascii_letters) for _ in range(8))
             for _ in range(MAX_STOP_STRINGS)]
    big: dict = {}
    started = threading.Event()

    def run_big():
        started.set()
        big["answer"] = client.post(CHAT, json=chat_body(max_tokens=3, stop=stops))

    thread = threading.Thread(target=run_big)
    thread.start()
    started.wait(5)
    time.sleep(0.05)  # the stop request is on the worker first
    t0 = time.perf_counter()
    small = client.post(CHAT, json=chat_body(max_tokens=1))
    elapsed = time.perf_counter() - t0
    thread.join(60)
    assert small.status_code == 200, small.text
    assert big["answer"].status_code == 200, big["answer"].text
    assert elapsed < 1.0, f"a 1-token request took {elapsed:.2f} s beside 4 stop strings of {MAX_STOP_CHARS} chars"
