#!/usr/bin/env bash
# The README's quick start, run the way a new user runs it (CI calls this after the test suite):
# a copy of the tree, a fresh venv with ONLY `bash scripts/install.sh run` (pip's wheel cache may be
# warm), `guardgate serve` with no flags, then scripts/check_quickstart.py asks it a benign question
# and a tag-smuggled one, reads the start log and runs `guardgate doctor`.
# Usage: bash scripts/check_quickstart.sh [WORKDIR]   (WORKDIR is removed first; default: a temp dir)
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d -t guardgate-quickstart.XXXXXX)}"
rm -rf "$work" && mkdir -p "$work/tree"
start=$(date +%s)
# The tree as a clone has it (tracked and untracked-but-not-ignored files), without the test venv.
(cd "$src" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$work/tree"
cd "$work/tree"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The README's first command, minus its last step (`guardgate serve`), which the checker starts.
python3 -m venv .venv && . .venv/bin/activate && bash scripts/install.sh run > "$work/install.log" 2>&1 \
  || { tail -40 "$work/install.log"; echo "quickstart: install failed"; exit 1; }
echo "quickstart: install took $(( $(date +%s) - start )) s"
python "$src/scripts/check_quickstart.py" --log "$work/serve.log"
echo "quickstart: total $(( $(date +%s) - start )) s"
