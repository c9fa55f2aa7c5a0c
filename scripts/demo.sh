#!/usr/bin/env bash
# The embedded default, end to end on the CPU: synthetic raw data -> aligned shards -> a short
# training run -> LFW-protocol evaluation of the trained network against the same one untrained.
# Called by `make demo` (which sets PY to the virtualenv's python). Stops at the first failing stage.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DEMO_DIR=${DEMO_DIR:-runs/demo}
RAW=$DEMO_DIR/raw
SHARDS=$DEMO_DIR/shards
start=$(date +%s)

stage() { printf '\n== %s ==\n' "$*" >&2; }

stage "1/4 synthetic raw data (VGGFace2 and LFW layouts) -> $RAW"
if [ ! -f "$RAW/.complete" ]; then
  "$PY" preprocess/synthetic.py --out "$RAW" --identities 400 --images-per-identity 20 --lfw-identities 150 --seed 0
  touch "$RAW/.complete"
else
  echo "reusing $RAW" >&2
fi

stage "2/4 aligned shards -> $SHARDS"
"$PY" preprocess/build_shards.py vggface2 --root "$RAW/vggface2" --split train --out "$SHARDS/train"
"$PY" preprocess/build_shards.py lfw --root "$RAW/lfw" --out "$SHARDS/lfw"

stage "3/4 training configs/demo_cpu.yaml"
rm -rf "$DEMO_DIR/run"  # the demo trains from scratch; old metrics and checkpoints would mix in
"$PY" trainer/main.py --config configs/demo_cpu.yaml \
  "data.train_shards=$SHARDS/train" "validation.lfw_shards=$SHARDS/lfw" "run.dir=$DEMO_DIR/run" \
  | tee "$DEMO_DIR/train_summary.json"

stage "4/4 LFW 10-fold evaluation on unseen identities"
"$PY" eval/lfw.py --checkpoint "$DEMO_DIR/run/checkpoints/untrained.pt" --shards "$SHARDS/lfw" \
  --json "$DEMO_DIR/lfw_untrained.json" > /dev/null
"$PY" eval/lfw.py --checkpoint "$DEMO_DIR/run/checkpoints/last.pt" --shards "$SHARDS/lfw" \
  --json "$DEMO_DIR/lfw_trained.json" --roc "$DEMO_DIR/roc.png"
"$PY" - "$DEMO_DIR" <<'PYEOF'
import json, sys
d = sys.argv[1]
before = json.load(open(f"{d}/lfw_untrained.json"))["accuracy_mean"]
after = json.load(open(f"{d}/lfw_trained.json"))["accuracy_mean"]
train = json.load(open(f"{d}/train_summary.json"))  # steady_*: start-up window left out
rate, wait = train["steady_images_per_s"], train["steady_data_wait"]
print(f"training: {rate:.0f} images/s, {wait:.1%} of step time waiting for data")
print(f"LFW-protocol accuracy on unseen synthetic identities: untrained {before:.4f} -> trained {after:.4f}")
PYEOF
echo "demo finished in $(( $(date +%s) - start )) s; outputs in $DEMO_DIR" >&2
