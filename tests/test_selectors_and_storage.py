"""The selector parser and the run store, without a model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from capture_conformance.reference_server.errors import NotFound, StorageFull, Unprocessable
from capture_conformance.reference_server.selectors import parse_selector
from capture_conformance.reference_server.storage import RunStore

from conftest import stored_run_ids


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


def test_a_failing_write_is_507_and_leaves_nothing(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    real_save, calls = torch.save, []

    def save_then_fill_the_disk(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(torch, "save", save_then_fill_the_disk)
    with pytest.raises(StorageFull, match="No space left"):
        store.write_run({"a": torch.zeros(2), "b": torch.zeros(2)}, "pt")
    assert stored_run_ids(store) == [] and list((tmp_path / ".staging").iterdir()) == []


def test_retention_evicts_the_oldest_runs(tmp_path):
    one_run = 4 * 1024 * 4  # bytes of the tensor below
    store = RunStore(tmp_path, max_bytes=int(2.5 * one_run) + 4096, policy="evict")
    runs = [store.write_run({"x": torch.zeros(4, 1024)}, "pt")[0] for _ in range(4)]
    assert stored_run_ids(store) == sorted(runs[2:])
    assert store.used_bytes() <= store.max_bytes


def test_retention_can_refuse_instead(tmp_path):
    store = RunStore(tmp_path, max_bytes=6 * 1024 * 4, policy="refuse")
    kept = store.write_run({"x": torch.zeros(4, 1024)}, "pt")[0]
    with pytest.raises(StorageFull, match="--max-storage-mb"):
        store.write_run({"x": torch.zeros(4, 1024)}, "pt")
    assert stored_run_ids(store) == [kept]
    with pytest.raises(StorageFull, match="larger than the storage limit"):
        RunStore(tmp_path / "b", max_bytes=10, policy="evict").write_run({"x": torch.zeros(8)}, "pt")


@pytest.mark.parametrize("run_id,name", [("../x", "a"), ("0" * 32, "a"), ("zz", "a")])
def test_lookups_outside_the_store_are_not_found(tmp_path, run_id, name):
    with pytest.raises(NotFound):
        RunStore(tmp_path).file_path(run_id, name)


def test_a_file_removed_behind_the_servers_back_is_not_found(tmp_path):
    store = RunStore(tmp_path)
    run_id, stored = store.write_run({"x": torch.zeros(3)}, "pt")
    stored["x"].path.unlink()
    with pytest.raises(NotFound, match="missing"):
        store.file_path(run_id, "x")
