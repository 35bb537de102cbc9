#!/usr/bin/env bash
# A spot (preemptible) TPU pod slice through a queued resource, with preemption handling: wait for
# the slice, install, run in the foreground; if the run dies because the slice was preempted,
# delete and re-queue the resource and run again. The run resumes from its last checkpoint in
# WORKDIR (shared storage), so a preemption costs at most the steps since that checkpoint.
#
#   TPU_NAME=ng-v5e-256 ZONE=us-west4-a ACCELERATOR=v5litepod-256 REPO_URL=https://github.com/ORG/ng_jax \
#     bash launch/tpu_queued.sh ng_jax/configs/flux1dev_awm_normguard.py gs://BUCKET/runs/flux_awm [overrides]
#
# DRY_RUN=1 prints the commands of one attempt instead of running them.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
CONFIG=${1:?usage: tpu_queued.sh CONFIG WORKDIR [overrides]}
WORKDIR=${2:?usage: tpu_queued.sh CONFIG WORKDIR [overrides]}
shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${ACCELERATOR:?set ACCELERATOR}" "${REPO_URL:?set REPO_URL}"
QR_NAME=${QR_NAME:-$TPU_NAME-qr}
REPO_DIR=${REPO_DIR:-ng_jax}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
MAX_ATTEMPTS=${MAX_ATTEMPTS:-20}
POLL_S=${POLL_S:-60}
extra=$(quoted_args "$@")

state() {
  gcloud compute tpus queued-resources describe "$QR_NAME" --zone "$ZONE" --format='value(state.state)' 2>/dev/null \
    || echo MISSING
}

for ((attempt = 1; attempt <= MAX_ATTEMPTS; attempt++)); do
  echo "attempt $attempt: queued resource $QR_NAME" >&2
  if [[ "${DRY_RUN:-0}" == 1 || "$(state)" == MISSING ]]; then
    run gcloud compute tpus queued-resources create "$QR_NAME" --node-id "$TPU_NAME" --zone "$ZONE" \
      --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME" --spot
  fi
  if [[ "${DRY_RUN:-0}" != 1 ]]; then
    until [[ "$(state)" == ACTIVE ]]; do
      case "$(state)" in FAILED|SUSPENDED) echo "queued resource $(state); re-queueing" >&2; break ;; esac
      sleep "$POLL_S"
    done
  fi
  if [[ "${DRY_RUN:-0}" == 1 || "$(state)" == ACTIVE ]]; then
    run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
      --command "$(tpu_setup_script "$REPO_URL" "$REPO_DIR")"
    if run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
        "cd $REPO_DIR && .venv/bin/python -m ng_jax.main --distributed --config=$CONFIG --workdir=$WORKDIR$extra"; then
      [[ "${DRY_RUN:-0}" == 1 ]] || run gcloud compute tpus queued-resources delete "$QR_NAME" --zone "$ZONE" --force --quiet
      exit 0
    fi
  fi
  [[ "${DRY_RUN:-0}" == 1 ]] && exit 0
  echo "run ended without success (state: $(state)); re-queueing" >&2
  run gcloud compute tpus queued-resources delete "$QR_NAME" --zone "$ZONE" --force --quiet || true
done
echo "giving up after $MAX_ATTEMPTS attempts" >&2
exit 1
