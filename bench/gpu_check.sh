#!/usr/bin/env bash
# One GPU check in one call, inside its --deadline (default 540 s): the fused heads' GPU tests,
# python -m bench.heads at B=512 D=512 C in {1M, 100k, 8631} (reference / chunked / fused beside the
# bf16 and fp32 matrix-product floors), python -m bench.kernels --time (each fused kernel compiled,
# inspected and timed, the model's predicted time beside the measured one; then the first configs
# with a bf16 dW), the fused head alone at C=1M with --save-logits, then also --grad-dtype bf16,
# 200 bf16 training steps of MobileFaceNet and IR-50 at batch 512 on synthetic shards built here
# (one epoch holds all 200 steps), and bench/loader.py with DALI when DALI is importable; a stage
# that would not finish before the deadline is skipped, the later ones first.
#
#   bench/gpu_check.sh [--out runs/gpu_check] [--deadline 540] [--smoke]
#
# Prints the machine first and the table (Markdown) last; --out gets only gpu_check.json,
# gpu_check.md and logs.tgz, rewritten after every stage (scratch goes to a temporary folder).
# Needs PyTorch with CUDA, Triton and the project's requirements (requirements/gpu.txt); no network;
# the project need not be installed. Without a GPU, or without the C compiler or Python.h that Triton
# builds its launcher with (one tiny kernel is launched first), it stops at once with exit status 2
# and one line naming what is missing; without cv2, rich, numpy or yaml only the data, training and
# loader stages are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python3 || command -v python); fi
fi
exec "$PY" -m bench.gpu_check "$@"
