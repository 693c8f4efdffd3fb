#!/usr/bin/env bash
# The main job: LeNet on MNIST, dense baseline → SSL → fine-tune with frozen zeros → compact
# → sparsity table → measured CPU speedup. Results land in runs/lenet_mnist (or $1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out="${1:-runs/lenet_mnist}"
extra=()
if [ -f "$out/checkpoint/checkpoint.json" ] || [ -f "$out/checkpoint/checkpoint.prev.json" ]; then
  extra+=(--resume)  # interrupted (or finished) before: continue
fi
exec "${STRUCTSPARSE_VENV:-.venv}/bin/structsparse" run recipes/lenet_mnist.yaml --out "$out" "${extra[@]}"
