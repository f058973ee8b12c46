#!/usr/bin/env bash
# The GPU check: every step in about 5.5 minutes on one lent H100 or H200, or the same steps on
# the CPU at tiny sizes with --cpu-dry-run (to show they work without a GPU).
#
#   bash benchmarks/gpu_check.sh --prepare [DIR]   # here: the wheels the GPU image lacks, into
#                                                  # DIR (default .gpu_wheels, git-ignored)
#   OUT=$OUT bash benchmarks/gpu_check.sh [--wheels DIR] [--deadline S] [--only STEP,STEP] [--cpu-dry-run]
#
# The device machine has no network and its own torch (never replaced here), accelerate,
# transformers, torchmetrics, tensorboard, safetensors and pytest, but not webdataset,
# simplejpeg or DeepSpeed: carry DIR in the device call (`carry: [".gpu_wheels"]`, 64 MiB
# in all); its wheels are installed from there alone (--no-index --no-deps) into
# /tmp/p2p-gpu-check/site. Steps, rows and limits: benchmarks/gpu_check.py and
# benchmarks/gpu_check_steps.py; one JSON line per step in $OUT/gpu_check.jsonl as it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
python=$(command -v python3 || command -v python)
if [ "${1:-}" = --prepare ]; then
    exec "$python" benchmarks/gpu_check_wheels.py prepare "${2:-.gpu_wheels}"
fi
exec "$python" benchmarks/gpu_check.py "$@"
