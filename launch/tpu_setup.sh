#!/usr/bin/env bash
# Install ng_jax on every worker of a TPU VM pod slice: the same pinned requirements as on CPU,
# with jax swapped for its TPU build (same version, so numerics and APIs match the tested ones).
#
#   TPU_NAME=my-v5e-64 ZONE=us-west4-a REPO_URL=https://github.com/ORG/ng_jax bash launch/tpu_setup.sh
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${REPO_URL:?set REPO_URL}"
REPO_DIR=${REPO_DIR:-~/ng_jax}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d $REPO_DIR ] || git clone $REPO_URL $REPO_DIR
  cd $REPO_DIR && git pull --ff-only
  python3 -m venv .venv
  .venv/bin/pip install -q -r requirements.txt
  .venv/bin/pip install -q 'jax[tpu]==0.10.2' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  .venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count())'
"
