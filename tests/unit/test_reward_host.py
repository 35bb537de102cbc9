"""Host rewards: validation, weighting, retries, timeouts, and per-shard callbacks on an 8-device mesh."""

import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ng_jax.rewards.host import PromptTable, RewardError, WeightedRewards, make_reward_fn, reset_callback_tokens
from tests.fixtures import REPO

BATCH_SPEC = P(("data", "fsdp"))
PROMPTS = ["a red circle", "two blue squares", "a small green triangle", "x"]


class ScriptedReward:
    """Deterministic score of (images, prompts); `mode` switches it into one failure at a time."""

    def __init__(self, name="scripted", offset=0.0):
        self.name = name
        self.offset = offset
        self.mode = "ok"
        self.batch_sizes = []
        self.calls = 0
        self.release = threading.Event()

    @staticmethod
    def expected(images, prompts, offset=0.0):
        return (images.astype(np.float64).mean(axis=(1, 2, 3)) / 255.0
                + 0.01 * np.asarray([len(p) for p in prompts]) + offset).astype(np.float32)

    def __call__(self, images, prompts):
        self.batch_sizes.append(images.shape[0])
        self.calls += 1
        scores = self.expected(images, prompts, self.offset)
        if self.mode == "raise":
            raise KeyError("model weights missing")
        if self.mode == "nan":
            scores[[1, 3] if len(scores) > 3 else [0]] = np.nan
        if self.mode == "shape":
            return scores[:, None]
        if self.mode == "strings":
            return np.asarray(["high"] * len(scores))
        if self.mode == "hang":
            self.release.wait(30)
        if self.mode.startswith("flaky"):  # "flaky:N" fails the first N calls
            if self.calls <= int(self.mode.split(":")[1]):
                raise ConnectionError(f"transient failure #{self.calls}")
        return scores


def _images(rng, b=8, h=4, w=5):
    return rng.integers(0, 256, size=(b, h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------ host path


def test_weighted_sum_and_parts():
    rng = np.random.default_rng(0)
    a, b = ScriptedReward("a"), ScriptedReward("b", offset=1.5)
    weighted = WeightedRewards({"a": a, "b": b}, {"b": -0.5, "a": 2.0})
    images, prompts = _images(rng), [PROMPTS[i % 4] for i in range(8)]
    total, parts = weighted.score_host(images, prompts)
    pa, pb = ScriptedReward.expected(images, prompts), ScriptedReward.expected(images, prompts, 1.5)
    assert weighted.names == ("a", "b") and list(parts) == ["a", "b"]
    np.testing.assert_allclose(parts["a"], pa, rtol=1e-6)
    np.testing.assert_allclose(parts["b"], pb, rtol=1e-6)
    np.testing.assert_allclose(total, 2.0 * pa - 0.5 * pb, rtol=1e-5)
    assert total.dtype == np.float32 and total.shape == (8,)


@pytest.mark.parametrize("mode, timeout_s, match", [
    ("raise", None, r"reward 'r' raised KeyError: 'model weights missing'"),
    ("nan", None, r"reward 'r' returned 2 non-finite value\(s\) .* at batch indices \[1, 3\]"),
    ("shape", None, r"reward 'r' returned shape \(8, 1\); expected \(8,\)"),
    ("strings", None, r"reward 'r' returned values of dtype <U4; expected real numbers"),
    ("raise", 5.0, r"reward 'r' raised KeyError"),
    ("nan", 5.0, r"non-finite value\(s\)"),
])
def test_each_failure_is_a_clear_reward_error(mode, timeout_s, match):
    reward = ScriptedReward("r")
    reward.mode = mode
    weighted = WeightedRewards({"r": reward}, {"r": 1.0}, timeout_s=timeout_s)
    with pytest.raises(RewardError, match=match) as info:
        weighted.score_host(_images(np.random.default_rng(1)), PROMPTS * 2)
    if mode == "raise":
        assert isinstance(info.value.__cause__, KeyError)
    assert weighted.last_error is info.value


def test_timeout():
    reward = ScriptedReward("slow")
    reward.mode = "hang"
    weighted = WeightedRewards({"slow": reward, "fast": ScriptedReward("fast")}, {"slow": 1.0, "fast": 1.0},
                               timeout_s=0.3)
    start = time.monotonic()
    try:
        with pytest.raises(RewardError, match=r"reward 'slow' timed out after 0.3 s"):
            weighted.score_host(_images(np.random.default_rng(2)), PROMPTS * 2)
        assert time.monotonic() - start < 5.0
    finally:
        reward.release.set()


def test_retries_recover_a_flaky_reward_and_report_exhaustion():
    rng = np.random.default_rng(3)
    images, prompts = _images(rng), PROMPTS * 2
    flaky = ScriptedReward("flaky")
    flaky.mode = "flaky:2"
    total, _ = WeightedRewards({"flaky": flaky}, {"flaky": 1.0}, retries=2).score_host(images, prompts)
    np.testing.assert_allclose(total, ScriptedReward.expected(images, prompts), rtol=1e-6)
    assert flaky.calls == 3
    flaky2 = ScriptedReward("flaky")
    flaky2.mode = "flaky:2"
    with pytest.raises(RewardError, match=r"transient failure #2 \(failed 2 attempts\)"):
        WeightedRewards({"flaky": flaky2}, {"flaky": 1.0}, retries=1, timeout_s=5).score_host(images, prompts)


@pytest.mark.parametrize("kwargs, match", [
    (dict(weights={"b": 1.0}), "differ"),
    (dict(weights={"a": float("nan")}), "finite number"),
    (dict(timeout_s=-1), "timeout_s"),
    (dict(retries=-1), "retries"),
])
def test_bad_configuration(kwargs, match):
    args = dict(rewards={"a": ScriptedReward("a")}, weights={"a": 1.0}) | kwargs
    with pytest.raises(ValueError, match=match):
        WeightedRewards(**args)


def test_bad_host_inputs():
    weighted = WeightedRewards({"a": ScriptedReward("a")}, {"a": 1.0})
    with pytest.raises(ValueError, match="uint8"):
        weighted.score_host(np.zeros((2, 4, 4, 3), np.float32), ["p", "q"])
    with pytest.raises(ValueError, match="one prompt per image"):
        weighted.score_host(np.zeros((2, 4, 4, 3), np.uint8), ["p"])


# ------------------------------------------------------------------ jax bridge on 8 devices


@pytest.fixture(scope="module")
def bridge():
    mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    a, b = ScriptedReward("a"), ScriptedReward("b", offset=-2.0)
    weighted = WeightedRewards({"a": a, "b": b}, {"a": 1.0, "b": 0.25})
    table = PromptTable(PROMPTS)
    fn = make_reward_fn(weighted, table, mesh, BATCH_SPEC)
    state = dict(mesh=mesh, a=a, b=b, weighted=weighted, table=table, fn=fn,
                 sharding=NamedSharding(mesh, BATCH_SPEC))
    yield state
    reset_callback_tokens(mesh)  # else jax re-raises the deliberately failed callbacks at exit


def _device_batch(bridge, seed=0, b=16):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1.1, 1.1, size=(b, 4, 5, 3)).astype(np.float32)  # slightly out of range: clipped
    ids = rng.integers(0, len(PROMPTS), size=b).astype(np.int32)
    return (images, ids, jax.device_put(images, bridge["sharding"]), jax.device_put(ids, bridge["sharding"]))


def test_callback_runs_per_shard_and_matches_host(bridge):
    for r in (bridge["a"], bridge["b"]):
        r.mode, r.batch_sizes = "ok", []
    images, ids, d_images, d_ids = _device_batch(bridge)
    total, parts = bridge["fn"](d_images, d_ids)
    assert sorted(bridge["a"].batch_sizes) == [2] * 8 and sorted(bridge["b"].batch_sizes) == [2] * 8
    u8 = np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
    want_total, want_parts = bridge["weighted"].score_host(u8, [PROMPTS[i] for i in ids])
    np.testing.assert_allclose(np.asarray(total), want_total, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(parts), np.stack([want_parts["a"], want_parts["b"]], 1), rtol=1e-6)
    assert parts.shape == (16, 2)
    assert total.sharding.is_equivalent_to(bridge["sharding"], 1)


def test_callback_inside_an_outer_jit_and_uint8_input(bridge):
    bridge["a"].mode = bridge["b"].mode = "ok"
    images, ids, d_images, d_ids = _device_batch(bridge, seed=1)
    u8 = np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
    outer = jax.jit(lambda x, i: bridge["fn"](x * 1.0, i))
    total, _ = outer(d_images, d_ids)
    want, _ = bridge["weighted"].score_host(u8, [PROMPTS[i] for i in ids])
    np.testing.assert_allclose(np.asarray(total), want, rtol=1e-6)
    total_u8, _ = bridge["fn"](jax.device_put(u8, bridge["sharding"]), d_ids)
    np.testing.assert_allclose(np.asarray(total_u8), want, rtol=1e-6)


def test_callback_failure_surfaces_the_reward_error(bridge):
    _, _, d_images, d_ids = _device_batch(bridge, seed=2)
    bridge["b"].mode = "nan"
    try:
        with pytest.raises(RewardError, match=r"reward 'b' returned 1 non-finite value\(s\)"):
            bridge["fn"](d_images, d_ids)
        # traced into the caller's own jit: jax's error text ends with ours, and last_error holds it
        bridge["weighted"].clear_error()
        outer = jax.jit(lambda x, i: bridge["fn"](x, i)[0].sum())
        with pytest.raises(Exception, match="non-finite value") as info:
            jax.block_until_ready(outer(d_images, d_ids))
        assert not isinstance(info.value, RewardError)
        assert isinstance(bridge["weighted"].last_error, RewardError)
    finally:
        bridge["b"].mode = "ok"


def test_prompt_table_is_read_at_call_time_and_ids_are_checked(bridge):
    bridge["a"].mode = bridge["b"].mode = "ok"
    images, ids, d_images, d_ids = _device_batch(bridge, seed=3)
    table = bridge["table"]
    try:
        table[:] = ["z" * 50] * len(PROMPTS)
        total, parts = bridge["fn"](d_images, d_ids)
        u8 = np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
        np.testing.assert_allclose(np.asarray(parts)[:, 0], ScriptedReward.expected(u8, ["z" * 50] * 16), rtol=1e-6)
        del table[2:]
        with pytest.raises(RewardError, match=r"outside the prompt table of 2 prompts"):
            bridge["fn"](d_images, jax.device_put(np.full(16, 3, np.int32), bridge["sharding"]))
    finally:
        table[:] = PROMPTS
    with pytest.raises(ValueError, match="one id per image"):
        bridge["fn"](d_images, d_ids[:8])


def test_process_exits_cleanly_after_a_callback_failure(tmp_path):
    """A reward failure traced into the caller's jit, then `reset_callback_tokens`: no exit noise."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "fail_then_exit.py"
    script.write_text(textwrap.dedent("""
        import jax, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from ng_jax.rewards.host import WeightedRewards, make_reward_fn, reset_callback_tokens

        class Broken:
            name = "broken"
            def __call__(self, images, prompts):
                raise OSError("scorer offline")

        mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 3)
        weighted = WeightedRewards({"broken": Broken()}, {"broken": 1.0})
        fn = make_reward_fn(weighted, ["p"], mesh, P(("data", "fsdp")))
        sh = NamedSharding(mesh, P(("data", "fsdp")))
        outer = jax.jit(lambda x, i: fn(x, i)[0])
        try:
            jax.block_until_ready(outer(jax.device_put(np.zeros((8, 2, 2, 3), np.float32), sh),
                                        jax.device_put(np.zeros(8, np.int32), sh)))
        except Exception:
            print("LAST:", weighted.last_error)
        reset_callback_tokens(mesh)
    """))
    import os

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LAST: reward 'broken' raised OSError: scorer offline" in out.stdout
    assert "Exception ignored" not in out.stderr


def test_verifier_reward_in_per_shard_callbacks_does_not_deadlock():
    """The shipped verifier scores inside the 8-device callbacks of an outer jit (a host reward that
    called JAX there would wait forever for the busy devices; the timeout turns that into an error)."""
    from ng_jax.data import world
    from ng_jax.rewards.verifier import VerifierReward

    mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    verifier = VerifierReward()
    weighted = WeightedRewards({"verifier": verifier}, {"verifier": 1.0}, timeout_s=60)
    prompts = ["a red circle", "two blue squares", "a green triangle left of a yellow cross", "a white cross"]
    fn = make_reward_fn(weighted, PromptTable(prompts), mesh, BATCH_SPEC)
    ids = np.arange(16, dtype=np.int32) % 4
    images = np.stack([world.render_prompt(prompts[i], 100 + k)[0] for k, i in enumerate(ids)])
    sh = NamedSharding(mesh, BATCH_SPEC)
    total, _ = jax.jit(lambda x, i: fn(x, i))(jax.device_put(images, sh), jax.device_put(ids, sh))
    np.testing.assert_allclose(np.asarray(total), verifier(images, [prompts[i] for i in ids]), rtol=1e-6)
    assert np.mean(np.asarray(total)) > 0.9  # renders of the prompts are judged correct


def test_take_timing_sums_callbacks_and_measures_their_span():
    """Host-callback timing: callbacks of two devices in parallel threads are busy twice as long as they span."""
    import threading as th
    import time as tm

    from ng_jax.rewards.host import WeightedRewards

    class Sleepy:
        name = "sleepy"

        def __call__(self, images, prompts):
            tm.sleep(0.2)
            return np.zeros(len(prompts), np.float32)

    w = WeightedRewards({"sleepy": Sleepy()}, {"sleepy": 1.0})
    images = np.zeros((2, 8, 8, 3), np.uint8)
    threads = [th.Thread(target=w.score_stacked, args=(images, ["a", "b"])) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    busy, span = w.take_timing()
    assert 0.39 < busy < 0.6 and 0.19 < span < 0.35
    assert w.take_timing() == (0.0, 0.0)  # reset
