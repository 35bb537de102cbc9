#!/usr/bin/env bash
# Install ng_jax on one Cloud TPU VM, from the repository root of a checkout on that VM:
#
#   bash launch/tpu_setup.sh
#   DRY_RUN=1 bash launch/tpu_setup.sh        # print the commands instead of running them
#
# The pinned runtime lock (requirements.txt) into .venv, then jax swapped for its TPU build of the same
# release (pulls libtpu), then a check that JAX sees the TPU. Pod slices: `bash launch/tpu_pod.sh setup`
# runs the same install on every worker (launch/common.sh, tpu_setup_script).
# The lock is for Python 3.11: where the VM's python3 is older, install 3.11 and set PYTHON=python3.11.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=launch/common.sh
source launch/common.sh
PYTHON=${PYTHON:-python3}
run "$PYTHON" -m venv .venv
run .venv/bin/pip install -q -r requirements.txt
run .venv/bin/pip install -q "jax[tpu]==0.10.2" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
run .venv/bin/python -c 'import jax; print(jax.devices())'
