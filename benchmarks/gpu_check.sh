#!/usr/bin/env bash
# The GPU check in one run (benchmarks/gpu_check.py says what it does): on a one-GPU machine it
# takes under 8 minutes and writes gpu_check.json, gpu_check.md, gpu_scaling.png and
# gpu_check.log to OUT_DIR (default: $OUT, else benchmarks/results/gpu).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [gpu_check.py options]
#   bash benchmarks/gpu_check.sh OUT_DIR --dry-run      # CPU, tiny sizes (also: DEVICE=cpu)
#
# The GPU machine has no network. Python packages it lacks travel with the repository as wheels
# in .whl/ (benchmarks/gpu_wheels.sh downloads them on a machine with PyPI): they are installed
# with `pip install --no-index` into a folder put first on PYTHONPATH. The repository's own code
# runs from src/ (no install needed). GPU_CHECK_WHEELS names another wheel folder (default .whl).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results/gpu}"
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then OUT_DIR="$1"; shift; fi
mkdir -p "$OUT_DIR"
EXTRA=()
if [ "${DEVICE:-}" = "cpu" ]; then EXTRA+=(--dry-run); fi

WHEELS="${GPU_CHECK_WHEELS:-.whl}"  # the carried wheels (for the GPU machine's Python)
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE="${GPU_CHECK_SITE:-/tmp/mmpo-site}"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || { echo "installing the carried wheels in $WHEELS/ failed" >&2; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error

missing=$(python3 - <<'EOF'
import importlib.util
need = ["torch", "transformers", "accelerate", "peft", "trl", "datasets", "psutil", "yaml", "safetensors", "tokenizers"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "missing Python packages: $missing (carry them as wheels in .whl/: see benchmarks/gpu_wheels.sh)" >&2
  exit 1
fi

python3 benchmarks/gpu_check.py --out "$OUT_DIR" ${EXTRA[@]+"${EXTRA[@]}"} "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
