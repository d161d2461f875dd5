"""capture-collect with positions, settings and the bundled server; the loader; the README's probe example."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from capture_conformance.harness.tools.dataset import load_run

REPO = Path(__file__).resolve().parent.parent
SAMPLE = str(REPO / "fixtures" / "gsm8k_sample.jsonl")
LAYER = "layer_1"  # --layers 1: the second block, whatever the model calls its block stack


def collect(out: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "capture_conformance.harness.tools.collect", "--input", SAMPLE, "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def prompt_run(tmp_path_factory, tiny_model_dir) -> Path:
    """The whole sample with --positions prompt and no --host: the bundled server is started for the run."""
    out = tmp_path_factory.mktemp("collect") / "gsm-prompt"
    result = collect(out, "--positions", "prompt", "--layers", "1", "--max-tokens", "2")
    assert result.returncode == 0, result.stderr
    assert "starting the bundled reference server" in result.stderr, result.stderr
    return out


def test_prompt_positions_write_one_p_by_h_file_per_problem(prompt_run):
    rows = [json.loads(line) for line in (prompt_run / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    settings = json.loads((prompt_run / "settings.json").read_text())
    assert settings["positions"] == "prompt" and settings["layers"] == [1] and settings["max_tokens"] == 2
    assert settings["selectors"] == ["layer_1=model.layers[1]"]  # tiny-qwen3 is a Qwen3: blocks in model.layers
    for row in rows:
        p = row["usage"]["prompt_tokens"]
        assert row["positions"] == "prompt" and len(row["prompt_token_ids"]) == p
        assert row["activations"][LAYER]["shape"] == [1, p, 256]
        assert (prompt_run / row["activations"][LAYER]["file"]).is_file()
    assert len({r["usage"]["prompt_tokens"] for r in rows}) > 1  # ragged: the loader must handle it


def test_the_loader_aligns_arrays_with_the_rows_and_pads_ragged_lengths(prompt_run, tmp_path):
    run = load_run(prompt_run)
    rows = [json.loads(line) for line in (prompt_run / "manifest.jsonl").read_text().splitlines()]
    assert run.ids == [r["id"] for r in rows] and run.prompts == [r["prompt"] for r in rows]
    assert run.correct.tolist() == [r["correct"] for r in rows]
    lengths = [r["usage"]["prompt_tokens"] for r in rows]
    values, mask = run.padded(LAYER)
    assert values.shape == (24, max(lengths), 256) and mask.sum(1).tolist() == lengths
    third = run.arrays[LAYER][3]
    assert np.array_equal(values[3, : lengths[3]], third) and not values[3, lengths[3]:].any()
    assert np.array_equal(run.last(LAYER)[3], third[-1])
    exported = run.to_numpy(tmp_path / "npz", shard_bytes=200_000)  # several shards of whole rows
    shards = sorted(p.name for p in exported.glob("shard-*.npz"))
    assert len(shards) > 1, shards
    with np.load(exported / shards[0], allow_pickle=False) as saved:  # the plain layout, read without the loader
        offsets = saved["layer_1.offsets"]
        assert offsets[0] == 0 and np.diff(offsets).tolist() == lengths[: len(offsets) - 1]
        assert np.array_equal(saved["layer_1"][offsets[1]:offsets[2]], run.arrays[LAYER][1])


def test_the_readme_probe_example_runs_as_written(prompt_run, tmp_path):
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- probe-example -->\n```python\n(.*?)```", readme, re.S)
    assert block, "README.md has no probe example"
    code = block.group(1).replace('"runs/gsm-prompt"', repr(str(prompt_run)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    labels = load_run(prompt_run).correct
    warning = f"warning: all 24 labels are {bool(labels[0])}: the probe cannot learn anything from them\n"
    one_class = bool(labels.all() or not labels.any())
    assert result.stdout.startswith(warning) == one_class, (one_class, result.stdout)
    rest = result.stdout[len(warning):] if one_class else result.stdout
    assert re.fullmatch(r"held-out accuracy \d\.\d\d on 8 problems\n", rest), result.stdout


def test_resume_with_other_settings_is_refused_naming_the_difference(prompt_run):
    result = collect(prompt_run, "--positions", "prompt", "--layers", "1", "--max-tokens", "2",
                     "--dtype", "bfloat16", "--resume", "--host", "127.0.0.1", "--port", "9")
    assert result.returncode == 2, result.stderr
    assert "--resume would mix settings" in result.stderr
    assert "dtype: 'float32' in the run, 'bfloat16' now" in result.stderr, result.stderr


def test_an_unreachable_host_stops_at_once_with_one_line(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = collect(tmp_path / "out", "--host", "127.0.0.1", "--port", str(port), timeout=60)
    assert result.returncode == 2
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"capture-collect: http://127.0.0.1:{port} is unreachable"), lines


def test_a_client_error_every_request_repeats_stops_the_run(tmp_path):
    from conftest import ServerProcess

    (tmp_path / "server").mkdir()
    server = ServerProcess(tmp_path / "server")
    try:
        server.wait_ready()
        out = tmp_path / "bad"
        result = collect(out, "--url", server.url, "--savepoints", "model.layers[99]", "--max-tokens", "2")
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("the server refused the request") == 1, result.stderr
        assert "model.layers[99]" in result.stderr and "stopped" in result.stderr
        assert "--resume" not in result.stderr
        # No row, so no settings.json (issue 22): the successful run into the same directory writes its own.
        assert not (out / "settings.json").exists() and not (out / "manifest.jsonl").read_text().strip()
        again = collect(out, "--url", server.url, "--layers", "1", "--max-tokens", "2", "--limit", "1")
        assert again.returncode == 0, again.stderr
        settings = json.loads((out / "settings.json").read_text())
        assert settings["savepoints"] is None and settings["selectors"] == ["layer_1=model.layers[1]"], settings
        assert load_run(out).savepoints == [LAYER]
        with pytest.raises(KeyError, match=r"no savepoint 'layers1' .* it has \['layer_1'\]"):
            load_run(out).last("layers1")
        # bfloat16 files load (numpy cannot read them itself) and match a float32 run within bf16 rounding.
        for dtype in ("float32", "bfloat16"):
            done = collect(tmp_path / dtype, "--url", server.url, "--layers", "1", "--max-tokens", "3",
                           "--limit", "2", "--dtype", dtype, "--format", "safetensors")
            assert done.returncode == 0, done.stderr
        wide, narrow = load_run(tmp_path / "float32"), load_run(tmp_path / "bfloat16")
        assert wide.settings["dtype"] == "float32" and narrow.settings["dtype"] == "bfloat16"
        for a, b in zip(wide.arrays[LAYER], narrow.arrays[LAYER]):
            assert b.dtype == np.float32 and a.shape == b.shape
            np.testing.assert_allclose(b, a, rtol=2e-2, atol=2e-2)
        assert not list(server.storage.glob("*/manifest.json")), "downloaded runs were left on the server"
        # Two servers (here one, under two names) and two requests in flight each: one manifest, rows say who served.
        port = server.url.rsplit(":", 1)[1]
        both = collect(tmp_path / "both", "--url", server.url, "--url", f"http://localhost:{port}", "--concurrency",
                       "2", "--layers", "1", "--max-tokens", "3", "--limit", "6", "--format", "safetensors")
        assert both.returncode == 0, both.stderr
        rows = [json.loads(line) for line in (tmp_path / "both" / "manifest.jsonl").read_text().splitlines()]
        assert sorted(r["id"] for r in rows) == [f"sample-{i:03d}" for i in range(6)]
        assert {r["server"] for r in rows} == {server.url, f"http://localhost:{port}"}
        by_id = {r["id"]: r for r in rows}
        for row, values in zip(wide.rows, wide.arrays[LAYER]):  # concurrent rows equal the one-at-a-time run
            assert by_id[row["id"]]["completion_token_ids"] == row["completion_token_ids"]
            assert np.allclose(load_run(tmp_path / "both").arrays[LAYER][rows.index(by_id[row["id"]])], values,
                               rtol=1e-4, atol=1e-4)
        first = by_id["sample-000"]
        assert first["prompt"] in first["prompt_text"] and first["prompt_text"] != first["prompt"]
        _interrupted_run_ends_with_one_line_and_no_orphans(server, tmp_path / "interrupted")
    finally:
        server.stop()


def _interrupted_run_ends_with_one_line_and_no_orphans(server, out: Path) -> None:
    """Ctrl-C (SIGINT) once a row is in: exit 130, one line with the resume hint, no traceback, no orphan files."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "capture_conformance.harness.tools.collect", "--input", SAMPLE,
                             "--out", str(out), "--url", server.url, "--layers", "1", "--max-tokens", "48",
                             "--concurrency", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 300
    while not (manifest.is_file() and manifest.read_text().strip()):  # until the first row is on disk
        assert proc.poll() is None and time.monotonic() < deadline, "the collection ended before any row"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted;" in stderr and "--resume" in stderr, stderr
    kept = {json.loads(line)["id"] for line in manifest.read_text().splitlines()}
    assert 0 < len(kept) < 24
    on_disk = {d.name for d in (out / "files").iterdir()}
    assert on_disk <= kept, f"files of problems with no row: {sorted(on_disk - kept)}"


def _png_height(path: Path) -> int:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[20:24], "big")


def plot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "capture_conformance.harness.tools.plot", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_plot_draws_prompt_positions_and_refuses_top1_without_lm_head(prompt_run, tmp_path):
    problem = prompt_run / "files" / "sample-000"
    result = plot(str(problem), "--out", str(tmp_path / "one.png"))
    assert result.returncode == 0, result.stderr
    assert "no logits savepoint, so no top-1 probability or entropy" in result.stderr
    assert _png_height(tmp_path / "one.png") == 320  # one panel (norms), not three


def test_plot_of_a_whole_collection_run(prompt_run, tmp_path):
    result = plot(str(prompt_run), "--out", str(tmp_path / "all.png"))
    assert result.returncode == 0, result.stderr
    assert _png_height(tmp_path / "all.png") == 450 and (tmp_path / "all.png").stat().st_size > 10_000


def test_plot_of_a_sequence_problem_knows_its_tokens_and_where_the_completion_starts(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from capture_conformance.harness.tools.plot import run_info, token_labels

    prompt_ids, completion_ids = [11, 12, 13, 14, 15, 16], [21, 22, 23, 24]
    out = tmp_path / "seq"
    files = out / "files" / "p-1"
    files.mkdir(parents=True)
    torch.manual_seed(0)
    save_file({"_logits": torch.randn(1, 10, 50)}, str(files / "_logits.safetensors"))
    save_file({"h": torch.randn(1, 10, 8)}, str(files / "h.safetensors"))
    (out / "settings.json").write_text(json.dumps({"model": "tiny-qwen3", "positions": "sequence"}))
    row = {"id": "p/1", "positions": "sequence", "prompt_token_ids": prompt_ids, "completion_token_ids": completion_ids,
           "activations": {"_logits": {"file": "files/p-1/_logits.safetensors"},
                           "h": {"file": "files/p-1/h.safetensors"}}}
    (out / "manifest.jsonl").write_text(json.dumps(row) + "\n")
    info = run_info(files)
    assert info.positions == "sequence" and info.prompt_ids == prompt_ids and info.completion_ids == completion_ids
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert token_labels(info, 10) == [repr(tok.decode([i]))[1:-1] or "·" for i in prompt_ids + completion_ids]
    result = plot(str(files), "--out", str(tmp_path / "seq.png"))
    assert result.returncode == 0, result.stderr
    assert _png_height(tmp_path / "seq.png") == 860  # top-1, entropy and norms


def test_the_datasets_export_has_one_row_per_problem(prompt_run, monkeypatch):
    import types

    made = {}

    class Dataset:
        @staticmethod
        def from_dict(columns):
            made.update(columns)
            return "dataset"

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(Dataset=Dataset))
    run = load_run(prompt_run)
    assert run.to_datasets() == "dataset"
    assert made["id"] == run.ids and made["correct"] == run.correct.tolist() and made["prompt"] == run.prompts
    assert [np.asarray(v).shape for v in made[LAYER]] == [a.shape for a in run.arrays[LAYER]]
