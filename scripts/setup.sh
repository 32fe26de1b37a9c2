#!/usr/bin/env bash
# Create .venv and install AttrFace with everything the offline profile and the tests need.
# Needs only package registries (no model downloads). Idempotent: re-running is a quick no-op check.
#   TORCH_SPEC   torch requirement installed first (default torch==2.13.0, the CPU build). GPU users: install
#                their CUDA torch into .venv first and set TORCH_SPEC="" to keep it.
#   VENV         venv directory (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC-torch==2.13.0}
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# torch first: an unpinned torch (asked for by a dependency) would otherwise pull a multi-GB CUDA build.
[ -n "$TORCH_SPEC" ] && pip install "$TORCH_SPEC"
pip install -e ".[dev,insightface,postgres,k8s]"
# insightface requires opencv-python, which clashes with opencv-python-headless (same cv2 module): install it
# without dependencies; the [insightface] extra above brings the rest of what it imports.
pip install --no-deps "insightface==2.1"
"$VENV/bin/python" - <<'PY'
import cv2, dlib, torch, diffusers, transformers, dagster, insightface  # noqa: F401 - import check
print(f"ok: torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
      f"dagster {dagster.__version__}, opencv {cv2.__version__}")
PY
# Bare `dagster job execute -j build_dataset` works in the activated venv: activate sources scripts/attrface_env.sh.
ACTIVATE="$VENV/bin/activate"
grep -q attrface_env.sh "$ACTIVATE" || printf '\n# AttrFace: DAGSTER_HOME and the Dagster CLI defaults\n. "%s/scripts/attrface_env.sh"\n' "$PWD" >> "$ACTIVATE"
# Create the instance's storage once, here: two first runs at once on an empty DAGSTER_HOME would both try to
# create the SQLite schema and one fails ("table alembic_version already exists").
. scripts/attrface_env.sh
"$VENV/bin/attrface" init-instance
echo "setup done in $(( $(date +%s) - start )) s; venv size $(du -sh "$VENV" | cut -f1)"
