"""The grid's statistics: intervals with the stated coverage, Holm's correction, the three-way verdicts and
the matched-reward interpolation."""

import math

import numpy as np
import pytest
from scipy import stats as st

from ng_jax.eval.stats import Claim, holm, interval, judge_claims, one_sided_p, paired, value_at_reward


def test_paired_uses_common_seeds_and_skips_missing():
    assert paired({0: 1.0, 1: 2.0, 2: 3.0, 3: None}, {1: 2.5, 2: 2.0, 3: 1.0, 4: 9.0}) == {1: 0.5, 2: -1.0}


def test_t_interval_by_hand():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]  # mean 3, sd sqrt(2.5); t_{0.975, 4} = 2.7764451
    ci = interval(x)
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)
    assert (ci.n, ci.mean) == (5, 3.0)
    assert ci.t_low == pytest.approx(3 - half, abs=1e-6) and ci.t_high == pytest.approx(3 + half, abs=1e-6)
    assert 1.0 <= ci.boot_low < 3.0 < ci.boot_high <= 5.0
    assert math.isnan(interval([2.0]).t_low) and interval({}).n == 0


def test_t_interval_covers_the_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    hits = [(lambda c: c.t_low <= 0.7 <= c.t_high)(interval(rng.normal(0.7, 2.0, 5), n_boot=10))
            for _ in range(2000)]
    assert 0.935 <= np.mean(hits) <= 0.965


def test_one_sided_p_is_scipys_t_test():
    x = [0.3, -0.1, 0.5, 0.2, 0.4]
    for direction, alt in (("above", "greater"), ("below", "less")):
        want = st.ttest_1samp(x, 0.1, alternative=alt).pvalue
        assert one_sided_p(x, 0.1, direction) == pytest.approx(want, rel=1e-9)
    assert one_sided_p([1.0, 1.0, 1.0], 0.0, "above") == 0.0 and one_sided_p([1.0], 0.0, "above") == 1.0


def test_holm_textbook_example():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5]) == [0.5] and holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])


def test_verdicts_three_ways_and_holm_can_demote():
    claim = Claim("inflation", "ratio", "above", 1.03, "base ratio above 1.03")
    assert claim.judge([1.08, 1.09, 1.07, 1.10, 1.08], p_adjusted=0.001) == "reproduces"
    assert claim.judge([1.00, 1.01, 0.99, 1.00, 1.005], p_adjusted=0.99) == "contradicts"
    assert claim.judge([0.95, 1.12, 1.01, 1.10, 0.99], p_adjusted=0.3) == "inconclusive"
    # one clear endpoint and two weak ones: Holm multiplies the smallest raw p by 3
    claims = [Claim(n, n, "below", 0.0, "") for n in ("a", "b", "c")]
    values = {"a": {s: v for s, v in enumerate([-1.0, -1.1, -0.9, -1.2, -0.2])},
              "b": {s: v for s, v in enumerate([0.1, -0.2, 0.3, 0.0, 0.1])},
              "c": {s: v for s, v in enumerate([0.2, 0.3, 0.1, 0.4, 0.2])}}
    rows = {r["claim"]: r for r in judge_claims(claims, values)}
    assert rows["a"]["p_holm"] == pytest.approx(3 * rows["a"]["p"]) and rows["a"]["verdict"] == "reproduces"
    assert rows["c"]["verdict"] == "contradicts" and rows["b"]["verdict"] == "inconclusive"
    # a raw p just below 0.05 is not enough after the correction
    near = {"a": {s: v for s, v in enumerate([-0.3, 0.1, -0.4, -0.2, 0.05])}, "b": values["b"], "c": values["c"]}
    r = {x["claim"]: x for x in judge_claims(claims, near)}["a"]
    assert r["p"] < 0.1 and r["p_holm"] > 0.05 and r["verdict"] != "reproduces"


def test_value_at_reward_interpolates_or_says_not_matchable():
    traj = [(0.5, 10.0), (0.7, 20.0), (0.9, 60.0)]
    assert value_at_reward(traj, 0.6) == pytest.approx(15.0)
    assert value_at_reward(traj, 0.8) == pytest.approx(40.0)
    assert value_at_reward(traj, 0.95) is None and value_at_reward(traj, 0.4) is None
    assert value_at_reward([(0.5, 1.0), (0.8, 4.0), (0.6, 2.0)], 0.7) == pytest.approx(3.0)  # first bracket
