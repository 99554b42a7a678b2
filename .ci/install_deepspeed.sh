#!/bin/bash
# Install real DeepSpeed (CPU, no compiled ops) into a separate venv, for the interop test and the benchmark.
# usage: .ci/install_deepspeed.sh [VENV_DIR]   (default /tmp/dsvenv); then
#        export CKPT_EXPLORER_DS_PYTHON=VENV_DIR/bin/python
set -euo pipefail
VENV=${1:-/tmp/dsvenv}
DS_VERSION=${DS_VERSION:-}          # empty: newest; e.g. DS_VERSION=0.19.8 to pin
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
DS_BUILD_OPS=0 DS_ACCELERATOR=cpu "$VENV/bin/pip" install -q "deepspeed${DS_VERSION:+==$DS_VERSION}" torch==2.13.0 \
  huggingface_hub safetensors
DS_ACCELERATOR=cpu "$VENV/bin/python" -c "import deepspeed, torch; print('deepspeed', deepspeed.__version__, 'torch', torch.__version__)"
