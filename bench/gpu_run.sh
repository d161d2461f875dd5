#!/usr/bin/env bash
# The GPU benchmark as one prepared script: Qwen3-0.6B shape (random weights), bf16, one CUDA device.
#
#   bash bench/gpu_run.sh [extra capture-bench options, e.g. --server-arg=--max-batch=8]
#
# Installs nothing: torch with CUDA and this project's dependencies (transformers,
# nnsight, fastapi, uvicorn, safetensors, requests, filelock, psutil) must already
# be importable by $PYTHON (default: .venv/bin/python if present, else python3).
# Writes bench-results-gpu.json, bench-gpu.log and nvidia-smi.txt into $OUT when
# set (else the current directory). The 1.2 GB model is built under
# $CAPTURE_CONFORMANCE_CACHE (default /tmp/capture-bench-cache), never into $OUT.
# Sized for about 4 minutes on an H100 with a server that runs one request at a
# time (about 3.5 min: build and load ~1 min, latency ~1 min, concurrency ~1.5 min);
# BENCH_TIMEOUT (default 480 s) stops it before the device time runs out.
#
# Tensor parallelism (issue 21) on a box with N >= 2 GPUs: BENCH_TP=N adds a second run of the
# server variants with `capture-server --tp N` (NCCL, one GPU per rank) into
# bench-results-gpu-tpN.json / bench-gpu-tpN.log, same shape and tokens, BENCH_TP_TIMEOUT
# (default 480 s) for it; compare its server-* rows with the first run's (TP=1).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT_DIR="${OUT:-.}"
mkdir -p "$OUT_DIR"
export CAPTURE_CONFORMANCE_CACHE="${CAPTURE_CONFORMANCE_CACHE:-/tmp/capture-bench-cache}"
export PYTHONUNBUFFERED=1

"$PYTHON" - <<'EOF'
import importlib, sys
missing = [m for m in ("torch", "transformers", "nnsight", "fastapi", "uvicorn", "safetensors", "requests",
                       "filelock", "psutil", "tokenizers") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_run.sh: not importable: {', '.join(missing)} (install the carried wheels first)")
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_run.sh: torch sees no CUDA device")
print(f"torch {torch.__version__} CUDA {torch.version.cuda} on {torch.cuda.get_device_name(0)}", flush=True)
EOF
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true

set +e
timeout "${BENCH_TIMEOUT:-480}" "$PYTHON" -m capture_conformance.bench \
    --device cuda --dtype bfloat16 --model-shape qwen3-0.6b \
    --tokens 32 --reps 5 --warmup 1 \
    --concurrency 1,4,8 --concurrency-reps 3 --requests-per-client 2 \
    --out "$OUT_DIR/bench-results-gpu.json" "$@" 2>&1 | tee "$OUT_DIR/bench-gpu.log"
rc=${PIPESTATUS[0]}
set -e
echo "capture-bench exit status: $rc (0 ok, 2 problems reported, 124 timed out)"

if [[ -n "${BENCH_TP:-}" && "${BENCH_TP}" -gt 1 ]]; then
    gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
    if (( gpus < BENCH_TP )); then
        echo "gpu_run.sh: BENCH_TP=$BENCH_TP needs $BENCH_TP GPUs, torch sees $gpus: TP run skipped"
        exit "$rc"
    fi
    set +e
    timeout "${BENCH_TP_TIMEOUT:-480}" "$PYTHON" -m capture_conformance.bench \
        --device cuda --dtype bfloat16 --model-shape qwen3-0.6b --tp "$BENCH_TP" \
        --tokens 32 --reps 5 --warmup 1 --skip-anchors --skip-concurrency \
        --only 'server-none,server-logits-pt,server-logits-layers' \
        --out "$OUT_DIR/bench-results-gpu-tp$BENCH_TP.json" "$@" 2>&1 | tee "$OUT_DIR/bench-gpu-tp$BENCH_TP.log"
    tp_rc=${PIPESTATUS[0]}
    set -e
    echo "capture-bench --tp $BENCH_TP exit status: $tp_rc"
    (( rc == 0 )) && rc=$tp_rc
fi
exit "$rc"
