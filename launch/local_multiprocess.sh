#!/usr/bin/env bash
# A real multi-controller run on one CPU machine: N processes, each with its own fake devices,
# joined by jax.distributed through a localhost coordinator. Exercises the multi-host code paths
# (host-local reward callbacks, collective orbax saves) without a pod.
#
#   bash launch/local_multiprocess.sh 2 ng_jax/configs/awm_normguard.py workdirs/mp --config.rl.epochs=2
#   DRY_RUN=1 bash launch/local_multiprocess.sh 2 ...     # print the N commands
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
N=${1:?usage: local_multiprocess.sh NUM_PROCESSES CONFIG WORKDIR [overrides]}
CONFIG=${2:?usage: local_multiprocess.sh NUM_PROCESSES CONFIG WORKDIR [overrides]}
WORKDIR=${3:?usage: local_multiprocess.sh NUM_PROCESSES CONFIG WORKDIR [overrides]}
shift 3
PORT=${PORT:-12355}
PYTHON=${PYTHON:-.venv/bin/python}
pids=()
for ((i = 0; i < N; i++)); do
  run env XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-2}" \
    NG_COORDINATOR="localhost:$PORT" NG_NUM_PROCESSES="$N" NG_PROCESS_ID="$i" \
    "$PYTHON" -m ng_jax.main --distributed --config="$CONFIG" --workdir="$WORKDIR" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
