"""A real multi-controller run: 2 processes x 4 CPU devices joined by jax.distributed on localhost
(launch/local_multiprocess.sh) reproduce the metrics of one process with 8 devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.fixtures import REPO as ROOT

pytestmark = pytest.mark.slow
# What differs between two runs of the same config: wall-clock stamps and durations.
NOT_REPRODUCIBLE = ("time", "train/rollout_s", "train/epoch_s", "train/train_s", "train/reward_host_s",
                    "train/reward_host_span_s", "eval/eval_s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _must_match(record):
    return {k: v for k, v in record.items() if k not in NOT_REPRODUCIBLE}


def test_two_processes_reproduce_the_single_process_run(tmp_path, tiny_reference):
    bundle, prompts = tiny_reference.bundle, tiny_reference.prompts
    config = tmp_path / "config.py"
    config.write_text(
        "import sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import numpy as np\n"
        "from ng_jax.rewards import registry\n"
        "from tests.fixtures import tiny_rl_config\n\n\n"
        "class Brightness:  # a smooth reward: float rounding differences between device layouts stay small\n"
        "    name = 'brightness'\n\n"
        "    def __call__(self, images, prompts):\n"
        "        return images.astype(np.float32).mean(axis=(1, 2, 3)) / 255.0\n\n\n"
        "if 'brightness' not in registry.EXTRA_REWARDS:\n"
        "    registry.register_reward('brightness', lambda cfg: Brightness())\n\n\n"
        "def get_config(arg=None):\n"
        f"    c = tiny_rl_config({bundle!r}, {prompts!r}, epochs=2, rewards={{'brightness': 1.0}})\n"
        "    c.eval.quality = False\n"
        "    return c\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    single = subprocess.run([sys.executable, "-m", "ng_jax.main", f"--config={config}", f"--workdir={tmp_path / 'one'}"],
                            cwd=ROOT, env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
                            capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", str(config), str(tmp_path / "two")],
                           cwd=ROOT, env={**env, "DEVICES_PER_PROCESS": "4", "PORT": str(_free_port()),
                                          "PYTHON": sys.executable},
                           capture_output=True, text=True, timeout=900)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert multi.stderr.count("[eval initial]") + multi.stdout.count("[eval initial]") == 1  # process 0 reports

    one, two = ([_must_match(m) for m in _metrics(tmp_path / d)] for d in ("one", "two"))
    assert [m["step"] for m in one] == [m["step"] for m in two] == [0, 1, 2, 2]  # initial eval, 2 epochs, eval
    for a, b in zip(one, two):
        assert set(a) == set(b)
        for k, v in a.items():
            if isinstance(v, float):  # rewards, losses, norms: float rounding differs between device layouts
                np.testing.assert_allclose(b[k], v, rtol=1e-3, atol=1e-5, err_msg=k)
            else:  # steps, epochs, optimizer step counts
                assert b[k] == v, k
    s1 = json.load(open(tmp_path / "one" / "summary.json"))
    s2 = json.load(open(tmp_path / "two" / "summary.json"))
    assert s1["eval"]["reward"] == pytest.approx(s2["eval"]["reward"], rel=1e-4)
    assert os.path.isfile(tmp_path / "two" / "policy" / "params.msgpack")
