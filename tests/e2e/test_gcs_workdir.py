"""Workdirs in a bucket (gs://), against a local GCS emulator (tests/gcs.py; every test takes the `gcs` fixture,
which skips it without gcsfs or the emulator).

The emulator serves both clients a run uses: gcsfs (etils.epath: metrics.jsonl, summary.json, sample grids,
the exported policy; google-cloud-storage: TensorBoard's events) and tensorstore (orbax's checkpoint arrays).
In a bucket orbax writes a step in place and marks it complete last (commit_success.txt), not
by a rename as on a local disk; the tests below check that this still leaves the previous checkpoint usable
after a kill, and that a run killed with SIGKILL (a preempted VM: no SIGTERM, no final save) resumes from
the bucket and ends with exactly the numbers of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ng_jax import sharding, storage
from ng_jax.checkpoint import CheckpointError, Checkpointer
from ng_jax.main import main
from ng_jax.state import TrainState
from tests.fixtures import REPO, write_tiny_config_file
from tests.gcs import BUCKET

# What differs between two runs of the same config: wall-clock stamps and durations.
NOT_REPRODUCIBLE = ("time", "train/rollout_s", "train/epoch_s", "train/train_s", "train/reward_host_s",
                    "train/reward_host_span_s", "eval/eval_s")


def _state(mesh, scale=1.0):
    sh = sharding.param_shardings({"w": jnp.zeros((8, 4))}, mesh, [("w", "fsdp")])
    params = jax.device_put({"w": scale * jnp.arange(32.0).reshape(8, 4)}, sh)
    return TrainState(step=jnp.array(3), params=params, ema=params, opt_state=(jnp.ones(2),), rng=jax.random.key(1))


def _corrupt(fs, step_dir):
    """Cut every data object of a saved step to one byte (its JSON and commit marker stay)."""
    for name in fs.find(step_dir):
        if not name.endswith((".json", "commit_success.txt")) and fs.size(name) > 0:
            fs.pipe(name, fs.cat(name)[:1])


# ------------------------------------------------------------------ checkpoints in a bucket


def test_checkpoints_round_trip_in_a_bucket_and_a_corrupt_one_names_the_intact_one(gcs):
    mesh = sharding.make_mesh((2, 4, 1))
    root = f"gs://{BUCKET}/ckpt_corrupt/ck"
    ck = Checkpointer(root, max_to_keep=5)
    assert ck.directory == root and ck.resume_step() is None  # the URI as given, no local abspath
    for step in (2, 4, 6):
        ck.save(step, _state(mesh, float(step)), {"epoch": step})
    ck.wait()
    restored, meta, step = Checkpointer(root, max_to_keep=5).restore(_state(mesh, 0.0))
    assert step == 6 and meta == {"epoch": 6}
    np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.asarray(_state(mesh, 6.0).params["w"]))
    assert restored.params["w"].sharding.spec == _state(mesh).params["w"].sharding.spec

    _corrupt(gcs, f"{BUCKET}/ckpt_corrupt/ck/6")
    _corrupt(gcs, f"{BUCKET}/ckpt_corrupt/ck/4")
    ck = Checkpointer(root, max_to_keep=5)
    with pytest.raises(CheckpointError, match=r"cannot restore checkpoint step 6 from gs://.*the newest intact "
                                              r"checkpoint is step 2: resume from it with --config.ckpt.restore_step=2"):
        ck.restore(_state(mesh))
    restored, meta, step = ck.restore(_state(mesh), 2)
    assert step == 2 and meta == {"epoch": 2}
    # the later steps are moved aside inside the bucket, and the run saves its own from there on
    assert storage.listdir(f"gs://{BUCKET}/ckpt_corrupt/ck.abandoned") == ["4", "6"] and ck.all_steps() == [2]
    assert not os.path.exists("gs:")
    ck.save(4, _state(mesh, 40.0), {"epoch": 4})
    ck.wait()
    assert ck.restore(_state(mesh))[2] == 4
    ck.close()


def test_a_save_killed_before_its_commit_marker_leaves_the_previous_checkpoint(gcs):
    """In a bucket a step is complete once commit_success.txt is written, last: a kill during the save leaves
    the step's directory without it, which is not a checkpoint, and saving that step again replaces it."""
    mesh = sharding.make_mesh((2, 4, 1))
    root = f"gs://{BUCKET}/ckpt_killed/ck"
    ck = Checkpointer(root)
    for step in (1, 2):
        ck.save(step, _state(mesh, float(step)), {"epoch": step})
        ck.wait()
    ck.close()
    assert gcs.exists(f"{BUCKET}/ckpt_killed/ck/2/commit_success.txt")
    gcs.rm(f"{BUCKET}/ckpt_killed/ck/2/commit_success.txt")  # what a kill mid-save leaves
    ck = Checkpointer(root)
    assert ck.resume_step() == 1
    restored, meta, step = ck.restore(_state(mesh, 0.0))
    assert step == 1 and meta == {"epoch": 1}
    np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.asarray(_state(mesh, 1.0).params["w"]))
    ck.save(2, _state(mesh, 20.0), {"epoch": 2})
    ck.wait()
    restored, meta, step = ck.restore(_state(mesh, 0.0))
    assert step == 2 and meta == {"epoch": 2}
    np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.asarray(_state(mesh, 20.0).params["w"]))
    ck.close()


def test_a_missing_bucket_is_one_line(gcs, capsys):
    with pytest.raises(storage.StorageError, match=r"bucket gs://no-such-bucket does not exist"):
        storage.makedirs("gs://no-such-bucket/run")
    # the RL job checks its workdir first, before anything is built
    assert main(["ng_jax", "--config=ng_jax/configs/awm.py", "--workdir=gs://no-such-bucket/run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ng_jax: error: gs://no-such-bucket/run: bucket gs://no-such-bucket does not exist or these "
                   "credentials cannot read it"]


# ------------------------------------------------------------------ an RL run killed and resumed


EPOCHS = 4


def _write_config(tmp_path, tiny_reference):
    """The tiny RL config (tests.fixtures.tiny_rl_config) with a checkpoint every epoch."""
    return write_tiny_config_file(tmp_path, tiny_reference.bundle, tiny_reference.prompts,
                                  {"eval.quality": False, "eval.every": 2, "ckpt.every": 1}, epochs=EPOCHS)


def _job(config, workdir, cwd, cache):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=REPO, NG_JAX_COMPILE_CACHE=cache)
    return dict(args=[sys.executable, "-m", "ng_jax.main", f"--config={config}", f"--workdir={workdir}"],
                cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _metrics(text: str) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in NOT_REPRODUCIBLE}
            for line in text.splitlines() if line.strip()]


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_from_the_bucket_exactly(gcs, tiny_reference, tmp_path):
    config, cache = _write_config(tmp_path, tiny_reference), str(tmp_path / "xla")
    cwd = tmp_path / "cwd"  # where a path mistaken for a local one would appear, as cwd/gs:/...
    cwd.mkdir()
    t0 = time.monotonic()
    local = subprocess.run(**_job(config, str(tmp_path / "local"), cwd, cache), timeout=900)
    assert local.returncode == 0, local.stdout[-3000:]
    t_local = time.monotonic() - t0

    run, prefix = f"gs://{BUCKET}/runs/awm", f"{BUCKET}/runs/awm"
    t0 = time.monotonic()
    killed = subprocess.Popen(**_job(config, run, cwd, cache))
    try:
        deadline = time.monotonic() + 900
        # SIGKILL as soon as the first checkpoint is committed (its marker is written last): the run is
        # then in epoch 2 or later, and a later save may be under way.
        while not gcs.exists(f"{prefix}/checkpoints/1/commit_success.txt"):
            assert killed.poll() is None, killed.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint was committed in time"
            time.sleep(0.1)
            gcs.invalidate_cache()
        killed.send_signal(signal.SIGKILL)
        out = killed.communicate(timeout=60)[0]
    finally:
        if killed.poll() is None:
            killed.kill()
            killed.wait()
    assert killed.returncode == -signal.SIGKILL, out[-3000:]
    gcs.invalidate_cache()
    assert not gcs.exists(f"{prefix}/summary.json")

    t0 = time.monotonic()
    resumed = subprocess.run(**_job(config, run, cwd, cache), timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    t_resumed = time.monotonic() - t0
    epoch = int(resumed.stdout.split("resumed at epoch ")[1].split()[0])
    print(f"uninterrupted (local workdir) {t_local:.0f} s; killed after checkpoint 1, resumed at epoch {epoch} "
          f"and finished in {t_resumed:.0f} s")
    assert 1 <= epoch < EPOCHS  # a real resume: epochs were left to train

    gcs.invalidate_cache()
    with open(tmp_path / "local" / "metrics.jsonl") as f:
        want = _metrics(f.read())
    got = _metrics(gcs.cat(f"{prefix}/metrics.jsonl").decode())
    assert [m["step"] for m in got] == [m["step"] for m in want]
    assert got == want  # every epoch's reward, loss, norms and evaluation: bit for bit
    summary = json.loads(gcs.cat(f"{prefix}/summary.json"))
    with open(tmp_path / "local" / "summary.json") as f:
        expected = json.load(f)
    for key in ("eval_initial", "eval", "history"):
        assert summary[key] == expected[key], key

    # everything in the bucket, nothing in a local directory named after it
    files = [p[len(prefix) + 1:] for p in gcs.find(prefix)]
    for name in ("summary.json", "metrics.jsonl", "policy/params.msgpack", "policy/config.json",
                 "samples/initial.png", f"samples/epoch_{EPOCHS:04d}.png", f"checkpoints/{EPOCHS}/commit_success.txt"):
        assert name in files, (name, files)
    assert any(p.startswith("tensorboard/events.out.tfevents") for p in files), files
    assert sorted(os.listdir(cwd)) == []
    assert not os.path.exists(os.path.join(REPO, "gs:"))
    # the exported policy loads from the bucket
    from ng_jax.models.bundle import load_bundle

    assert load_bundle(f"{run}/policy").info["optimizer_steps"] == 2 * EPOCHS
