#!/bin/bash
# usage: bench/make_real_ckpt.sh OUT SIZE — write a REAL DeepSpeed ZeRO-2 bf16 checkpoint (2 ranks, gloo, 1 step).
#   SIZE: 1g (h4096 x 3 layers, 67 M params, ~0.94 GB), 3g (h4096 x 12 layers, 218 M params, ~3.05 GB),
#         or HIDDENxLAYERS (e.g. 2048x16). Needs ~7 GB RAM at 3g. Keep OUT outside the repository (e.g. /tmp/bench).
#   DS python: $CKPT_EXPLORER_DS_PYTHON, else /tmp/dsvenv/bin/python (make it with .ci/install_deepspeed.sh).
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 OUT SIZE(1g|3g|HxL)" >&2; exit 2; }
OUT=$1; SIZE=$2
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${CKPT_EXPLORER_DS_PYTHON:-/tmp/dsvenv/bin/python}
case $SIZE in
  1g) H=4096; L=3;;
  3g) H=4096; L=12;;
  *x*) H=${SIZE%x*}; L=${SIZE#*x};;
  *) echo "bad SIZE $SIZE" >&2; exit 2;;
esac
export DS_ACCELERATOR=cpu DS_BUILD_OPS=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=ignore
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/bench/torch_extensions}
rm -rf "$OUT"; mkdir -p "$(dirname "$OUT")"
START=$(date +%s.%N)
"$PY" -m torch.distributed.run --nproc_per_node 2 --master_port $((29500 + RANDOM % 1000)) \
  "$HERE/gen_real_ckpt.py" --out "$OUT" --hidden "$H" --layers "$L" --zero-stage 2 --dtype bf16 --bucket 5e7 --steps 1
END=$(date +%s.%N)
echo "wrote $OUT: $(du -sb "$OUT" | cut -f1) bytes in $(echo "$END - $START" | bc) s"
