"""Quality judges: Frechet distance, k-NN precision/recall and the shipped judge feature network."""
import json

import numpy as np
import pytest
import scipy.linalg

from ng_jax.data import prompts as prompt_sets
from ng_jax.judges import features as jf
from ng_jax.judges.toy import QualityJudge, frechet_distance, knn_precision_recall, reference_renders


def _reference_fd(a, b):
    """FD via the symmetric form Tr((S_a^1/2 S_b S_a^1/2)^1/2), eigen-decompositions only."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = scipy.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = scipy.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b)
                 - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


def test_fd_of_a_set_with_itself_is_zero(np_rng):
    x = np_rng.normal(size=(200, 8)) @ np_rng.normal(size=(8, 8))
    assert frechet_distance(x, x) < 1e-6 * np.trace(np.cov(x, rowvar=False))


def test_fd_grows_with_a_mean_shift(np_rng):
    x = np_rng.normal(size=(300, 6))
    y = np_rng.normal(size=(300, 6))
    fds = [frechet_distance(x, y + shift) for shift in (0.0, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(fds, fds[1:]))
    # A pure shift of y adds exactly ||shift * 1||^2 relative to x's and y's own means.
    expected_gap = np.sum((x.mean(0) - y.mean(0) - 2.0) ** 2) - np.sum((x.mean(0) - y.mean(0)) ** 2)
    assert fds[3] - fds[0] == pytest.approx(expected_gap, rel=1e-6)


def test_fd_matches_a_numpy_scipy_reference_on_gaussian_data(np_rng):
    d = 10
    a = np_rng.multivariate_normal(np.zeros(d), np.diag(np_rng.uniform(0.5, 2, d)), size=400)
    mix = np_rng.normal(size=(d, d))
    b = np_rng.multivariate_normal(np.full(d, 0.3), mix @ mix.T / d + 0.1 * np.eye(d), size=400)
    assert frechet_distance(a, b) == pytest.approx(_reference_fd(a, b), rel=1e-6)
    # Rank-deficient covariances (fewer samples than dimensions) still give a finite, non-negative number.
    fd = frechet_distance(a[:5], b[:5])
    assert np.isfinite(fd) and fd >= 0


def test_precision_recall_identical_sets_are_one(np_rng):
    x = np_rng.normal(size=(100, 5))
    assert knn_precision_recall(x, x.copy(), k=3) == {"precision": 1.0, "recall": 1.0}


def test_precision_recall_far_apart_sets_are_zero(np_rng):
    real = np_rng.normal(size=(80, 5))
    fake = np_rng.normal(size=(80, 5)) + 100.0
    assert knn_precision_recall(real, fake, k=3) == {"precision": 0.0, "recall": 0.0}


def test_precision_recall_mode_dropping(np_rng):
    """Fakes covering one of two real modes: high precision, recall about one half."""
    real = np.concatenate([np_rng.normal(size=(100, 4)), np_rng.normal(size=(100, 4)) + 50.0])
    fake = np_rng.normal(size=(100, 4))
    pr = knn_precision_recall(real, fake, k=3)
    assert pr["precision"] > 0.8
    assert 0.35 < pr["recall"] < 0.55


def test_metric_inputs_are_validated(np_rng):
    x = np_rng.normal(size=(10, 3))
    with pytest.raises(ValueError, match="feature dimensions"):
        frechet_distance(x, np_rng.normal(size=(10, 4)))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        frechet_distance(x[0], x)
    with pytest.raises(ValueError, match="at least 4 rows"):
        knn_precision_recall(x[:3], x, k=3)
    with pytest.raises(ValueError, match="NaN"):
        knn_precision_recall(np.full((10, 3), np.nan), x)


@pytest.fixture(scope="module")
def judge_features():
    return jf.JudgeFeatures()


@pytest.fixture(scope="module")
def render_sets():
    """Two independent render sets of the same TEST prompts, and uniform-noise images."""
    rng = np.random.default_rng(11)
    test = [p for _, p in prompt_sets.prompts_for("test")]
    chosen = [test[i] for i in rng.integers(0, len(test), 256)]
    a = reference_renders(chosen, rng.integers(0, 2**31, len(chosen)))
    b = reference_renders(chosen, rng.integers(0, 2**31, len(chosen)))
    noise = rng.integers(0, 256, a.shape, dtype=np.uint8)
    return a, b, noise, chosen


def test_reference_renders_are_deterministic(render_sets):
    _, _, _, chosen = render_sets
    first = reference_renders(chosen[:4], [1, 2, 3, 4])
    assert first.dtype == np.uint8 and first.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(first, reference_renders(chosen[:4], [1, 2, 3, 4]))
    assert not np.array_equal(first, reference_renders(chosen[:4], [5, 6, 7, 8]))
    with pytest.raises(ValueError, match="one seed per prompt"):
        reference_renders(chosen[:4], [1, 2])


def test_shipped_judge_features_shape_and_recorded_metrics(judge_features, render_sets):
    feats = judge_features.features(render_sets[0][:10])
    assert feats.dtype == np.float32 and feats.shape == (10, jf.FEATURE_DIM)
    assert np.all(np.isfinite(feats)) and feats.std(0).max() > 0
    metrics = json.loads((jf.DEFAULT_WEIGHTS.parent / "judge_features_metrics.json").read_text())
    assert metrics["count_acc"] > 0.9 and metrics["presence_label_acc"] > 0.95
    with pytest.raises(ValueError, match="uint8"):
        judge_features.features(render_sets[0][:2].astype(np.float32))


def test_renders_and_noise_are_far_apart_in_feature_space(judge_features, render_sets):
    a, b, noise, _ = render_sets
    fa, fb, fn = (judge_features.features(x) for x in (a, b, noise))
    assert frechet_distance(fn, fa) > 10 * frechet_distance(fb, fa)
    assert knn_precision_recall(fa, fn, k=3) == {"precision": 0.0, "recall": 0.0}


def test_quality_judge_prefers_fresh_renders_over_degraded_ones(judge_features, render_sets):
    a, b, _, _ = render_sets
    judge = QualityJudge(features=judge_features)
    good = judge.evaluate(b, a)
    noisy = np.clip(b + np.random.default_rng(0).normal(0, 30, b.shape), 0, 255).astype(np.uint8)
    bad = judge.evaluate(noisy, a)
    assert set(good) == {"fd", "precision", "recall", "kid", "kid_ci_low", "kid_ci_high", "saturation_diff",
                         "contrast_diff"}
    assert good["precision"] > 0.6 and good["recall"] > 0.6
    assert bad["fd"] > 2 * good["fd"]
    assert bad["precision"] < good["precision"]
    for r in (good, bad):
        assert r["kid_ci_low"] <= r["kid"] <= r["kid_ci_high"]
    assert bad["kid_ci_low"] > good["kid_ci_high"]  # the noise is seen by KID too, beyond its interval
