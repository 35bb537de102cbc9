"""The toy rewards: the shipped shapes-world verifier and JPEG (in)compressibility."""
import dataclasses
import json
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ng_jax.data import prompts as prompt_sets
from ng_jax.data import world
from ng_jax.rewards import verifier as vf
from ng_jax.rewards.jpeg import JpegCompressibility, JpegIncompressibility, jpeg_size_kb

PER_CATEGORY = 8


@pytest.fixture(scope="module")
def reward():
    return vf.VerifierReward()


@pytest.fixture(scope="module")
def correct_batch():
    """Fresh renders (seeds unseen in training) of TEST prompts, PER_CATEGORY per category."""
    rng = np.random.default_rng(2024)
    texts, scenes = [], []
    for category in world.CATEGORIES:
        pool = prompt_sets.split_prompts(category, "test")
        for i in range(PER_CATEGORY):
            text = pool[i % len(pool)]
            texts.append(text)
            scenes.append(world.sample_scene(text, rng))
    return np.stack([world.render(s) for s in scenes]), texts, scenes


def _wrong_prompt(spec: world.PromptSpec) -> world.PromptSpec:
    """A different prompt: another colour, another count, or the opposite relation."""
    (obj, count), rest = spec.groups[0], spec.groups[1:]
    if spec.relation is not None:
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        return world.make_prompt_spec(spec.groups, opposite[spec.relation])
    if len(spec.groups) == 1 and count > 1:
        return world.make_prompt_spec([(obj, count - 1 if count > 2 else count + 1)])
    colors = list(world.COLORS)
    taken = {o.color for o, _ in spec.groups}
    new_color = next(c for c in colors[colors.index(obj.color) + 1:] + colors if c not in taken)
    return world.make_prompt_spec([(dataclasses.replace(obj, color=new_color), count), *rest], spec.relation)


@pytest.fixture(scope="module")
def wrong_batch():
    """Renders of a different prompt (wrong colour / count / relation), judged wrong by the world."""
    rng = np.random.default_rng(7)
    texts, images = [], []
    for category in ("colors", "counting", "position", "color_attr"):
        for text in prompt_sets.split_prompts(category, "test")[:6]:
            spec = world.parse_prompt(text)
            scene = world.sample_scene(_wrong_prompt(spec), rng)
            assert not world.satisfies(spec, scene)  # the ground truth says it is wrong
            texts.append(text)
            images.append(world.render(scene))
    return np.stack(images), texts


def test_shipped_weights_load_with_recorded_metrics(reward):
    template = jax.eval_shape(vf.init_verifier_params, jax.random.key(0))
    assert jax.tree.map(lambda x: x.shape, template) == jax.tree.map(lambda x: x.shape, reward.params)
    metrics = json.loads((vf.ASSETS_DIR / "verifier_metrics.json").read_text())
    assert metrics["mean_over_categories"]["judge_acc_correct"] >= 0.95
    assert metrics["mean_over_categories"]["reject_rate_wrong"] >= 0.9


def test_missing_or_corrupt_weights_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_verifier"):
        vf.VerifierReward(weights_path=tmp_path / "absent.msgpack")
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(b"\x00 not a msgpack file")
    with pytest.raises(ValueError, match="corrupt"):
        vf.VerifierReward(weights_path=bad)


def test_detect_recovers_the_rendered_objects(reward, correct_batch):
    images, _, scenes = correct_batch
    detections = reward.detect(images)
    assert len(detections) == len(scenes)
    exact = 0
    for truth, found in zip(scenes, detections):
        key = lambda o: (o.shape, o.color, o.size)  # noqa: E731
        same = sorted(map(key, truth)) == sorted(map(key, found))
        close = all(min(np.hypot(t.cx - f.cx, t.cy - f.cy) for f in found) < 2.0 for t in truth) if found else not truth
        exact += same and close
    assert exact / len(scenes) >= 0.95


def test_correct_renders_are_judged_correct_with_score_one(reward, correct_batch):
    images, texts, _ = correct_batch
    scores = reward(images, texts)
    judged = reward.judge(images, texts)
    assert scores.dtype == np.float32 and scores.shape == (len(texts),)
    assert judged.dtype == bool and judged.shape == (len(texts),)
    assert judged.mean() >= 0.95
    np.testing.assert_array_equal(scores == 1.0, judged)  # graded score is 1 exactly when fully correct
    assert np.all((scores >= 0) & (scores <= 1))


def test_renders_of_a_different_prompt_score_lower(reward, correct_batch, wrong_batch):
    images, texts = wrong_batch
    scores = reward(images, texts)
    assert np.all((scores >= 0) & (scores <= 1)) and scores.dtype == np.float32
    assert np.mean(scores < 1.0) >= 0.9
    assert reward.judge(images, texts).mean() <= 0.1
    assert scores.mean() < reward(*correct_batch[:2]).mean() - 0.2


def test_bad_inputs_raise_value_errors(reward, correct_batch):
    images, texts, _ = correct_batch
    with pytest.raises(ValueError, match="uint8"):
        reward(images.astype(np.float32), texts)
    with pytest.raises(ValueError, match="shape"):
        reward(images[:, :16], texts)
    with pytest.raises(ValueError, match="one prompt per image"):
        reward(images, texts[:-1])
    with pytest.raises(world.PromptError):
        reward(images[:1], ["a purple dodecahedron"])


def test_count_distribution_matches_enumeration():
    p = np.array([[0.1, 0.7, 0.5, 0.9, 0.3]], np.float32)
    dist = np.asarray(vf.count_distribution(jnp.asarray(p), max_count=3))[0]
    exact = np.zeros(4)
    for bits in itertools.product([0, 1], repeat=p.shape[1]):
        prob = np.prod([pi if b else 1 - pi for pi, b in zip(p[0], bits)])
        exact[min(sum(bits), 3)] += prob
    np.testing.assert_allclose(dist, exact, atol=1e-6)


@pytest.fixture(scope="module")
def soft_and_grad():
    return jax.jit(jax.value_and_grad(lambda p, x, t: vf.soft_alignment(p, x, t).sum(), argnums=1))


def test_soft_alignment_is_differentiable_and_tracks_the_hard_score(reward, correct_batch, wrong_batch, soft_and_grad):
    n = 16
    images = np.concatenate([correct_batch[0][::3][:n], wrong_batch[0][:n]])
    texts = list(correct_batch[1][::3][:n]) + list(wrong_batch[1][:n])
    targets = vf.encode_prompts(texts)
    x = jnp.asarray(vf.images_to_float(images))
    soft = np.asarray(vf.soft_alignment(reward.params, x, texts))  # prompts encoded on the fly
    assert soft.shape == (len(texts),) and np.all((soft >= 0) & (soft <= 1 + 1e-6))
    hard = reward(images, texts)
    assert np.corrcoef(soft, hard)[0, 1] > 0.8
    total, grad = soft_and_grad(reward.params, x, targets)  # pre-encoded targets under jit
    assert float(total) == pytest.approx(soft.sum(), rel=1e-4)
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


def test_jpeg_flat_image_is_more_compressible_than_noise(np_rng):
    flat = np.full((2, 32, 32, 3), 128, np.uint8)
    noise = np_rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    images = np.concatenate([flat, noise])
    comp = JpegCompressibility()(images, ["a circle"] * 4)
    incomp = JpegIncompressibility()(images, ["a circle"] * 4)
    assert comp.dtype == np.float32 and comp.shape == (4,)
    assert comp[:2].min() > comp[2:].max()
    np.testing.assert_allclose(incomp, -comp)
    np.testing.assert_allclose(incomp, jpeg_size_kb(images, 95), rtol=1e-6)
    assert JpegCompressibility(quality=50)(noise).max() > comp[2:].max()  # lower quality, smaller files


def test_jpeg_rejects_bad_inputs():
    with pytest.raises(ValueError, match="uint8"):
        JpegCompressibility()(np.zeros((1, 8, 8, 3), np.float32), ["x"])
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        JpegCompressibility()(np.zeros((8, 8, 3), np.uint8), ["x"])
    with pytest.raises(ValueError, match="quality"):
        JpegCompressibility(quality=0)


def test_numpy_detector_forward_matches_the_jax_network():
    """The host reward's numpy forward is the jax network's (same detections, same centres)."""
    params = vf.load_verifier_params()
    rng = np.random.default_rng(0)
    renders = np.stack([world.render_prompt(p, s)[0] for s, p in enumerate(
        ["a red circle", "three blue squares", "a small green triangle above a large yellow cross"])])
    noise = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    x = vf.images_to_float(np.concatenate([renders, noise]))
    want = jax.device_get(vf.make_cell_forward()(params, x))
    got = vf.numpy_cell_forward(jax.device_get(params), x)
    np.testing.assert_allclose(got[0], want[0], atol=2e-5)   # objectness
    for g, w in zip(got[1:4], want[1:4]):                     # shape / colour / size decisions
        assert np.array_equal(g[want[0] > 0.05], w[want[0] > 0.05])
    np.testing.assert_allclose(got[4], want[4], atol=1e-4)   # centres


def test_constraint_failures_name_what_fails_per_category():
    from ng_jax.data.world import PlacedObject
    from ng_jax.eval.evaluate import constraint_failures

    red, blue = (PlacedObject("circle", c, "large", 16.0, 16.0) for c in ("red", "blue"))
    square = PlacedObject("square", "red", "large", 6.0, 6.0)
    out = constraint_failures(["a red circle", "a red circle", "a red circle"], [[red], [blue], [red, square]])
    assert out == {"colors": {"g0_color": 1 / 3, "g0_count": 0.0, "no_extra_objects": 1 / 3}}


def test_repeat_prompts_tops_up_small_categories():
    from ng_jax.eval.evaluate import repeat_prompts

    prompts = ["a circle", "a red circle", "a blue square", "a green cross", "two crosses"]
    out = repeat_prompts(prompts, 2, min_per_category=0)
    assert out == [p for p in prompts for _ in range(2)]
    out = repeat_prompts(prompts, 2, min_per_category=9)
    # single_object: 1 prompt -> 9 samples; colors: 3 prompts -> 3 each; counting: 1 prompt -> 9.
    assert [out.count(p) for p in prompts] == [9, 3, 3, 3, 9]
    assert out[:9] == ["a circle"] * 9  # samples of a prompt stay consecutive
