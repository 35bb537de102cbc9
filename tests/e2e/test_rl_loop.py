"""The RL loop end to end on the tiny pretrained reference (32x32, 64 image tokens; the session fixture
`tiny_reference`) and 8 fake CPU devices.

One uninterrupted 8-epoch AWM run (the `baseline` fixture) is shared: it must raise the reward beyond
what the same run at lr = 0 reaches (the `control`: same seed, prompts and noise), and write metrics,
TensorBoard events, sample grids, checkpoints and summary.json. A SIGTERM'd run resumed to the end
must reproduce its metrics exactly. Failure runs start from a copy of its
workdir (so a "last good checkpoint" exists) and must stop with their message, leaving that
checkpoint byte-for-byte intact.

Compile time dominates on 2 cores, so a persistent compilation cache (module-scoped, in a tmp
dir) lets later runs reuse the executables of the first one; only the rollout, whose host
callback cannot be cached, is compiled again in every run.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import threading
import time

import jax
import ml_collections as mlc
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from ng_jax import sharding
from ng_jax.eval import evaluate
from ng_jax.rl import loop
from ng_jax.checkpoint import CheckpointError, Checkpointer, Preemption
from ng_jax.errors import TrainingError
from ng_jax.rewards import registry
from ng_jax.main import main
from ng_jax.models.bundle import ModelBundle, load_bundle, save_bundle
from ng_jax.logs import read_metrics
from ng_jax.rewards.host import RewardError
from ng_jax.rewards.jpeg import JpegIncompressibility
from tests.fixtures import tiny_rl_config, write_tiny_config_file

pytestmark = pytest.mark.slow
EPOCHS = 8
TIMING_KEYS = ("time", "train/rollout_s", "train/epoch_s", "train/train_s", "train/reward_host_s", "train/reward_host_span_s",
               "eval/eval_s")


# ------------------------------------------------------------------ test rewards


class _Incompressible:
    """JPEG incompressibility with a failure mode; counts its calls (one per device shard)."""

    def __init__(self, name, mode):
        self.name, self.mode = name, mode
        self.inner = JpegIncompressibility()
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, images, prompts):
        with self._lock:
            self.calls += 1
            call = self.calls
        scores = self.inner(images, prompts)
        if self.mode == "raises":
            raise RuntimeError("scorer crashed")
        if self.mode == "nan":
            scores[0] = np.nan
            return scores
        if self.mode == "shape":
            return scores[:, None]
        if self.mode == "sleeps":
            time.sleep(3.0)
        if self.mode == "flaky" and call == 1:
            raise ConnectionError("transient failure")
        return scores


TEST_REWARDS = {}


@pytest.fixture(scope="module", autouse=True)
def test_rewards():
    """Registers `test_<mode>` rewards; `TEST_REWARDS[name]` is the instance of the latest run."""
    def factory(name, mode):
        def make(cfg):
            TEST_REWARDS[name] = _Incompressible(name, mode)
            return TEST_REWARDS[name]
        return make

    with contextlib.ExitStack() as stack:  # the registry is restored when the module's tests are done
        for mode in ("raises", "nan", "shape", "sleeps", "flaky"):
            stack.enter_context(registry.registered(f"test_{mode}", factory(f"test_{mode}", mode)))
        yield


# ------------------------------------------------------------------ shared fixtures


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    saved = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    compilation_cache.reset_cache()
    yield
    for k, v in saved.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_reference):
    return {"root": tmp_path_factory.mktemp("rl"), "bundle": tiny_reference.bundle, "prompts": tiny_reference.prompts}


def _config(files, **kw):
    return tiny_rl_config(files["bundle"], files["prompts"], **kw)


@pytest.fixture(scope="module")
def baseline(files):
    workdir = str(files["root"] / "baseline")
    assert loop.run(_config(files, epochs=EPOCHS), workdir) == 0
    return workdir


@pytest.fixture(scope="module")
def control(files, baseline):
    """The baseline run with lr = 0: the same seed, so the same prompts and rollout noise every epoch and
    the same evaluation noise; its policy stays the reference, so its rewards move by sampling alone."""
    workdir = str(files["root"] / "control")
    config = _config(files, epochs=EPOCHS)
    config.optim.lr = 0.0
    assert loop.run(config, workdir) == 0
    return workdir


def _metrics(workdir):
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS}
            for m in read_metrics(os.path.join(workdir, "metrics.jsonl"))]


def _train_records(workdir):
    return [m for m in _metrics(workdir) if "train/reward" in m]


def _summary(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


def _digest(directory):
    """sha256 over every file's relative path and bytes (is a checkpoint intact?)."""
    h = hashlib.sha256()
    for root, dirs, names in sorted(os.walk(directory)):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, directory).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _steps(ckpt_dir):
    ckpt = Checkpointer(ckpt_dir)
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()


def _copy(baseline, tmp_path, name="resumed"):
    workdir = str(tmp_path / name)
    shutil.copytree(baseline, workdir)
    return workdir


# ------------------------------------------------------------------ the short run


def test_short_run_raises_the_reward_over_an_lr0_control(baseline, control):
    trained, fixed = ([m["train/reward"] for m in _train_records(w)] for w in (baseline, control))
    print("train rewards, trained:", np.round(trained, 4), "lr = 0:", np.round(fixed, 4))
    assert len(trained) == len(fixed) == EPOCHS
    # Epoch 1 samples the reference in both runs, with the same prompts and noise.
    assert trained[0] == fixed[0]
    run, ctl = _summary(baseline), _summary(control)
    gain, ctl_gain = (s["eval"]["reward"] - s["eval_initial"]["reward"] for s in (run, ctl))
    print(f"eval reward gain: trained {gain:+.4f}, lr = 0 {ctl_gain:+.4f}")
    # The control's policy is the reference and the evaluation noise is fixed: its evaluation cannot move.
    assert ctl["eval_initial"] == run["eval_initial"] and ctl_gain == 0.0
    assert gain - ctl_gain > 0.05
    # Rollouts: each epoch has other prompts and noise, so the control's rewards wander by sampling
    # alone; the trained run, on the same prompts and noise, ends above everything the control reached.
    noise = max(fixed) - min(fixed)
    assert np.mean(trained[-2:]) - np.mean(fixed[-2:]) > max(0.05, noise), (trained, fixed)


def test_run_writes_summary_metrics_grids_and_checkpoints(files, baseline):
    summary = _summary(baseline)
    config = tiny_rl_config("", "")
    for key in ("eval_initial", "eval"):
        ev = summary[key]
        for name in ("reward", "norm_ratio", "fd", "precision", "recall"):
            assert isinstance(ev[name], float) and np.isfinite(ev[name]), (key, name, ev.get(name))
        by_sigma = np.asarray(ev["norm_ratio_by_sigma"])
        assert by_sigma.shape == (config.eval.num_steps, 2)
        assert by_sigma[0, 0] == pytest.approx(1.0) and np.all(np.diff(by_sigma[:, 0]) < 0)
        assert np.all(by_sigma[:, 1] > 0)
        assert 0.0 <= ev["precision"] <= 1.0 and 0.0 <= ev["recall"] <= 1.0
        # overall accuracy as GenEval reports it: the mean of the categories, not of the pooled samples
        assert ev["accuracy_overall"] == pytest.approx(np.mean(list(ev["accuracy_by_category"].values())))
    # Before any update the policy is the reference: the norm ratio is exactly 1 at every sigma.
    np.testing.assert_allclose(np.asarray(summary["eval_initial"]["norm_ratio_by_sigma"])[:, 1], 1.0, rtol=1e-6)
    assert [h["epoch"] for h in summary["history"]] == [3, 6, 8]

    with open(os.path.join(baseline, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert all(isinstance(r["step"], int) for r in records)
    train_recs = [r for r in records if "train/reward" in r]
    assert [r["step"] for r in train_recs] == list(range(1, EPOCHS + 1))
    for r in train_recs:
        for key in ("train/loss", "train/norm_ratio", "train/grad_norm", "train/reward/jpeg_incompressibility"):
            assert np.isfinite(r[key]), key
        assert r["train/optimizer_steps"] == 2 * r["step"]  # 16 rollouts / train_batch 8
    assert sorted(r["step"] for r in records if "eval/reward" in r) == [0, 3, 6, 8]

    assert sorted(os.listdir(os.path.join(baseline, "samples"))) == [
        "epoch_0003.png", "epoch_0006.png", "epoch_0008.png", "initial.png"]
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(baseline, "tensorboard")))
    assert _steps(os.path.join(baseline, "checkpoints")) == [4, 6, 8]

    # The final policy is exported as a bundle (what the analyses load): the checkpoint's params.
    assert summary["rewards"] == {"jpeg_incompressibility": 1.0} and summary["seed"] == 0
    policy = load_bundle(os.path.join(baseline, "policy"))
    reference = load_bundle(files["bundle"])
    moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(policy.params["velocity"]),
                                                        jax.tree.leaves(reference.params["velocity"]))]
    assert max(moved) > 0  # trained
    for a, b in zip(jax.tree.leaves(policy.params["text"]), jax.tree.leaves(reference.params["text"])):
        np.testing.assert_array_equal(a, b)  # RL does not train the text encoder


# ------------------------------------------------------------------ SIGTERM and exact resume


def _sigterm_once_the_loop_handles_it(timeout_s=600.0):
    """Send SIGTERM to this process as soon as the RL loop's handler is installed (never before:
    pytest would die)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        handler = signal.getsignal(signal.SIGTERM)
        if isinstance(getattr(handler, "__self__", None), Preemption):
            os.kill(os.getpid(), signal.SIGTERM)
            return
        time.sleep(0.005)


def test_sigterm_checkpoints_at_the_epoch_boundary_and_resume_is_exact(files, baseline, tmp_path):
    workdir = str(tmp_path / "interrupted")
    config = _config(files, epochs=EPOCHS)
    killer = threading.Thread(target=_sigterm_once_the_loop_handles_it, daemon=True)
    killer.start()
    assert loop.run(config, workdir) == 0
    killer.join(timeout=1)
    assert _steps(os.path.join(workdir, "checkpoints")) == [1]
    assert [m["step"] for m in _train_records(workdir)] == [1]
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    assert not isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), Preemption)

    assert loop.run(config, workdir) == 0
    assert _metrics(workdir) == _metrics(baseline)  # every epoch's reward, loss, norms, evals: bit for bit
    assert _summary(workdir)["eval"] == _summary(baseline)["eval"]


# ------------------------------------------------------------------ failures


def _write_config(tmp_path, files, **kw):
    """A config file for the entry point that builds the tiny config with `kw`."""
    return write_tiny_config_file(tmp_path, files["bundle"], files["prompts"], **kw)


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("ng_jax: error:")]


@pytest.mark.parametrize("mode, timeout_s, message", [
    ("raises", 0.0, r"reward 'test_raises' raised RuntimeError: scorer crashed"),
    ("nan", 0.0, r"reward 'test_nan' returned 1 non-finite value\(s\)"),
    ("shape", 0.0, r"reward 'test_shape' returned shape \(2, 1\); expected \(2,\)"),
    ("sleeps", 0.3, r"reward 'test_sleeps' timed out after 0.3 s"),
])
def test_reward_failure_stops_with_its_message_and_keeps_the_checkpoint(files, baseline, tmp_path, capsys,
                                                                         mode, timeout_s, message):
    workdir = _copy(baseline, tmp_path)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    before = _digest(ckpt_dir)
    config_file = _write_config(tmp_path, files, epochs=EPOCHS + 1, rewards={f"test_{mode}": 1.0}, quality=False)
    code = main(["ng_jax.main", f"--config={config_file}", f"--workdir={workdir}",
                 f"--config.rewards.timeout_s={timeout_s}"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    assert re.search(message, lines[0]), lines[0]
    assert f"epoch {EPOCHS + 1}:" in lines[0]
    assert f"last good checkpoint: epoch {EPOCHS} in {os.path.abspath(ckpt_dir)}" in lines[0]
    assert _digest(ckpt_dir) == before
    assert _steps(ckpt_dir) == [4, 6, 8]
    assert [m["step"] for m in _train_records(workdir)] == list(range(1, EPOCHS + 1))


def test_reward_failure_in_process_is_a_reward_error(files, baseline, tmp_path):
    workdir = _copy(baseline, tmp_path)
    config = _config(files, epochs=EPOCHS + 1, rewards={"test_raises": 1.0}, quality=False)
    with pytest.raises(RewardError, match=r"epoch 9: reward 'test_raises' raised RuntimeError: scorer crashed; "
                                          r"last good checkpoint: epoch 8") as info:
        loop.run(config, workdir)
    assert "\n" not in str(info.value)


def test_nonfinite_loss_stops_naming_the_epoch_after_a_retried_reward(files, baseline, tmp_path):
    """A reference with one NaN parameter makes the loss NaN (its KL term) while the rollouts of the
    restored, finite policy stay fine. The reward fails its first call and is retried (retries=1)."""
    ref = load_bundle(files["bundle"])
    params = jax.tree.map(np.array, ref.params)
    params["velocity"]["proj_out"]["bias"][0] = np.nan
    nan_bundle = save_bundle(str(tmp_path / "nan_bundle"), ModelBundle(ref.model_cfg, ref.text_cfg, ref.sampling,
                                                                       params, ref.info))
    workdir = _copy(baseline, tmp_path)
    before = _digest(os.path.join(workdir, "checkpoints"))
    config = tiny_rl_config(nan_bundle, files["prompts"], epochs=EPOCHS + 1, rewards={"test_flaky": 1.0},
                            quality=False)
    config.rewards.retries = 1
    with pytest.raises(TrainingError, match=r"non-finite loss or gradient at epoch 9, optimizer step 1 .*"
                                                  r"the update was not applied; last good checkpoint: epoch 8"):
        loop.run(config, workdir)
    assert TEST_REWARDS["test_flaky"].calls == 8 + 1  # 8 device shards, one retried
    assert _digest(os.path.join(workdir, "checkpoints")) == before


def _truncate_data_files(step_dir):
    for root, _, names in os.walk(os.path.join(step_dir, "state")):
        for name in names:
            path = os.path.join(root, name)
            if os.path.getsize(path) > 1:
                with open(path, "r+b") as f:
                    f.truncate(1)


@pytest.mark.parametrize("damage, message", [
    ("corrupt", r"cannot restore checkpoint step 8 .*newest intact checkpoint is step 6: resume from it with "
                r"--config.ckpt.restore_step=6"),
    ("leftovers_only", r"holds no complete checkpoint but is not empty \(8.orbax-checkpoint-tmp-1\)"),
    ("lora_mismatch", r"cannot restore checkpoint step 8 .*(missing|unexpected)"),
])
def test_bad_checkpoints_are_checkpoint_errors_not_fresh_starts(files, baseline, tmp_path, damage, message):
    workdir = _copy(baseline, tmp_path)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    config = _config(files, epochs=EPOCHS + 1, quality=False)
    if damage == "corrupt":
        _truncate_data_files(os.path.join(ckpt_dir, "8"))
    elif damage == "leftovers_only":  # an interrupted first save
        shutil.rmtree(ckpt_dir)
        os.makedirs(os.path.join(ckpt_dir, "8.orbax-checkpoint-tmp-1"))
    else:  # resuming a full fine-tuning checkpoint as a LoRA run
        config.lora.rank = 2
    lines_before = len(_metrics(workdir))
    with pytest.raises(CheckpointError, match=message):
        loop.run(config, workdir)
    assert len(_metrics(workdir)) == lines_before  # nothing was trained or logged


def test_restore_step_resumes_from_the_named_intact_checkpoint(files, baseline, tmp_path):
    """After a corrupt latest checkpoint, --config.ckpt.restore_step=N resumes from N, retrains the epochs after
    it exactly (same prompts, noise and optimizer state) and keeps the corrupt step aside."""
    workdir = _copy(baseline, tmp_path)
    _truncate_data_files(os.path.join(workdir, "checkpoints", "8"))
    config = _config(files, epochs=EPOCHS)
    config.ckpt.restore_step = 6
    assert loop.run(config, workdir) == 0
    assert os.listdir(os.path.join(workdir, "checkpoints.abandoned")) == ["8"]
    assert _metrics(workdir) == _metrics(baseline)  # epochs 7 and 8 retrained bit-identically


def test_evaluate_job_scores_the_reference_without_a_second_pass(files, tmp_path, capsys):
    """The `evaluate` job skips the reference forward pass when it scores the reference itself: same
    images, rewards and accuracies as the two-pass evaluation, norm ratio 1; small categories topped up."""
    from ng_jax.eval.evaluate import Evaluator
    from ng_jax.rewards.registry import build_rewards
    from ng_jax.models.stack import build_model_stack

    c = _eval_job_config(files)
    assert evaluate.run(c, str(tmp_path)) == 0
    out = capsys.readouterr().out
    # 7 colour prompts x 2 samples; the one counting prompt is topped up to 6 samples.
    assert "| colors | 14 |" in out and "| counting | 6 |" in out
    got = json.load(open(tmp_path / "eval.json"))
    assert got["norm_ratio"] == 1.0
    stack = build_model_stack(c, None, None)
    two_pass = Evaluator(c.eval, stack, sharding.make_mesh(c.mesh.shape), weighted=build_rewards(c.rewards),
                         policy_params=lambda p, r: p, workdir=None)
    want = two_pass(stack.ref, tag="x", step=0)
    for key in ("reward", "accuracy", "accuracy_overall", "fd", "precision", "recall"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    assert want["norm_ratio"] == pytest.approx(1.0, abs=1e-6)


def _eval_job_config(files):
    from ng_jax.eval.grid import load_config_file

    c = load_config_file("eval_reference.py")
    tiny = _config(files)
    c.reference = files["bundle"]
    c.rewards = tiny.rewards
    c.eval.prompt_file = files["prompts"]
    for key in ("batch_size", "num_steps", "cfg_scale", "grid_size"):
        c.eval[key] = tiny.eval[key]
    c.eval.samples_per_prompt = 2
    c.eval.min_samples_per_category = 6
    return c


def test_evaluation_sampler_places_activations_by_the_rule_table(files):
    """The evaluation sampler is traced under the run's activation rules, like the rollout: its
    lowering carries the sharding constraints that the models' `constrain` calls emit."""
    from ng_jax.eval.evaluate import Evaluator
    from ng_jax.rewards.registry import build_rewards
    from ng_jax.models.stack import build_model_stack

    c = _eval_job_config(files)
    stack = build_model_stack(c, None, None)
    mesh = sharding.make_mesh(c.mesh.shape)
    ev = Evaluator(c.eval, stack, mesh, weighted=build_rewards(c.rewards), policy_params=lambda p, r: p,
                   workdir=None)
    args = (stack.ref, stack.ref, ev.noise[0], ev.conds[0], ev.uncond)
    lowered = ev._sample.lower(*args).as_text()
    bare = jax.jit(lambda p, r, n, cond, u: ev.sampler(p, n, cond, u, None, ref_params=r)).lower(*args).as_text()
    marker = "sharding_constraint" if "sdy." in lowered else "@Sharding"
    assert bare.count(marker) == 0
    assert lowered.count(marker) >= 3, lowered.count(marker)  # block boundaries, attention heads, MLP


def test_initial_evaluation_is_cached_across_runs_and_final_only_variants(files, tmp_path, monkeypatch):
    """Two runs of different seeds that share the reference and the evaluation settings evaluate the
    reference once (eval.initial_cache); a final_only variant runs before training and after the last
    epoch only. With eval.norms="final" only the evaluations before and after training measure the norm
    ratio, and a variant's norms="never" skips it there too."""
    calls = []
    real_call = evaluate.Evaluator.__call__
    monkeypatch.setattr(evaluate.Evaluator, "__call__",
                        lambda self, p, *, tag, step: calls.append(tag) or real_call(self, p, tag=tag, step=step))
    summaries = []
    for seed in (0, 1):
        config = _config(files, epochs=2)
        config.seed = seed
        config.eval.every = 1
        config.eval.quality = False
        config.eval.initial_cache = str(tmp_path / "initial")
        config.eval.norms = "final"
        config.eval.variants = mlc.ConfigDict({"steps2": {"num_steps": 2, "final_only": True, "norms": "never"}})
        assert loop.run(config, str(tmp_path / f"s{seed}")) == 0
        with open(tmp_path / f"s{seed}" / "summary.json") as f:
            summaries.append(json.load(f))
    assert calls == ["initial", "initial_steps2", "epoch_0001", "epoch_0002", "epoch_0002_steps2",
                     "epoch_0001", "epoch_0002", "epoch_0002_steps2"]
    assert summaries[0]["eval_initial"] == summaries[1]["eval_initial"]
    assert "steps2" in summaries[0]["eval_initial"]["variants"] and "steps2" in summaries[1]["eval"]["variants"]
    for s in summaries:
        assert [h["epoch"] for h in s["history"]] == [1, 2]
        assert "norm_ratio" not in s["history"][0]  # epoch 1: no reference pass (the history keeps numbers only)
        for final in (s["eval_initial"], s["eval"]):
            assert 0.5 < final["norm_ratio"] < 2 and len(final["norm_ratio_by_sigma"]) == config.eval.num_steps
            assert final["variants"]["steps2"]["norm_ratio"] is None and final["variants"]["steps2"]["reward"] is not None
    assert len(os.listdir(tmp_path / "initial")) == 1
    # another reward is another cache entry
    config.rewards.weights = mlc.ConfigDict({"jpeg_compressibility": 1.0})
    assert loop.run(config, str(tmp_path / "other_reward")) == 0
    assert len(os.listdir(tmp_path / "initial")) == 2 and calls.count("initial") == 2


def _tensorboard_images(directory) -> dict[str, list[int]]:
    """tag -> steps of the image summaries in the TensorBoard event files under `directory` (TFRecord framing:
    u64 length, u32 crc, payload, u32 crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    found: dict[str, list[int]] = {}
    for name in os.listdir(directory):
        data = open(os.path.join(directory, name), "rb").read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("image"):
                    found.setdefault(v.tag, []).append(event.step)
    return found


def test_wandb_offline_and_tensorboard_images(files, tmp_path, monkeypatch):
    """logging.wandb=True (offline) logs the same scalars as metrics.jsonl plus sample grids and norm-ratio plots,
    which TensorBoard gets too."""
    wandb = pytest.importorskip("wandb")
    logged = []
    real_log = wandb.sdk.wandb_run.Run.log
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log",
                        lambda self, data, step=None, **kw: logged.append((step, dict(data))) or real_log(
                            self, data, step=step, **kw))
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = _config(files, epochs=2)
    config.eval.every = 1
    config.eval.quality = False
    config.eval.variants = mlc.ConfigDict({"guided": {"cfg_scale": 3.0, "final_only": True}})
    config.logging.wandb = True
    workdir = str(tmp_path / "run")
    assert loop.run(config, workdir) == 0
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    scalars = {(s, k): v for s, d in logged for k, v in d.items() if isinstance(v, float)}
    assert scalars[(2, "eval/reward")] == pytest.approx(summary["eval"]["reward"])
    assert scalars[(2, "eval/guided/reward")] == pytest.approx(summary["eval"]["variants"]["guided"]["reward"])
    train = [m for m in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "train/reward" in m]
    assert [scalars[(m["step"], "train/reward")] for m in train] == pytest.approx([m["train/reward"] for m in train])
    images = {(s, k) for s, d in logged for k, v in d.items() if isinstance(v, wandb.Image)}
    assert {(0, "samples_plain"), (0, "samples_guided"), (1, "samples_plain"), (2, "samples_guided"),
            (0, "norm_ratio"), (2, "norm_ratio")} <= images and (1, "samples_guided") not in images
    runs = [d for d in os.listdir(os.path.join(workdir, "wandb")) if d.startswith("offline-run-")]
    assert len(runs) == 1
    assert len(os.listdir(os.path.join(workdir, "wandb", runs[0], "files", "media", "images"))) >= 6
    tb = _tensorboard_images(os.path.join(workdir, "tensorboard"))
    assert sorted(tb["samples_plain"]) == [0, 1, 2] and sorted(tb["norm_ratio"]) == [0, 1, 2]
    assert sorted(tb["samples_guided"]) == [0, 2]


def test_prompt_metadata_from_a_jsonl_file_reaches_the_rewards(files, tmp_path):
    """A JSONL prompt file's other fields travel with each prompt to the rewards that use metadata, in the
    rollouts and the evaluations."""
    from tests.fixtures import PROMPTS

    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "tag": f"t{i}", "n": i}) for i, p in enumerate(PROMPTS)) + "\n")
    seen = []

    class UsesMetadata:
        name, uses_metadata = "uses_metadata", True

        def __call__(self, images, prompts, metadata):
            seen.extend(zip(prompts, metadata))
            return np.asarray([m["n"] for m in metadata], np.float32)

    with registry.registered("uses_metadata", lambda cfg: UsesMetadata()):
        config = _config(files, epochs=1, rewards={"uses_metadata": 1.0})
        config.data.prompt_file = config.eval.prompt_file = str(path)
        config.eval.quality = False
        assert loop.run(config, str(tmp_path / "run")) == 0
    assert len(seen) >= 16 and all(m == {"tag": f"t{PROMPTS.index(p)}", "n": PROMPTS.index(p)} for p, m in seen)


def test_evaluate_job_scores_a_trained_policy_against_its_reference(files, baseline, tmp_path):
    """--config.policy=WORKDIR: the evaluate job scores the run's final policy with the run's evaluation settings
    and gets the run's own final evaluation (same prompts, noise, reward and norm ratio)."""
    c = _eval_job_config(files)
    run = _config(files, epochs=EPOCHS)
    c.eval, c.rewards, c.policy = run.eval, run.rewards, baseline
    assert evaluate.run(c, str(tmp_path)) == 0
    got = json.load(open(tmp_path / "eval.json"))
    want = json.load(open(os.path.join(baseline, "summary.json")))["eval"]
    assert got["norm_ratio"] != 1.0
    for key in ("reward", "norm_ratio", "fd", "kid"):
        assert got[key] == pytest.approx(want[key], rel=2e-3), key
    c.policy = str(tmp_path / "nowhere")
    with pytest.raises(Exception, match="nowhere"):
        evaluate.run(c, str(tmp_path / "x"))
