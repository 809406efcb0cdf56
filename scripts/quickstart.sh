#!/usr/bin/env bash
# Quick start: install everything, then stream SmolLM2-135M-Instruct's answer to a question,
# token by token, through the local site (started in the background on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
QUESTION=${1:-"What does a mitochondrion do in a cell?"}
echo "Q: $QUESTION"
echo "$QUESTION" | fabric chat --model smollm2-135m --max-tokens 96
