#!/usr/bin/env bash
# Train bevfusion-tiny on a GPU host, end to end, inside a fixed wall budget:
#   1. generate the tree (train + held-out val, other seeds) on all cores;
#   2. train (epochs planned after epoch 1 to fit what is left, hard stop before the end);
#   3. measure the saved checkpoint on val, loading it the way a PTQ run does.
# Everything that should come back lands in $OUT (checkpoint after every epoch, so a failure
# keeps the last finished one): bevfusion-tiny.pth and bevfusion-tiny.json (the pair to commit
# to bevfusion_ptq/checkpoints/), train_report.json, train.log, tree.json, driver.log.
#
#   OUT=/some/dir bash tools/train_on_device.sh [TOTAL_SECONDS] [TRAIN_SHARDS] [extra train_tiny.py args...]
#
# TOTAL_SECONDS (default 540) is the budget of the whole script; TRAIN_SHARDS (default 52)
# times 4 scenes times 10 keyframes is the train set (52 -> 2080 keyframes).
set -uo pipefail
TOTAL=${1:-540}
TRAIN_SHARDS=${2:-52}
export TRAIN_DRIVER_COMMAND="bash tools/train_on_device.sh $*"
shift $(( $# < 2 ? $# : 2 ))
VAL_SHARDS=${VAL_SHARDS:-5}
SCENES_PER_SHARD=${SCENES_PER_SHARD:-4}
OUT=${OUT:?set OUT to the folder that comes back}
TREE=${TREE:-/tmp/bevfusion-tiny-tree}
PY=${PYTHON:-python3}
CPUS=$(nproc)
WORKERS=${WORKERS:-$(( CPUS > 2 ? CPUS - 2 : 1 ))}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/driver.log") 2>&1
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
echo "[driver] $(date -u +%FT%TZ) total budget ${TOTAL}s, ${CPUS} cpus, ${WORKERS} loader workers, tree $TREE"
echo "[driver] command: $TRAIN_DRIVER_COMMAND"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
df -h /dev/shm "$(dirname "$TREE")" | sed 's/^/[driver] /' || true

rm -rf "$TREE"
$PY tools/make_training_tree.py "$TREE" --train-shards "$TRAIN_SHARDS" --val-shards "$VAL_SHARDS" \
    --scenes-per-shard "$SCENES_PER_SHARD" --workers "$CPUS" || exit 1
cp "$TREE/tree.json" "$OUT/tree.json"
echo "[driver] tree done at $(elapsed)s ($(du -sh "$TREE" | cut -f1))"

# Keep ~75 s for the val measurement and process start-up; the hard stop leaves ~45 s slack.
left=$(( TOTAL - $(elapsed) ))
plan=$(awk -v l="$left" 'BEGIN { printf "%.2f", (l - 110) / 60 }')
hard=$(awk -v l="$left" 'BEGIN { printf "%.2f", (l - 75) / 60 }')
echo "[driver] ${left}s left: training plans ${plan} min, stops by ${hard} min"
$PY tools/train_tiny.py --data-root "$TREE" --out "$OUT" --epochs auto --train-minutes "$plan" \
    --max-minutes "$hard" --workers "$WORKERS" --no-val "$@"
train_rc=$?
echo "[driver] training exited with $train_rc at $(elapsed)s"

if [ -f "$OUT/bevfusion-tiny.pth" ]; then
    $PY tools/train_tiny.py --evaluate "$OUT/bevfusion-tiny.pth" --data-root "$TREE" --out "$OUT" \
        --workers "$WORKERS"
    echo "[driver] val measurement exited with $? at $(elapsed)s"
fi
ls -la "$OUT"
exit $train_rc
