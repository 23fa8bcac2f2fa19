#!/usr/bin/env bash
# Runs one command on every host of a Cloud TPU VM pod, from the repository root, at the same time.
#
#   tpu/launch.sh TPU_NAME ZONE "COMMAND" [--project PROJECT] [--setup]
#
#   --setup     first copy this repository to every host (~/mergejax) and install it (pip install -e .)
#   --project   GCP project (default: gcloud's configured project)
#
# Example:
#   tpu/launch.sh my-v4-32 us-central2-b "python tpu/merge_pod.py --out gs://my-bucket/merged" --setup
#
# Credentials come from your own `gcloud auth login`; nothing secret is read or stored here.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
TPU_NAME=$1; ZONE=$2; COMMAND=$3; shift 3
PROJECT_ARGS=(); SETUP=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --project) PROJECT_ARGS=(--project "$2"); shift 2 ;;
    --setup) SETUP=1; shift ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
REMOTE_DIR=mergejax
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_ARGS[@]}" --worker=all --command "$1"
}

if [[ $SETUP -eq 1 ]]; then
  tarball=$(mktemp -t mergejax.XXXXXX.tar.gz)
  trap 'rm -f "$tarball"' EXIT
  tar -C "$REPO" --exclude=.venv --exclude=.git --exclude=results --exclude='__pycache__' -czf "$tarball" .
  gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:~/mergejax.tar.gz" --zone "$ZONE" "${PROJECT_ARGS[@]}" --worker=all
  ssh_all "mkdir -p ~/$REMOTE_DIR && tar -xzf ~/mergejax.tar.gz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR && \
    python3 -m pip install -q -e . 'jax[tpu]==0.10.2'"
fi

# Every host runs the same command; jax.distributed.initialize() inside finds the pod's coordinator by itself.
ssh_all "cd ~/$REMOTE_DIR && $COMMAND"
