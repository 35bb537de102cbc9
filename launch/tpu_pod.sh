#!/usr/bin/env bash
# Run an ng_jax job on every worker of a Cloud TPU VM pod slice (multi-controller JAX).
#
#   TPU_NAME=my-v5e-64 ZONE=us-west4-a bash launch/tpu_pod.sh configs/awm_normguard.py gs://bucket/runs/awm_ng \
#       --config.mesh.shape='(-1,8,1)'
#
# Every worker clones nothing: the repository must already be at $REPO_DIR on each worker (see
# launch/tpu_setup.sh). Each process calls jax.distributed.initialize() (--distributed), which reads
# the pod topology from the TPU metadata server; the workdir must be shared storage (GCS) because
# orbax writes one checkpoint from all hosts.
set -euo pipefail
CONFIG=${1:?usage: tpu_pod.sh CONFIG WORKDIR [--config.key=value ...]}
WORKDIR=${2:?usage: tpu_pod.sh CONFIG WORKDIR [--config.key=value ...]}
shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO_DIR=${REPO_DIR:-~/ng_jax}
EXTRA=$(printf " %q" "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd $REPO_DIR && .venv/bin/python -m ng_jax.main --distributed --config=$CONFIG --workdir=$WORKDIR$EXTRA"
