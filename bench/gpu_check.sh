#!/usr/bin/env bash
# One GPU check, under 8 minutes on one H100: the fused heads' GPU tests, bench/heads.py at
# B=512 D=512 C in {8631, 100k, 1M}, bench/loader.py with DALI's mixed (nvJPEG) decode, and 200 bf16
# training steps of MobileFaceNet and IR-50 at batch 512 on synthetic shards built here.
#
#   bench/gpu_check.sh [--out runs/gpu_check] [--smoke]
#
# Prints a table (Markdown, ready for the README) and writes OUT/gpu_check.json and OUT/logs/.
# Needs PyTorch with CUDA, Triton and the project's requirements (requirements/gpu.txt); no network.
# Without a GPU it stops at once with exit status 2 and one line naming what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python3 || command -v python); fi
fi
exec "$PY" bench/gpu_check.py "$@"
