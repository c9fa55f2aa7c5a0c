#!/usr/bin/env bash
# Container entry point. Runs from the project root, so the README's commands work as written:
#   docker run IMAGE torchrun --nproc_per_node=8 trainer/main.py --config configs/X.yaml
#   docker run IMAGE preprocess/build_shards.py lfw --root /data/lfw --out /data/shards/lfw
#   docker run IMAGE eval/lfw.py --checkpoint /runs/x/checkpoints/best.pt --shards /data/shards/lfw
# A bare `.py` path runs under python; any other command (torchrun, python, bash) runs as given.
set -euo pipefail
cd /opt/facetrain

if [ "$#" -eq 0 ] || [ "$1" = "--help" ] || [ "$1" = "-h" ]; then
  cat <<'USAGE'
facetrain image. Commands (paths inside the container; mount data at /data and runs at /runs):
  preprocess/build_shards.py vggface2 --root /data/vggface2 --split train --out /data/shards/train
  preprocess/build_shards.py lfw --root /data/lfw --out /data/shards/lfw
  torchrun --standalone --nproc_per_node=N trainer/main.py --config configs/X.yaml run.dir=/runs/NAME
  eval/lfw.py --checkpoint /runs/NAME/checkpoints/best.pt --shards /data/shards/lfw
  eval/export_onnx.py --checkpoint CKPT --out /runs/NAME/model.onnx
  bench/gpu_check.sh
USAGE
  exit 0
fi

case "$1" in
  *.py) exec python "$@" ;;
  *.sh) exec bash "$@" ;;
  *) exec "$@" ;;
esac
