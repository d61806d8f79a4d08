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
# TOTAL_SECONDS (default 540) is the budget of the whole script; TRAIN_SHARDS (default 59)
# times 4 scenes times 10 keyframes is the train set (59 -> 2360 keyframes); with the 5 val
# shards that is 64 generator jobs, 4 even waves on 16 cores.
set -uo pipefail
TOTAL=${1:-540}
TRAIN_SHARDS=${2:-59}
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

# Training plans its epochs to end 110 s before the budget and stops for sure 75 s before it:
# that leaves the val measurement (~30 s on a GPU host) and its process start-up.
plan_until=$(( start + TOTAL - 110 ))
stop_at=$(( start + TOTAL - 75 ))
echo "[driver] $(( TOTAL - $(elapsed) ))s left: training plans to end at +$(( TOTAL - 110 ))s, stops by +$(( TOTAL - 75 ))s"
$PY tools/train_tiny.py --data-root "$TREE" --out "$OUT" --epochs auto --plan-until "$plan_until" \
    --stop-at "$stop_at" --workers "$WORKERS" --no-val "$@"
train_rc=$?
echo "[driver] training exited with $train_rc at $(elapsed)s"

if [ -f "$OUT/bevfusion-tiny.pth" ]; then
    $PY tools/train_tiny.py --evaluate "$OUT/bevfusion-tiny.pth" --data-root "$TREE" --out "$OUT" \
        --workers "$WORKERS"
    echo "[driver] val measurement exited with $? at $(elapsed)s"
fi
ls -la "$OUT"
exit $train_rc
