#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run: the opt-in GPU test tier on the demo model (every placement, fp8
# under group offload, GGUF under each placement, the ControlNet modes), then the memory-profile benchmark on the
# full-size architecture: every placement (transformer-resident and the fp8 options included), the attention kernels
# and --compile, a GGUF Q4_0 transformer (written from the random one, about a minute), predicted vs measured peak
# and s/image, prompt-cache hits, emulated 8/12/16/24 GB cards and an 8 GB card with the GGUF file. --repeats 3 keeps
# it to about 10-12 minutes on an H100-class card (an estimate: not run yet).
#   scripts/gpu_checks.sh [RESULTS_DIR]      (default benchmarks/results)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
ZIMAGE_TEST_GPU=1 .venv/bin/python -m pytest -q tests/test_gpu.py
tests=$?
.venv/bin/python benchmarks/gpu_profiles.py --repeats 3 --out "$out"
bench=$?
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
