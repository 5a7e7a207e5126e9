#!/usr/bin/env bash
# The Hugging Face stack of the wanda image (transformers 4.34.1 with tokenizers 0.14), in its
# own venv (.legacy-hf-venv), without torch: configs and
# tokenizers are all the test needs. tests/test_upstream_model_staging.py loads the staged
# input model with it, as the upstream code in a method image does. Idempotent; under a
# minute the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.legacy-hf-venv
PIN="transformers==4.34.1"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import transformers, tokenizers; assert transformers.__version__ == '${PIN#*==}'" 2>/dev/null; then
  echo "legacy stack: $("$VENV/bin/python" -c 'import transformers, tokenizers; print("transformers", transformers.__version__, "tokenizers", tokenizers.__version__)') in $VENV"; exit 0
fi
t0=$(date +%s)
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check "$PIN" "numpy<2"
"$VENV/bin/python" -c "import transformers, tokenizers; print('legacy stack: transformers', transformers.__version__, 'tokenizers', tokenizers.__version__)"
echo "legacy stack venv took $(( $(date +%s) - t0 )) s"
