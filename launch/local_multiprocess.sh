#!/usr/bin/env bash
# A real multi-controller run on one CPU machine: N processes, each with its own fake devices,
# joined by jax.distributed through a localhost coordinator. Useful to test multi-host code paths
# (host-local reward callbacks, process_allgather, orbax multi-process saves) without a pod.
#
#   bash launch/local_multiprocess.sh 2 configs/awm_normguard.py workdirs/mp --config.rl.epochs=2
set -euo pipefail
N=${1:?usage: local_multiprocess.sh NUM_PROCESSES CONFIG WORKDIR [overrides]}
CONFIG=${2:?}; WORKDIR=${3:?}; shift 3
PORT=${PORT:-12355}
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-2}"
pids=()
for ((i = 0; i < N; i++)); do
  NG_COORDINATOR="localhost:$PORT" NG_NUM_PROCESSES=$N NG_PROCESS_ID=$i \
    .venv/bin/python -m ng_jax.main --distributed --config="$CONFIG" --workdir="$WORKDIR" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
