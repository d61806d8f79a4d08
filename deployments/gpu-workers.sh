#!/usr/bin/env bash
# One Prefect process worker per GPU of this host, each pinned to its GPU with
# CUDA_VISIBLE_DEVICES and taking one flow run at a time (--limit 1): a run owns its GPU,
# and a host never runs more flows than it has GPUs. Stops its workers when stopped.
#
# usage: deployments/gpu-workers.sh [--pool NAME] [--gpus 0,1,...] [--grace SECONDS]
#   --pool   work pool (default bevfusion-gpu, the pool of deployments/prefect.yaml)
#   --gpus   GPU indices (default: every GPU nvidia-smi lists)
#   --grace  on stop, seconds the workers get before they are killed (default 10)
# Needs PREFECT_API_URL in the environment and the project's environment activated (its
# `prefect` and `python` first on PATH: the deployments' pull step imports the package).
set -euo pipefail

pool=bevfusion-gpu
gpus=""
grace=10
while [ $# -gt 0 ]; do
  case "$1" in
    --pool) pool="$2"; shift 2 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --grace) grace="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "gpu-workers.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -z "$gpus" ]; then
  gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)
fi

pids=()
stop() {
  trap - INT TERM EXIT
  [ ${#pids[@]} -gt 0 ] || return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true  # a worker stops taking runs
  for _ in $(seq "$grace"); do
    alive=$(for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && echo "$p"; done || true)
    [ -n "$alive" ] || return 0
    sleep 1
  done
  # Prefect 3.9.1 workers may stay up after the first signal; Prefect's own handler turns
  # a second one into SIGKILL.
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait || true
}
trap stop INT TERM EXIT

for gpu in ${gpus//,/ }; do
  CUDA_VISIBLE_DEVICES="$gpu" prefect worker start --type process --pool "$pool" \
    --name "$(hostname)-gpu$gpu" --limit 1 &
  pids+=("$!")
  echo "worker for GPU $gpu: pid $!"
done
wait
