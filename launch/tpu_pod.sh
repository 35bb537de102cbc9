#!/usr/bin/env bash
# Cloud TPU VM pod slices (multi-controller JAX: one process per worker, jax.distributed).
#
#   export TPU_NAME=ng-v5p-64 ZONE=us-east5-a
#   ACCELERATOR=v5p-64 bash launch/tpu_pod.sh create
#   REPO_URL=https://github.com/ORG/ng_jax bash launch/tpu_pod.sh setup      # install on all workers
#   bash launch/tpu_pod.sh run ng_jax/configs/sd35m_awm_normguard.py gs://BUCKET/runs/awm_ng [--config.k=v ...]
#   bash launch/tpu_pod.sh logs                                              # follow worker 0
#   bash launch/tpu_pod.sh delete
#
# DRY_RUN=1 prints the commands instead of running them. The workdir must be shared storage (GCS):
# orbax writes one checkpoint collectively from all hosts, and a relaunch resumes from it.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
usage="usage: tpu_pod.sh {create|setup|run CONFIG WORKDIR [overrides]|logs|delete}"
CMD=${1:?$usage}
shift
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO_DIR=${REPO_DIR:-ng_jax}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
LOG=${LOG:-ng_jax.log}

on_workers() {  # on_workers WORKER COMMAND
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker="$1" --command "$2"
}

case "$CMD" in
  create)
    run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
      --accelerator-type "${ACCELERATOR:?set ACCELERATOR, e.g. v5p-64}" --version "$RUNTIME" ;;
  setup)
    on_workers all "$(tpu_setup_script "${REPO_URL:?set REPO_URL}" "$REPO_DIR")" ;;
  run)
    CONFIG=${1:?$usage}; WORKDIR=${2:?$usage}; shift 2
    extra=$(quoted_args "$@")
    on_workers all "cd $REPO_DIR && nohup .venv/bin/python -m ng_jax.main --distributed --config=$CONFIG \
--workdir=$WORKDIR$extra > $LOG 2>&1 &" ;;
  logs)
    on_workers 0 "tail -n 100 -f $REPO_DIR/$LOG" ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --quiet ;;
  *)
    echo "$usage" >&2; exit 2 ;;
esac
