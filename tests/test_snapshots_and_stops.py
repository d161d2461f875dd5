"""Jest-style shape snapshots (record, compare, --ci, update, diff) and token-boundary stop strings."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from capture_conformance.harness.protocol.responses import Completion
from capture_conformance.harness.pytest_plugin.snapshots import SHIPPED_ROOT, ShapeSnapshot, ci_from_env
from capture_conformance.harness.protocol.stops import pick_stop


def _completion(steps: int = 5, vocab: int = 97) -> Completion:
    body = {"usage": {"prompt_tokens": 3, "completion_tokens": steps, "total_tokens": 3 + steps},
            "activations_meta": {"_logits": {"shape": [1, steps, vocab], "dtype": "torch.float32", "tokens": "all",
                                             "selector": "lm_head", "format": "pt"}}}
    return Completion(body, {})


def _snapshot(tmp_path: Path, *, root: Path | None, model: str = "my-org/other-model", ci: bool = False,
              updating: bool = False, name: str = "test_multi_token_capture_matches_snapshot"):
    node = SimpleNamespace(path=tmp_path / "test_multi_token.py", name=name, user_properties=[])
    return ShapeSnapshot(node=node, model_id=model, dims={"V": 97}, root=root, updating=updating, ci=ci), node


def _outcome(node) -> str:
    (value,) = [v for k, v in node.user_properties if k == "capture_snapshot"]
    return value["outcome"]


def test_a_missing_snapshot_is_recorded_in_the_working_directory_then_compared(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snap, node = _snapshot(tmp_path, root=None)
    snap.check(_completion())
    assert _outcome(node) == "recorded"
    recorded = tmp_path / "capture-snapshots" / "my-org--other-model" / "test_multi_token" / (
        "test_multi_token_capture_matches_snapshot.json")
    assert recorded.is_file() and '"symbolic": [\n        1,\n        "N",\n        "V"' in recorded.read_text()
    assert not (SHIPPED_ROOT / "my-org--other-model").exists(), "recorded inside the installed package"
    again, node = _snapshot(tmp_path, root=None)
    again.check(_completion())
    assert _outcome(node) == "compared"


def test_ci_refuses_to_record_and_a_mismatch_shows_the_diff(tmp_path):
    root = tmp_path / "snaps"
    snap, _ = _snapshot(tmp_path, root=root, ci=True)
    with pytest.raises(pytest.fail.Exception, match=r"no shape snapshot for model 'my-org/other-model'.*CI run"):
        snap.check(_completion())
    assert not root.exists()
    _snapshot(tmp_path, root=root)[0].check(_completion(steps=5))
    with pytest.raises(pytest.fail.Exception) as failure:
        _snapshot(tmp_path, root=root, ci=True)[0].check(_completion(steps=4))
    text = str(failure.value)
    assert "differs from its snapshot" in text and '-  "generated_tokens": 5,' in text, text
    assert '+  "generated_tokens": 4,' in text, text
    updater, node = _snapshot(tmp_path, root=root, updating=True)
    updater.check(_completion(steps=4))
    assert _outcome(node) == "updated"
    _snapshot(tmp_path, root=root, ci=True)[0].check(_completion(steps=4))  # now it matches


def test_the_shipped_set_is_read_for_the_bundled_model_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snap, node = _snapshot(tmp_path, root=None, model="tiny-qwen3", ci=True)
    with pytest.raises(pytest.fail.Exception, match="differs from its snapshot"):
        snap.check(_completion(vocab=97))  # the shipped tiny-qwen3 set says 151936, and it was read
    assert not (tmp_path / "capture-snapshots").exists()


def test_ci_comes_from_the_environment_too():
    assert ci_from_env({"CI": "true"}) and ci_from_env({"CI": "1"})
    assert not ci_from_env({}) and not ci_from_env({"CI": "false"})


def _texts(pieces: list[str]):
    return lambda k: "".join(pieces[:k])


def test_stop_strings_are_whole_tokens_without_replacement_characters_or_spaces():
    # a random-weight model: no spaces, repeats; token 2 ends inside a character
    pieces = ["ab", "ab", "c\ufffd", "\ufffdd", "ef"]
    decoded = {k: "".join(pieces[:k]).replace("\ufffd\ufffd", "é") for k in range(6)}
    full = decoded[5]
    pick = pick_stop(full, decoded.__getitem__, 5)
    assert pick is not None and "\ufffd" not in pick.stop and pick.stop == "abcéd", pick
    assert pick.expected_content == "ab" and full.find(pick.stop) == len(pick.expected_content)
    # one token repeated forever: the only stop that is not found earlier is at the very start
    pick = pick_stop("zzzz", _texts(["z"] * 4), 4)
    assert pick is not None and (pick.stop, pick.expected_content, pick.boundary) == ("z", "", 0)
    # readable text keeps working, and a blank piece is never a stop on its own
    pick = pick_stop("Once upon  a", _texts(["Once", " upon", " ", " a"]), 4)
    assert pick is not None and pick.stop == " upon" and pick.expected_content == "Once"
