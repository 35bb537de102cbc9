"""Quality measures that can see a difference: unbiased KID with its interval, FD / KID noise floors,
pixel probes of over-saturation, and hand-computed k-NN precision/recall."""
import itertools

import numpy as np
import pytest

from ng_jax.judges import kid as kid_mod
from ng_jax.judges import probes
from ng_jax.judges.kid import (
    KIDResult,
    fd_noise_floor,
    kid,
    kid_from_kernels,
    kid_noise_floor,
    noise_floors,
    polynomial_kernel,
)
from ng_jax.judges.toy import frechet_distance, knn_precision_recall


def _brute_kid(a, b):
    """The unbiased MMD^2 written out with explicit double loops."""
    d = a.shape[1]
    k = lambda x, y: (x @ y / d + 1.0) ** 3
    n, m = len(a), len(b)
    s_aa = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j)
    s_bb = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j)
    s_ab = sum(k(a[i], b[j]) for i in range(n) for j in range(m))
    return s_aa / (n * (n - 1)) + s_bb / (m * (m - 1)) - 2 * s_ab / (n * m)


def _brute_paired_kid(a, b):
    d = a.shape[1]
    k = lambda x, y: (x @ y / d + 1.0) ** 3
    n = len(a)
    return sum(k(a[i], a[j]) + k(b[i], b[j]) - k(a[i], b[j]) - k(a[j], b[i])
               for i in range(n) for j in range(n) if i != j) / (n * (n - 1))


def _matched_sets(rng, n, d=8, spread=0.5):
    """Two sets of one distribution whose rows are matched, like renders of the same prompt: a shared
    per-row 'prompt' c_i plus independent noise on each side."""
    c = rng.normal(size=(n, d))
    return c + spread * rng.normal(size=(n, d)), c + spread * rng.normal(size=(n, d))


# ------------------------------------------------------------------------------------------------ KID


def test_kid_hand_computed_tiny_case():
    # d = 2, k(x, y) = (x.y / 2 + 1)^3.
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[1.0, 1.0], [0.0, 0.0], [2.0, 0.0]])
    # within a: a1.a2 = 0 -> k = 1; two ordered pairs / (2 * 1) = 1
    # within b: b1.b2 = 0 -> 1, b1.b3 = 2 -> 8, b2.b3 = 0 -> 1; 2 * 10 / (3 * 2) = 10/3
    # cross: a1.b = (1, 0, 2) -> 3.375, 1, 8; a2.b = (1, 0, 0) -> 3.375, 1, 1; sum 17.75
    # KID = 1 + 10/3 - 2 * 17.75 / 6 = -19/12
    res = kid(a, b)
    assert res.kid == pytest.approx(-19 / 12, rel=1e-12)
    assert (res.n_a, res.n_b) == (2, 3)
    assert np.isnan(res.se) and np.isnan(res.ci_low) and np.isnan(res.ci_high) and not res.covers(0.0)
    assert kid(b, a).kid == pytest.approx(-19 / 12, rel=1e-12)
    np.testing.assert_allclose(polynomial_kernel(a, b), [[3.375, 1.0, 8.0], [3.375, 1.0, 1.0]])


def test_kid_and_jackknife_match_a_brute_force_reference(np_rng, monkeypatch):
    a = np_rng.normal(size=(7, 4))
    b = np_rng.normal(size=(9, 4)) + 0.3
    res = kid(a, b)
    assert res.kid == pytest.approx(_brute_kid(a, b), rel=1e-10)
    loo_a = np.array([_brute_kid(np.delete(a, i, 0), b) for i in range(7)])
    loo_b = np.array([_brute_kid(a, np.delete(b, j, 0)) for j in range(9)])
    se = np.sqrt(6 / 7 * np.sum((loo_a - loo_a.mean()) ** 2) + 8 / 9 * np.sum((loo_b - loo_b.mean()) ** 2))
    assert res.se == pytest.approx(se, rel=1e-9)
    assert res.ci_low == pytest.approx(res.kid - 1.959964 * se, rel=1e-6)
    assert res.ci_high == pytest.approx(res.kid + 1.959964 * se, rel=1e-6)
    # The row-blocked kernel sums give the same numbers as one block.
    monkeypatch.setattr(kid_mod, "_BLOCK", 3)
    blocked = kid(a, b)
    assert blocked.kid == pytest.approx(res.kid, rel=1e-12) and blocked.se == pytest.approx(res.se, rel=1e-12)
    assert isinstance(res, KIDResult) and not res.paired
    assert set(res.as_dict()) == {"kid", "ci_low", "ci_high", "n_a", "n_b", "se", "paired"}


def test_kid_from_pool_kernels_matches_kid_on_the_subsets(np_rng):
    pool_a, pool_b = _matched_sets(np_rng, 30, d=5)
    k_aa, k_bb, k_ab = polynomial_kernel(pool_a, pool_a), polynomial_kernel(pool_b, pool_b), polynomial_kernel(pool_a, pool_b)
    i, j = np_rng.integers(0, 30, 12), np_rng.integers(0, 30, 9)  # with repeats, as bootstrap-style draws have
    got = kid_from_kernels(k_aa[np.ix_(i, i)], k_bb[np.ix_(j, j)], k_ab[np.ix_(i, j)])
    ref = kid(pool_a[i], pool_b[j])
    for field in ("kid", "se", "ci_low", "ci_high"):
        assert getattr(got, field) == pytest.approx(getattr(ref, field), rel=1e-10)
    paired = kid_from_kernels(k_aa[np.ix_(i, i)], k_bb[np.ix_(i, i)], k_ab[np.ix_(i, i)], paired=True)
    ref = kid(pool_a[i], pool_b[i], paired=True)
    assert paired.kid == pytest.approx(ref.kid, rel=1e-10) and paired.se == pytest.approx(ref.se, rel=1e-10)
    with pytest.raises(ValueError, match="kernel shapes"):
        kid_from_kernels(k_aa[:3, :3], k_bb[:4, :4], k_ab[:4, :4])


def test_kid_of_one_distribution_is_near_zero_and_its_interval_holds_zero(np_rng):
    x = np_rng.normal(size=(300, 16))
    y = np_rng.normal(size=(300, 16))
    res = kid(x, y)
    assert res.covers(0.0), res
    assert abs(res.kid) < 0.03
    # The biased (V-statistic) MMD^2 of the same samples lies above the interval: the diagonal matters.
    v_stat = (polynomial_kernel(x, x).mean() + polynomial_kernel(y, y).mean()
              - 2 * polynomial_kernel(x, y).mean())
    assert v_stat > res.ci_high


def test_kid_of_a_mean_shift_is_positive_and_its_interval_excludes_zero(np_rng):
    x = np_rng.normal(size=(300, 16))
    y = np_rng.normal(size=(300, 16)) + 0.3
    res = kid(x, y)
    assert res.kid > 0 and res.ci_low > 0, res
    assert not res.covers(0.0)
    bigger = kid(x, y + 0.3)
    assert bigger.kid > res.kid


def test_kid_is_unbiased_at_small_n_where_fd_is_not(np_rng):
    draws, n, d = 300, 10, 8
    kids = np.array([kid(np_rng.normal(size=(n, d)), np_rng.normal(size=(n, d))).kid for _ in range(draws)])
    fds = np.array([frechet_distance(np_rng.normal(size=(n, d)), np_rng.normal(size=(n, d))) for _ in range(draws)])
    kid_sem = kids.std(ddof=1) / np.sqrt(draws)
    assert abs(kids.mean()) < 4 * kid_sem
    # FD's plug-in estimate of a population value of 0 is biased far above its own noise.
    assert fds.mean() > 20 * fds.std(ddof=1) / np.sqrt(draws) and fds.mean() > 1.0
    # Under a mean shift too: the mean of small-N KIDs matches a large-N KID.
    small = np.array([kid(np_rng.normal(size=(8, d)), np_rng.normal(size=(8, d)) + 0.3).kid for _ in range(draws)])
    big = kid(np_rng.normal(size=(3000, d)), np_rng.normal(size=(3000, d)) + 0.3)
    assert abs(small.mean() - big.kid) < 4 * np.hypot(small.std(ddof=1) / np.sqrt(draws), big.se)


def test_paired_kid_hand_computed_tiny_case():
    # d = 2; a = (1,0), (0,1); b = (2,0), (0,0). k(a1,a2) = 1, k(b1,b2) = 1,
    # k(a1,b1) = (2/2 + 1)^3 = 8, k(a1,b2) = k(a2,b1) = k(a2,b2) = 1.
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[2.0, 0.0], [0.0, 0.0]])
    # paired: h_12 = k(a1,a2) + k(b1,b2) - k(a1,b2) - k(a2,b1) = 1 + 1 - 1 - 1 = 0 (k(a1,b1) is left out)
    assert kid(a, b, paired=True).kid == pytest.approx(0.0, abs=1e-12)
    # unpaired: 1 + 1 - 2 * (8 + 1 + 1 + 1) / 4 = -3.5
    assert kid(a, b).kid == pytest.approx(-3.5, rel=1e-12)
    with pytest.raises(ValueError, match="equal size"):
        kid(a, np.zeros((3, 2)), paired=True)


def test_paired_kid_and_its_interval_match_a_brute_force_reference(np_rng, monkeypatch):
    n = 8
    a, b = _matched_sets(np_rng, n, d=3)
    res = kid(a, b, paired=True)
    assert res.paired and res.kid == pytest.approx(_brute_paired_kid(a, b), rel=1e-10)
    loo = np.array([_brute_paired_kid(np.delete(a, i, 0), np.delete(b, i, 0)) for i in range(n)])
    jackknife = (n - 1) / n * np.sum((loo - loo.mean()) ** 2)
    # The swap variance: the variance of the KID over all 2^n ways of swapping a_i and b_i within pairs.
    swapped = []
    for mask in itertools.product((False, True), repeat=n):
        s = np.array(mask)[:, None]
        swapped.append(_brute_paired_kid(np.where(s, b, a), np.where(s, a, b)))
    assert np.mean(swapped) == pytest.approx(0.0, abs=1e-12)
    assert res.se ** 2 == pytest.approx(max(jackknife, np.var(swapped)), rel=1e-9)
    monkeypatch.setattr(kid_mod, "_BLOCK", 3)
    blocked = kid(a, b, paired=True)
    assert blocked.kid == pytest.approx(res.kid, rel=1e-12) and blocked.se == pytest.approx(res.se, rel=1e-12)
    assert kid(b, a, paired=True).se == pytest.approx(res.se, rel=1e-9)


def test_paired_interval_is_floored_at_the_swap_variance():
    # n = 4, h_ij = 1/3 for all i != j (K_aa = 1/3, K_bb = K_ab = 0): every delete-one KID is 1/3, so the
    # jackknife variance is 0; the swap variance is 2 * sum h^2 / (n(n-1))^2 = 2 * (12/9) / 144 = 1/54.
    res = kid_from_kernels(np.full((4, 4), 1 / 3), np.zeros((4, 4)), np.zeros((4, 4)), paired=True)
    assert res.kid == pytest.approx(1 / 3)
    assert res.se == pytest.approx(np.sqrt(1 / 54), rel=1e-12)
    assert res.ci_low == pytest.approx(1 / 3 - 1.959964 * np.sqrt(1 / 54), rel=1e-6)


def test_paired_kid_is_unbiased_for_matched_sets_where_unpaired_kid_is_biased_down(np_rng):
    draws = 200
    pairs = [_matched_sets(np_rng, 12) for _ in range(draws)]
    paired = np.array([kid(a, b, paired=True).kid for a, b in pairs])
    unpaired = np.array([kid(a, b).kid for a, b in pairs])
    sem = lambda v: v.std(ddof=1) / np.sqrt(draws)
    assert abs(paired.mean()) < 4 * sem(paired)
    # The matched cross terms k(a_i, b_i) are larger than the others: unpaired KID sits below 0.
    assert unpaired.mean() < -6 * sem(unpaired)


def test_kid_rejects_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        kid(np.zeros(5), np.zeros((5, 1)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        kid(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="dimensions differ"):
        kid(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        kid(np.full((4, 3), np.nan), np.zeros((4, 3)))


# ---------------------------------------------------------------------------------------- noise floors


def test_noise_floor_draws_disjoint_halves_of_a_pool(np_rng):
    pool = np.arange(40.0)[:, None] * np.ones((1, 3))
    for a, b in kid_mod._pairs(pool, 20, 5, seed=1):
        assert a.shape == b.shape == (20, 3)
        assert not set(a[:, 0]) & set(b[:, 0])
    with pytest.raises(ValueError, match="at least 42 rows"):
        kid_noise_floor(pool, 21)
    with pytest.raises(ValueError, match="one pool, two pools or a sampler"):
        kid_noise_floor([pool, pool, pool], 5)


def test_fd_floor_shrinks_with_n_while_kid_floor_stays_centred_on_zero(np_rng):
    sampler = lambda rng, n: rng.normal(size=(n, 8))
    fd_small, fd_large = fd_noise_floor(sampler, 20, draws=20), fd_noise_floor(sampler, 160, draws=20)
    assert fd_small.statistic == "fd" and fd_small.n == 20 and len(fd_small.values) == 20
    assert fd_small.mean > 2 * fd_large.mean > 0
    floor = kid_noise_floor(sampler, 40, draws=40)
    assert abs(floor.mean) < 4 * floor.std / np.sqrt(40)
    assert len(floor.ci_covers_zero) == 40 and np.mean(floor.ci_covers_zero) >= 0.85
    assert floor.as_dict()["draws"] == 40 and "kid floor at N=40" in str(floor)
    # Two pools of one distribution: n rows of each per draw.
    pools = (np_rng.normal(size=(100, 8)), np_rng.normal(size=(100, 8)))
    assert len(kid_noise_floor(pools, 30, draws=3).values) == 3


def test_noise_floors_share_draws_and_take_paired_samplers():
    paired_sampler = lambda rng, n: _matched_sets(rng, n)
    both = noise_floors(paired_sampler, 30, draws=5, seed=3, paired=True)
    assert both["fd"].values == fd_noise_floor(paired_sampler, 30, draws=5, seed=3).values
    assert both["kid"].values == kid_noise_floor(paired_sampler, 30, draws=5, seed=3, paired=True).values
    assert len(both["kid"].ses) == 5 and all(se > 0 for se in both["kid"].ses)
    assert both["kid"].values != kid_noise_floor(paired_sampler, 30, draws=5, seed=3).values
    with pytest.raises(ValueError, match="2 feature sets"):
        kid_noise_floor(lambda rng, n: (rng.normal(size=(n, 2)),) * 3, 5)


# ------------------------------------------------------------------------------------------- probes


def test_grey_image_has_zero_saturation_and_contrast():
    grey = np.full((2, 4, 4, 3), 128, np.uint8)
    np.testing.assert_array_equal(probes.mean_saturation(grey), [0.0, 0.0])
    np.testing.assert_allclose(probes.rms_contrast(grey), [0.0, 0.0], atol=1e-12)
    black = np.zeros((1, 4, 4, 3), np.float32) - 1.0  # black in model space: max = 0, saturation 0
    assert probes.mean_saturation(black)[0] == 0.0


def test_two_value_image_saturation_and_contrast_by_hand():
    img = np.zeros((1, 4, 4, 3), np.uint8)
    img[0, :2, :2] = (255, 0, 0)  # 4 of 16 pixels pure red (S = 1, luma 0.299); the rest black (S = 0, luma 0)
    assert probes.mean_saturation(img)[0] == pytest.approx(0.25)
    # std of a two-valued variable: |v1 - v0| * sqrt(p (1 - p)) with p = 1/4
    assert probes.rms_contrast(img)[0] == pytest.approx(0.299 * np.sqrt(3) / 4, rel=1e-12)
    orange = np.full((1, 1, 1, 3), (200, 100, 50), np.uint8)  # (max - min) / max = 150 / 200
    assert probes.mean_saturation(orange)[0] == pytest.approx(0.75)
    # Floats in model space are clipped to [-1, 1] first: 3.0 shows as white, -5.0 as black.
    overshoot = np.array([[[[3.0, -5.0, -5.0]]]], np.float32)
    assert probes.mean_saturation(overshoot)[0] == pytest.approx(1.0)
    assert probes.luminance(overshoot)[0, 0, 0] == pytest.approx(0.299)


def test_out_of_range_fraction_on_a_crafted_batch():
    x = np.zeros((2, 2, 2, 3), np.float32)
    x[0, 0, 0, 0] = 1.5
    x[0, 1, 1, 2] = -1.0  # exactly on the boundary: in range
    x[1, 0, 0, 0], x[1, 0, 1, 1], x[1, 1, 0, 2] = -1.0001, 7.0, np.inf
    np.testing.assert_allclose(probes.out_of_range_fraction(x), [1 / 12, 3 / 12])
    with pytest.raises(ValueError, match="already clipped"):
        probes.out_of_range_fraction(np.zeros((1, 2, 2, 3), np.uint8))


def test_compare_probes_reports_generated_minus_real():
    real = np.zeros((2, 2, 2, 3), np.uint8)
    real[0, 0, 0] = (255, 255, 255)  # contrasts: image 0 has one white pixel of 4, image 1 is flat
    gen = np.zeros((2, 2, 2, 3), np.float32)
    gen[:, 0, 0] = (2.0, -1.0, -1.0)  # one over-driven red pixel per image: 1 of 12 values out of range
    report = probes.compare_probes(gen, real)
    assert set(report) == {"out_of_range", "saturation", "contrast"}
    oor = report["out_of_range"]
    assert oor["generated"] == pytest.approx(1 / 12) and oor["real"] == 0.0 and oor["diff"] == pytest.approx(1 / 12)
    assert oor["diff_se"] == pytest.approx(0.0, abs=1e-12)
    # Generated: per image, one pure red pixel (clipped) and 3 mid-grey pixels (0.0 in model space, S = 0).
    sat = report["saturation"]
    assert sat["generated"] == pytest.approx(0.25) and sat["real"] == 0.0 and sat["diff"] == pytest.approx(0.25)
    con = report["contrast"]
    c_white = np.sqrt(3) / 4  # luma 1 on 1 of 4 pixels
    assert con["real"] == pytest.approx(c_white / 2)
    assert con["diff_se"] == pytest.approx(np.sqrt(c_white ** 2 / 2 / 2), rel=1e-9)  # var_real(ddof=1)=c^2/2, n=2
    # uint8 generated images: no out-of-range row.
    assert set(probes.compare_probes(real, real)) == {"saturation", "contrast"}


def test_paired_probe_comparison_removes_the_image_to_image_spread():
    real = np.zeros((3, 4, 4, 3), np.uint8)
    real[0, :2] = 255
    real[1, :1] = (255, 0, 0)  # three different contrasts and saturations
    same_in_model_space = real.astype(np.float32) / 127.5 - 1.0  # the same images as unclipped floats
    unpaired = probes.compare_probes(same_in_model_space, real)
    paired = probes.compare_probes(same_in_model_space, real, paired=True)
    for name in ("saturation", "contrast"):
        assert paired[name]["diff"] == pytest.approx(0.0, abs=1e-6)
        assert paired[name]["diff_se"] == pytest.approx(0.0, abs=1e-6)
        assert unpaired[name]["diff_se"] > 0.05
    with pytest.raises(ValueError, match="equal size"):
        probes.compare_probes(same_in_model_space[:2], real, paired=True)


def test_probes_reject_bad_inputs():
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        probes.mean_saturation(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="dtype"):
        probes.rms_contrast(np.zeros((1, 4, 4, 3), np.int32))
    with pytest.raises(ValueError, match="NaN"):
        probes.out_of_range_fraction(np.full((1, 2, 2, 3), np.nan))
    with pytest.raises(ValueError, match="non-empty"):
        probes.probe_means(np.zeros((0, 2, 2, 3), np.uint8))


# ------------------------------------------------------------------- k-NN precision/recall by hand


def test_knn_precision_recall_hand_computed_for_k_3_4_5():
    # 1-D features. Real: 0, 1, ..., 5. The k-th-neighbour radius of the end point 5 is k, so the real
    # manifold reaches up to 5 + k (no other real ball reaches further: point 4 has radius k - 1 for
    # k = 3..5, i.e. reach 6, 7, 8).
    # Fake: 7.6 + 0.75 j, j = 0..5 -> 7.6, 8.35, 9.1, 9.85, 10.6, 11.35. Inside the real manifold when
    # <= 5 + k: k=3 -> {7.6}; k=4 -> {7.6, 8.35}; k=5 -> {7.6, 8.35, 9.1, 9.85}.
    # The fake end point 7.6 has radius 0.75 k = 2.25, 3, 3.75 and is the lowest-reaching fake ball
    # (8.35 has radius 1.5, 2.25, 3 -> reaches down to 6.85, 6.1, 5.35), so a real x is covered when
    # x >= 7.6 - 0.75 k = 5.35, 4.6, 3.85: k=3 -> none; k=4 -> {5}; k=5 -> {4, 5}.
    real = np.arange(6.0)[:, None]
    fake = (7.6 + 0.75 * np.arange(6.0))[:, None]
    expected = {3: (1 / 6, 0.0), 4: (2 / 6, 1 / 6), 5: (4 / 6, 2 / 6)}
    for k, (precision, recall) in expected.items():
        got = knn_precision_recall(real, fake, k=k)
        assert got["precision"] == pytest.approx(precision) and got["recall"] == pytest.approx(recall), (k, got)
    with pytest.raises(ValueError, match="at least 7 rows"):
        knn_precision_recall(real, fake, k=6)
