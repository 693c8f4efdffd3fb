#!/usr/bin/env bash
# Create .venv (or $STRUCTSPARSE_VENV) and install structsparse with its test tools and the ONNX export extra.
# It installs a pinned torch first, so that the package's open torch requirement installs nothing more.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${STRUCTSPARSE_VENV:-.venv}"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  # torch==2.13.0 is the CPU build on the project's machines (served from local disk); a bare
  # `torch` would pull a multi-GB CUDA build. Elsewhere, set TORCH_SPEC (and PIP_EXTRA_INDEX_URL
  # to PyTorch's CPU wheel index on a CPU-only machine).
  torch_spec="${TORCH_SPEC:-torch==2.13.0}"
  echo "setup: installing $torch_spec" >&2
  "${pip[@]}" install "$torch_spec"
fi
# test: pytest, hypothesis; export: onnx, onnxruntime, onnxscript, so that tests/test_export.py runs rather than skips.
"${pip[@]}" install -e ".[test,export]"
"$venv/bin/python" -c "import structsparse, torch; print('setup: structsparse', structsparse.__version__, 'torch', torch.__version__)" >&2
