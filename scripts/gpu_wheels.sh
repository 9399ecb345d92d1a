#!/usr/bin/env bash
# For a GPU machine that has PyTorch but not this project's other packages, and no network (a rented or lent
# cloud GPU): download here, where the package registry is reachable, the wheels that the GPU checks need into
# .whl/ (git-ignored); scripts/gpu_checks.sh installs them from there, offline, into a folder of its own.
# Only pure-Python packages at this project's pins, plus regex (transformers checks its version at import), for
# CPython 3.12 on x86-64 Linux by default. torch is not among them: the GPU machine's own CUDA build is used.
#   scripts/gpu_wheels.sh [PYTHON_VERSION]   (default 3.12; about 22 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
python_version="${1:-3.12}"
python=.venv/bin/python; [ -x "$python" ] || python=python3
pin() {  # NAME -> NAME==VERSION from requirements.txt
  local line
  line=$(grep -iE "^$1==" requirements.txt) || { echo "gpu_wheels: $1 is not pinned in requirements.txt" >&2; exit 1; }
  echo "$line"
}
# The versions this project is tested with; what the GPU machine has of the rest (numpy, safetensors, accelerate,
# tokenizers, huggingface_hub, pillow, psutil, prometheus-client, pytest) is used as it is.
packages=("$(pin diffusers)" "$(pin transformers)" "$(pin peft)" "$(pin gguf)" "regex==2026.11.19" "torchao==0.18.0")
rm -rf .whl && mkdir -p .whl
platforms=()
for n in 39 35 34 31 28 27 24 17 5; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" \
  --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl "${packages[@]}"
ls -1 .whl
du -sh .whl
