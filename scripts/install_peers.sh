#!/usr/bin/env bash
# Install the peer gateways Guardgate is tested and benchmarked against (issue 32), under .peers/:
#   .peers/litellm/   LiteLLM proxy (`litellm[proxy]` from PyPI) in a virtualenv of its own: its pins
#                     clash with ours, so it never shares Guardgate's environment
#   .peers/portkey/   the Portkey gateway (`@portkey-ai/gateway` from the npm registry), run with node
#   .peers/llama-server/  llama.cpp's own server, built from the llama.cpp that the installed
#                     llama-cpp-python vendors (scripts/build_llama_server.sh, ~10 min on 2 cores): the
#                     real server behind Llama Guard's `remote` backend with `api: llama_cpp` (issue 34)
# Tests and benchmarks find them there (or through LITELLM_BIN / PORTKEY_DIR) and skip, with the
# reason, when absent.
#
#   bash scripts/install_peers.sh [litellm] [portkey] [llama-server]     (default: all three)
#
# Versions: LITELLM_VERSION / PORTKEY_VERSION pin them (default: the latest release). Each peer is
# installed on its own: one that fails is reported and the script goes on; it exits non-zero when any
# failed, so a caller that must not fail (CI) runs it as `bash scripts/install_peers.sh || true`.
set -uo pipefail
cd "$(dirname "$0")/.."
PEERS="$PWD/.peers"
mkdir -p "$PEERS"
want=("$@")
[ ${#want[@]} -eq 0 ] && want=(litellm portkey llama-server)
failed=()

install_litellm() {
    local spec="litellm[proxy]${LITELLM_VERSION:+==$LITELLM_VERSION}"
    local venv="$PEERS/litellm"
    local py="${PEERS_PYTHON:-python3}"
    [ -x "$venv/bin/python" ] || "$py" -m venv "$venv" || return 1
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$spec" || return 1
    "$venv/bin/litellm" --version >/dev/null 2>&1 || "$venv/bin/python" -c "import litellm.proxy.proxy_server" \
        || return 1
    echo "install_peers: litellm $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))') in $venv"
}

install_portkey() {
    command -v npm >/dev/null || { echo "install_peers: npm not found (Node.js is needed for Portkey)" >&2; return 1; }
    local dir="$PEERS/portkey"
    mkdir -p "$dir"
    npm install --prefix "$dir" --no-audit --no-fund --loglevel=error \
        "@portkey-ai/gateway${PORTKEY_VERSION:+@$PORTKEY_VERSION}" || return 1
    [ -f "$dir/node_modules/@portkey-ai/gateway/build/start-server.js" ] || {
        echo "install_peers: @portkey-ai/gateway installed without build/start-server.js" >&2; return 1; }
    echo "install_peers: @portkey-ai/gateway $(node -p "require('$dir/node_modules/@portkey-ai/gateway/package.json').version") in $dir"
}

install_llama_server() {
    # The build needs the llama-cpp-python of Guardgate's environment: the python on PATH (CI's venv).
    PYTHON="${PYTHON:-python3}" bash scripts/build_llama_server.sh
}

for peer in "${want[@]}"; do
    start=$SECONDS
    case "$peer" in
        litellm) install_litellm ;;
        portkey) install_portkey ;;
        llama-server) install_llama_server ;;
        *) echo "install_peers: unknown peer $peer (litellm, portkey, llama-server)" >&2; false ;;
    esac
    rc=$?
    if [ $rc -ne 0 ]; then
        failed+=("$peer")
        # No half-installed peer: its tests skip, naming this file, rather than fail on a broken install.
        rm -rf "${PEERS:?}/$peer"
        echo "install of $peer failed at $(date -u +%FT%TZ) (exit $rc); rerun: bash scripts/install_peers.sh $peer" \
            > "$PEERS/$peer.failed"
        echo "install_peers: $peer FAILED (its tests will skip)" >&2
    else
        rm -f "$PEERS/$peer.failed"
    fi
    echo "install_peers: $peer took $((SECONDS - start)) s"
done
[ ${#failed[@]} -eq 0 ]
