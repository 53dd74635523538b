#!/usr/bin/env bash
# Build (or verify) the CPU development environment in .venv/: CPU torch, SGLang without its
# CUDA-only dependencies, the two CPU work-arounds of devtools/, and this package installed
# editable. Idempotent: a stamp of the inputs makes a second run return in well under a second.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HYBRIDKV_VENV:-$ROOT/.venv}"
PYTHON="${HYBRIDKV_PYTHON:-python3.11}"
TORCH_SPEC="${HYBRIDKV_TORCH_SPEC:-torch==2.13.0}"
SGLANG_SPEC="sglang==0.5.23"
TORCHVISION_SPEC="torchvision==0.28.0"
STAMP="$VENV/.hybridkv-env-stamp"

inputs_hash() {
    cat "$ROOT/devtools/setup_cpu_env.sh" "$ROOT/devtools/cpu_requirements.py" \
        "$ROOT/pyproject.toml" "$ROOT"/devtools/sgl_kernel_stub/*.py \
        "$ROOT/devtools/sgl_kernel_stub/pyproject.toml" "$ROOT/devtools/torchvision_cpu_fix.py" \
        | sha256sum | cut -d' ' -f1
    echo "$TORCH_SPEC $SGLANG_SPEC $TORCHVISION_SPEC"
}
WANT="$(inputs_hash)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
    exit 0
fi

echo "[setup] building the CPU environment in $VENV (a few minutes on a fresh machine)"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

"${PIP[@]}" --upgrade "pip>=24" "setuptools>=68" wheel
"${PIP[@]}" "$TORCH_SPEC"
"${PIP[@]}" --no-deps "$SGLANG_SPEC"

CONSTRAINTS="$(mktemp)"
REQUIREMENTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS" "$REQUIREMENTS"' EXIT
"$VENV/bin/python" -c "import torch; print(f'torch=={torch.__version__.split(\"+\")[0]}')" >"$CONSTRAINTS"
"$VENV/bin/python" "$ROOT/devtools/cpu_requirements.py" >"$REQUIREMENTS"
# pip reports SGLang's missing CUDA-only requirements ("requires ... not installed"): expected.
# Video: SGLang decodes with torchcodec, which needs the system's FFmpeg libraries, else with
# decord, whose wheel bundles FFmpeg (0.6.0 is the last release; it works with numpy 2). PyAV
# (its wheels bundle FFmpeg too; SGLang's own pin) encodes the test videos.
"${PIP[@]}" -c "$CONSTRAINTS" -r "$REQUIREMENTS" triton "$TORCHVISION_SPEC" \
    pytest hypothesis ruff matplotlib tqdm requests openai \
    "decord==0.6.0; platform_machine == 'x86_64'" av==16.1.0 2>&1 | grep -v "not installed" || true

"$VENV/bin/python" "$ROOT/devtools/torchvision_cpu_fix.py"
"$VENV/bin/python" "$ROOT/devtools/sgl_kernel_stub/generate_op_names.py"
"${PIP[@]}" --no-deps --no-build-isolation "$ROOT/devtools/sgl_kernel_stub"
"${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT"

"$VENV/bin/python" - <<'PY'
import sglang, torch, triton, torchvision.transforms, sgl_kernel, hybridkv_sglang  # noqa: F401
import decord, av  # noqa: F401  (video decoding for SGLang, encoding for the test videos)
from importlib.metadata import entry_points
assert any(ep.name == "hybridkv" for ep in entry_points(group="sglang.srt.plugins")), "plugin entry point missing"
print(f"[setup] ok: torch {torch.__version__}, sglang {sglang.__version__}, triton {triton.__version__}")
PY
echo "$WANT" >"$STAMP"
