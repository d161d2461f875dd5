"""The selector parser and the run store, without a model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from reference_server.errors import NotFound, Unprocessable
from reference_server.selectors import parse_selector
from reference_server.storage import RunStore


@pytest.mark.parametrize("text,path,io", [
    ("lm_head", "lm_head", "output"),
    ("logits", "lm_head", "output"),
    ("model.layers[3]", "model.layers.3", "output"),
    ("model.layers.3.mlp", "model.layers.3.mlp", "output"),
    ("model.layers[3].mlp.input", "model.layers.3.mlp", "input"),
    ("lm_head.output", "lm_head", "output"),
])
def test_selectors_parse_to_module_paths(text, path, io):
    selector = parse_selector(text)
    assert (selector.module_path, selector.io, selector.text) == (path, io, text)


@pytest.mark.parametrize("text", [
    "__import__('os')", "__class__.__init__", "lm_head..output", "model.layers[-1]", "model.layers[1:]",
    "", ".lm_head", "lm_head.", "model._modules", "os.system('x')", "a" * 300, "model layers",
])
def test_hostile_or_malformed_selectors_are_refused(text):
    with pytest.raises(Unprocessable):
        parse_selector(text)


def test_run_is_written_whole_with_a_manifest(tmp_path):
    store = RunStore(tmp_path)
    tensors = {"_logits": torch.randn(1, 3, 10), "h": torch.randn(1, 3, 4).bfloat16()}
    run_id, stored = store.write_run(tensors, "safetensors", extra={"completion_token_ids": [1, 2, 3]})
    manifest = json.loads((tmp_path / run_id / "manifest.json").read_text())
    assert set(manifest["files"]) == {"_logits", "h"}
    assert load_file(str(stored["h"].path))["h"].dtype == torch.bfloat16
    assert stored["_logits"].size_mb == round(30 * 4 / 2**20, 2)
    assert store.file_path(run_id, "h") == stored["h"].path
    assert all(".." not in p.name and p.suffix != ".tmp" for p in (tmp_path / run_id).iterdir())


def test_a_failing_write_leaves_nothing(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    calls = []

    def failing_save(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        torch.save.__wrapped__(obj, path) if hasattr(torch.save, "__wrapped__") else original(obj, path)

    original = torch.save
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        store.write_run({"a": torch.zeros(2), "b": torch.zeros(2)}, "pt")
    assert store.run_ids() == [] and list((tmp_path / ".staging").iterdir()) == []


@pytest.mark.parametrize("run_id,name", [("../x", "a"), ("0" * 32, "a"), ("zz", "a")])
def test_lookups_outside_the_store_are_not_found(tmp_path, run_id, name):
    with pytest.raises(NotFound):
        RunStore(tmp_path).file_path(run_id, name)
