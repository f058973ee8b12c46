#!/usr/bin/env bash
# The GPU check: one command for a lent H100/H200 (about 4 minutes there), or the same
# steps on the CPU at tiny sizes with --cpu-dry-run (to show it works without a GPU).
#
#   bash benchmarks/gpu_check.sh [--wheels DIR] [--out DIR] [--cpu-dry-run]
#
# The device machine has its own torch (never pinned or replaced here), accelerate,
# torchmetrics, tensorboard, safetensors and pytest, but not webdataset, simplejpeg or
# s3fs, and no network: cp312 wheels of what is missing are installed from --wheels
# (default .whl/; download them beforehand with `pip download --no-deps --only-binary=:all:
# --python-version 3.12 ... -d .whl NAME==VERSION`). Steps (benchmarks/gpu_check.py):
# the `gpu` tests, the bf16 matmul peak, a bench_train sweep with MFU against that peak,
# bench_data with device-side augmentation, a short demo run through p2p-train; then one
# JSON line with every figure (also written to OUT/gpu_check.json).
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=.whl
args=()
while [ $# -gt 0 ]; do
    case $1 in
        --wheels) wheels=$2; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
if ls "$wheels"/*.whl >/dev/null 2>&1; then  # no --deps, no index: the folder is the whole set
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/p2p-site "$wheels"/*.whl
    export PYTHONPATH=/tmp/p2p-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
exec python3 benchmarks/gpu_check.py "${args[@]}"
