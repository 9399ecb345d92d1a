#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run: the opt-in GPU test tier on the demo model (every placement, fp8
# under group and sequential offload, GGUF under each placement, the ControlNet modes), then the memory-profile
# benchmark on the full-size architecture, most important first (benchmarks/gpu_profiles.py: the placements the
# 8-24 GB targets rest on, emulated 16/12/8 GB cards and an 8 GB card with a GGUF Q4_0 transformer, then the other
# options, the attention kernels, --compile and the prompt cache), predicted vs measured peak and s/image in each row.
#
# The whole run keeps to GPU_CHECKS_BUDGET_S seconds (default 480): the benchmark starts no step the time left
# has no room for, says what it left out, and writes its results after every step. Not run on a GPU yet.
#
#   scripts/gpu_checks.sh [RESULTS_DIR]    (default: $OUT when set, else benchmarks/results)
#
# Python: .venv/bin/python when there is one, else python3 (a GPU machine's own, with its CUDA build of PyTorch).
# Wheels in .whl/ (scripts/gpu_wheels.sh, run where the package registry is reachable) are installed first, offline,
# into a folder of their own, for a machine without this project's packages and without network.
# Writes into RESULTS_DIR: gpu-tests.log, gpu-profiles.log, gpu-<device>-<date>.json and RESULTS-gpu.md (the
# section to merge into benchmarks/RESULTS.md with benchmarks/results_md.py's write_section).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
budget_s="${GPU_CHECKS_BUDGET_S:-480}"
python=.venv/bin/python; [ -x "$python" ] || python=python3
mkdir -p "$out"
started=$SECONDS
if compgen -G ".whl/*.whl" >/dev/null; then
  site="${TMPDIR:-/tmp}/zimage-site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { echo "gpu_checks: installing the wheels in .whl/ failed" >&2; exit 1; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$python" - <<'PY' 2>&1 | tee "$out/gpu-tests.log"
import sys

import diffusers, gguf, torch, transformers  # noqa: F401 - a missing package fails here, before any GPU time is spent
if not torch.cuda.is_available():
    sys.exit("gpu_checks: no CUDA GPU on this machine: these checks need one (the CPU tiers are the test suite)")
print(f"gpu_checks: {torch.cuda.get_device_name(0)}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}")
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 2
# The test tier gets at most 40% of the budget (33 tests took about 150 s on an H200): the benchmark gets the rest.
ZIMAGE_TEST_GPU=1 timeout "$(( budget_s * 2 / 5 ))" "$python" -m pytest -q -p no:cacheprovider tests/test_gpu.py \
  2>&1 | tee -a "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
left=$(( budget_s - (SECONDS - started) ))
"$python" benchmarks/gpu_profiles.py --repeats 3 --budget-s "$left" --gguf "${GPU_CHECKS_GGUF-Q4_0}" --out "$out" \
  --results-md "$out/RESULTS-gpu.md" \
  2>&1 | tee "$out/gpu-profiles.log"
bench=${PIPESTATUS[0]}
echo "gpu_checks: tests exit $tests, benchmark exit $bench, $(( SECONDS - started )) s in all"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
