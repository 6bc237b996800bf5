#!/usr/bin/env bash
# One-GPU training benchmark (raylm's per-worker loop, no Ray): bash bench/gpu/run.sh [--tests] [--cpu-smoke]
#
# --tests first runs tests/gpu (packed attention with the CUDA kernels, the chunked loss's peak
# memory) with pytest, then the benchmark whatever their result.
#
# For a machine whose Python has torch but no network: installs the wheels in bench/gpu/wheels/
# (fetched beforehand by bench/gpu/build_wheels.sh) that this Python lacks, into a private dir on
# PYTHONPATH, then runs bench/gpu/train_gpu.py with the remaining arguments. Packages already
# installed are left as they are (never shadowed). PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
SITE=${RAYLM_BENCH_SITE:-/tmp/raylm_bench_site}

missing=()
shopt -s nullglob
for whl in bench/gpu/wheels/*.whl; do
  dist=$(basename "$whl" | cut -d- -f1)
  if ! "$PY" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$dist" 2>/dev/null; then
    missing+=("$whl")
  fi
done
if ((${#missing[@]})); then
  echo "installing into $SITE: ${missing[*]##*/}"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${missing[@]}"
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [[ "${1:-}" == "--tests" ]]; then
  shift
  "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -o timeout=0 tests/gpu || echo "tests/gpu: FAILED (above)"
fi
exec "$PY" bench/gpu/train_gpu.py "$@"
