#!/usr/bin/env bash
# Runs one command on every host of a Cloud TPU VM pod, from the repository copy on the workers, at the same time.
#
#   tpu/launch.sh TPU_NAME ZONE "COMMAND" [--project PROJECT] [--setup] [--dry-run]
#
#   --setup     first copy this repository to every host (~/mergejax) and install it (tpu/pod.py setup)
#   --project   GCP project (default: gcloud's configured project)
#   --dry-run   print the gcloud commands, run nothing
#
# Example:
#   tpu/launch.sh my-v4-32 us-central2-b "python tpu/merge_pod.py --out gs://my-bucket/merged" --setup
#
# A thin wrapper of tpu/pod.py (setup, run). Credentials come from your own `gcloud auth login`.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
TPU_NAME=$1; ZONE=$2; COMMAND=$3; shift 3
EXTRA=(); SETUP=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --project) EXTRA+=(--project "$2"); shift 2 ;;
    --setup) SETUP=1; shift ;;
    --dry-run) EXTRA+=(--dry-run); shift ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}
if [[ $SETUP -eq 1 ]]; then
  "$PY" "$HERE/pod.py" setup --name "$TPU_NAME" --zone "$ZONE" "${EXTRA[@]}"
fi
# Every host runs the same command; jax.distributed.initialize() inside finds the pod's coordinator by itself.
exec "$PY" "$HERE/pod.py" run --name "$TPU_NAME" --zone "$ZONE" "${EXTRA[@]}" -- bash -c "$COMMAND"
