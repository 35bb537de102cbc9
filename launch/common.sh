# shellcheck shell=bash
# Sourced by the launch scripts. `run CMD ARGS...` executes the command, or with DRY_RUN=1 prints it
# (shell-quoted, prefixed by "+ ") without running anything.
run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    local line
    line=$(printf ' %q' "$@")
    printf '+%s\n' "$line"  # one write per command: lines of concurrent callers do not interleave
  else
    "$@"
  fi
}

# The install script every TPU worker runs: pinned CPU requirements with jax swapped for its TPU
# build of the same version (numerics and APIs match the tested ones).
tpu_setup_script() {
  local repo_url=$1 repo_dir=$2
  printf '%s' "set -e; [ -d $repo_dir ] || git clone $repo_url $repo_dir; cd $repo_dir && git pull --ff-only; \
python3 -m venv .venv; .venv/bin/pip install -q -r requirements.txt; \
.venv/bin/pip install -q 'jax[tpu]==0.10.2' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html; \
.venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count())'"
}

# The shell-quoted arguments, each preceded by a space ("" for none): for remote command strings.
quoted_args() {
  local out="" a
  for a in "$@"; do out+=" $(printf '%q' "$a")"; done
  printf '%s' "$out"
}
