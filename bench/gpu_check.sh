#!/usr/bin/env bash
# The one prepared device check (see bench/gpu_check.py): run it on a lent GPU from the repository
# root, in one call (expected about 5 minutes on an H100 or H200, stopped at 540 s; carry .device);
# `bash bench/gpu_check.sh --dry-run` checks it on CPU.
#
# The device machine has torch, triton and transformers but not this package's other
# dependencies, so nothing is installed: the package is laid out as the wheel lays it out
# (kernels/ becomes hybridkv_sglang.kernels) in a temporary folder on PYTHONPATH. SGLang's Triton
# decode kernel comes from .device/ (`python bench/device_sglang.py stage .device` where sglang
# is installed; carried beside the tree) unless sglang itself is importable. Results go to $OUT
# when the device tool sets it, else bench/results (a dry run: a temporary folder).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp -r hybridkv_sglang "$stage/hybridkv_sglang"
rm -rf "$stage/hybridkv_sglang/kernels"
cp -r kernels "$stage/hybridkv_sglang/kernels"
sglang_stage=""
if [[ -d .device/sglang ]]; then
    sglang_stage="$(pwd)/.device"
fi
export PYTHONPATH="$stage${sglang_stage:+:$sglang_stage}${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
if [[ "${1:-}" != "--dry-run" ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout 540 "$PYTHON" bench/gpu_check.py "$@"
