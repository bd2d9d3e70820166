#!/usr/bin/env bash
# Downloads into .whl/ the wheels that benchmarks/gpu_check.sh installs on a GPU machine without
# network (`pip install --no-index`): what such a machine's PyTorch image typically lacks, at the
# versions installed here (so both machines run the same code), plus liger-kernel (optional).
# Run it where PyPI is reachable, then take .whl/ along with the checkout (it is git-ignored:
# name it in whatever copies the checkout over).
#
#   bash benchmarks/gpu_wheels.sh [EXTRA_PACKAGE[==VERSION] ...]
#   GPU_PYTHON=3.11 bash benchmarks/gpu_wheels.sh       # the GPU machine's Python (default 3.12)
#   NO_LIGER=1 bash benchmarks/gpu_wheels.sh            # without liger-kernel
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${GPU_PYTHON:-3.12}"
mkdir -p .whl
packages=(trl datasets dill multiprocess transformers "$@")
if [ -z "${NO_LIGER:-}" ]; then packages+=("liger-kernel>=0.8.5"); fi
for name in "${packages[@]}"; do
  spec="$name"
  if [[ "$name" != *[=\<\>]* ]]; then  # pin to the version installed here, when there is one
    version=$(python3 -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name" 2>/dev/null || true)
    if [ -n "$version" ]; then spec="$name==$version"; fi
  fi
  echo "downloading $spec"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$spec"
done
ls -la .whl
