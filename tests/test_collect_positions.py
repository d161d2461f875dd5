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


# A report as capture-conformance writes it (the fields the provenance reads), written by hand.
REPORT = {"tool": "capture-conformance", "protocol": "1.1", "passed": True, "capture_level": "full", "profile": "full",
          "model": "tiny-qwen3", "target": {"url": "http://127.0.0.1:1"}, "started_at": "2026-01-01T00:00:00Z",
          "tests": [{"outcome": "passed"}, {"outcome": "passed"}, {"outcome": "skipped"}]}


@pytest.fixture(scope="module")
def prompt_run(tmp_path_factory, tiny_model_dir) -> Path:
    """The whole sample with --positions prompt and no --host: the bundled server is started for the run."""
    base = tmp_path_factory.mktemp("collect")
    (base / "conformance-report.json").write_text(json.dumps(REPORT))
    out = base / "gsm-prompt"
    result = collect(out, "--positions", "prompt", "--layers", "1", "--max-tokens", "2",
                     "--conformance-report", str(base / "conformance-report.json"))
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


def test_plot_of_a_whole_collection_run_is_written_beside_it(prompt_run, tmp_path):
    import shutil

    run = tmp_path / "gsm"
    shutil.copytree(prompt_run, run)
    result = plot(str(run))
    png = tmp_path / "gsm.png"
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(png)
    assert _png_height(png) == 600 and png.stat().st_size > 10_000  # the norms over the count panel
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gsm", "gsm.png"]
    from capture_conformance.harness.tools.manifest import verify_run

    assert verify_run(run) == []  # nothing was written into the run
    one = plot(str(run / "files" / "sample-003"))
    assert one.returncode == 0, one.stderr
    assert one.stdout.strip() == str(tmp_path / "gsm.sample-003.png") and _png_height(tmp_path / "gsm.sample-003.png") == 320
    inside = plot(str(run), "--out", str(run / "files" / "sample-003" / "run.png"))
    assert inside.returncode == 2 and "inside" in inside.stderr and "files/" in inside.stderr, inside.stderr
    assert verify_run(run) == []


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


def test_the_collection_records_each_files_size_and_hash_and_its_provenance(prompt_run, tiny_model_dir):
    import hashlib
    from importlib.metadata import version

    settings_bytes = (prompt_run / "settings.json").read_bytes()
    settings = json.loads(settings_bytes)
    rows = [json.loads(line) for line in (prompt_run / "manifest.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["settings_sha256"] == hashlib.sha256(settings_bytes).hexdigest()
        for entry in row["activations"].values():
            data = (prompt_run / entry["file"]).read_bytes()
            assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert settings["first_row"] == {"id": "sample-000", "files": {
        name: {k: e[k] for k in ("file", "size", "sha256")} for name, e in rows[0]["activations"].items()}}
    provenance = settings["provenance"]
    weights = (tiny_model_dir / "model.safetensors").read_bytes()
    assert provenance["model"]["id"] == "tiny-qwen3" and provenance["model"]["revision"] == "unknown"
    assert provenance["model"]["weights"]["sha256"] == {"model.safetensors": hashlib.sha256(weights).hexdigest()}
    assert provenance["model"]["dtype"] == "float32" and provenance["capture_dtype"] == "float32"
    (server,) = provenance["servers"]
    assert server["url"] == rows[0]["server"] and server["health"]["status"] == "ok"
    assert [m["id"] for m in server["models"]["data"]] == ["tiny-qwen3"]
    assert provenance["protocol"] == {"server": server["health"]["protocol"], "harness": "1.1"}
    assert provenance["tool"] == {"name": "capture-collect", "version": version("capture-conformance")}
    report = (prompt_run.parent / "conformance-report.json").read_bytes()
    verdict = provenance["conformance"]
    assert verdict["passed"] is True and verdict["capture_level"] == "full" and verdict["model"] == "tiny-qwen3"
    assert verdict["counts"] == {"passed": 2, "skipped": 1}
    assert verdict["report_sha256"] == hashlib.sha256(report).hexdigest()


def _verify(run: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "capture_conformance.harness.tools.collect", "verify", str(run)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_one_changed_byte_fails_verify_load_run_and_export_naming_the_row(prompt_run, tmp_path):
    import shutil

    from capture_conformance.harness.tools.manifest import RunVerificationError, verify_run

    run = tmp_path / "run"
    shutil.copytree(prompt_run, run)
    clean = _verify(run)
    assert clean.returncode == 0 and clean.stdout == "" and clean.stderr.rstrip().endswith(": ok"), clean.stderr
    rows = [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]
    target = rows[5]["activations"][LAYER]["file"]
    data = bytearray((run / target).read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one value: the size stays
    (run / target).write_bytes(bytes(data))

    result = _verify(run)
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [f"{run}: row 'sample-005': {target}: hash mismatch: "
                                          + result.stdout.split("hash mismatch: ", 1)[1].rstrip("\n")]
    with pytest.raises(RunVerificationError, match="sample-005") as refused:
        load_run(run)
    assert refused.value.rows == ["sample-005"]
    assert len(load_run(run, verify=False).rows) == 24  # the check is what refuses it
    export = subprocess.run([sys.executable, "-m", "capture_conformance.harness.tools.collect", "export", str(run),
                             "--to", "numpy", "--out", str(tmp_path / "npz")], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert export.returncode == 1 and "sample-005" in export.stderr and not (tmp_path / "npz").exists()

    # the other ways a run goes wrong, each named by row and kind
    (run / rows[2]["activations"][LAYER]["file"]).write_bytes(b"cut")
    (run / rows[7]["activations"][LAYER]["file"]).unlink()
    rows[9]["activations"] = {}
    (run / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = {(p.row, p.kind) for p in verify_run(run)}
    assert found == {("sample-005", "hash mismatch"), ("sample-002", "size mismatch"), ("sample-007", "missing file"),
                     ("sample-009", "row without files"),
                     (None, "unlisted file")}, found  # sample-009's file, now listed by no row
    with pytest.raises(RunVerificationError) as refused:
        load_run(run)
    assert refused.value.rows == ["sample-002", "sample-007", "sample-009"]  # sizes first: nothing is read yet
    settings = json.loads((run / "settings.json").read_text())
    (run / "settings.json").write_text(json.dumps({**settings, "dtype": "bfloat16"}))
    mismatched = {p.row for p in verify_run(run) if p.kind == "settings mismatch"}
    assert mismatched == {r["id"] for r in rows}  # every row was collected under the other settings.json


def test_collect_export_to_datasets_load_and_the_readme_probe(prompt_run, tmp_path):
    import datasets

    out = tmp_path / "gsm-prompt.hf"
    export = subprocess.run([sys.executable, "-m", "capture_conformance.harness.tools.collect", "export",
                             str(prompt_run), "--to", "datasets", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert export.returncode == 0, export.stderr
    ds = datasets.load_from_disk(str(out))
    run = load_run(prompt_run)
    assert ds["id"] == run.ids and ds["correct"] == run.correct.tolist()
    described = json.loads(ds.info.description)
    assert described["settings"] == run.settings and described["settings"]["provenance"]["model"]["id"] == "tiny-qwen3"

    readme = (REPO / "README.md").read_text()
    probe = re.search(r"<!-- probe-example -->\n```python\n(.*?)```", readme, re.S).group(1)
    loader = re.search(r"<!-- probe-from-datasets -->\n```python\n(.*?)```", readme, re.S)
    assert loader, "README.md has no probe-from-datasets example"
    from_run = probe.replace('"runs/gsm-prompt"', repr(str(prompt_run)))
    from_export = (loader.group(1).replace('"runs/gsm-prompt.hf"', repr(str(out)))
                   + probe.split("y = run.correct", 1)[1].split("\n", 1)[1])
    results = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
               for code in (from_run, from_export)]
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    assert "held-out accuracy" in results[1].stdout and results[1].stdout == results[0].stdout


@pytest.mark.parametrize("fmt", ["safetensors", "numpy"])
def test_shard_exports_read_back_equal_and_a_changed_shard_is_refused(prompt_run, tmp_path, fmt):
    from capture_conformance.harness.tools.dataset import load_export
    from capture_conformance.harness.tools.export import ExportError

    run = load_run(prompt_run)
    out = getattr(run, f"to_{fmt}")(tmp_path / fmt, shard_bytes=300_000)
    index = json.loads((out / "index.json").read_text())
    assert len(index["shards"]) > 1 and index["settings"] == run.settings
    back = load_export(out)
    assert back.ids == run.ids and back.correct.tolist() == run.correct.tolist() and back.prompts == run.prompts
    assert all(np.array_equal(a, b) for a, b in zip(back.arrays[LAYER], run.arrays[LAYER], strict=True))
    shard = out / index["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=re.escape(shard.name)):
        load_export(out)
