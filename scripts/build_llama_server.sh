#!/usr/bin/env bash
# Build llama.cpp's own HTTP server (`llama-server`) from the llama.cpp that llama-cpp-python vendors,
# the same llama.cpp Guardgate runs in-process, and install it as .peers/llama-server/bin/llama-server.
# Tests and benchmarks of Llama Guard's `remote` backend with `api: llama_cpp` find it there (or through
# GUARDGATE_LLAMA_SERVER, or on PATH) and skip, with the reason, when it is absent.
#
#   bash scripts/build_llama_server.sh            # CPU build, ~10 min on 2 cores; skipped when built
#                                                 # from the same llama-cpp-python version
#   FORCE=1 bash scripts/build_llama_server.sh    # rebuild
#   CMAKE_EXTRA="-DGGML_CUDA=on" bash scripts/build_llama_server.sh   # more llama.cpp flags
#
# The version is the llama-cpp-python installed in the active Python (`PYTHON`, default python3), or
# LLAMA_CPP_PYTHON_VERSION. Needs cmake (or CMAKE) and a C++ compiler; the sdist (~75 MB) comes from PyPI
# through pip.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="$PWD/.peers/llama-server"
BIN="$DEST/bin/llama-server"
PY="${PYTHON:-python3}"
CMAKE="${CMAKE:-cmake}"

version="${LLAMA_CPP_PYTHON_VERSION:-$("$PY" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null || true)}"
[ -n "$version" ] || { echo "build_llama_server: no llama-cpp-python in $PY; set LLAMA_CPP_PYTHON_VERSION" >&2; exit 1; }

if [ -x "$BIN" ] && [ "${FORCE:-0}" = 0 ] && [ "$(cat "$DEST/VERSION" 2>/dev/null)" = "llama-cpp-python $version" ] \
    && "$BIN" --version >/dev/null 2>&1; then
    echo "build_llama_server: $BIN already built from llama-cpp-python $version; FORCE=1 rebuilds"
    exit 0
fi
command -v "$CMAKE" >/dev/null || { echo "build_llama_server: cmake not found" >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/gg-llama-server.XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "build_llama_server: llama-cpp-python $version sdist into $work"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    -d "$work" "llama-cpp-python==$version"
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
[ -f "$src/CMakeLists.txt" ] || { echo "build_llama_server: no vendored llama.cpp in the sdist" >&2; exit 1; }

# shellcheck disable=SC2086  # CMAKE_EXTRA is a list of flags
"$CMAKE" -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF ${CMAKE_EXTRA:-} >/dev/null
"$CMAKE" --build "$src/build" --target llama-server -j "$(nproc 2>/dev/null || echo 2)"

mkdir -p "$DEST/bin"
install -m 0755 "$src/build/bin/llama-server" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"  # never a half-written binary at the path tests look for
echo "llama-cpp-python $version" > "$DEST/VERSION"
"$BIN" --version 2>&1 | tail -n 2
echo "build_llama_server: installed $BIN"
