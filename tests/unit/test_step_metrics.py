"""Epoch means of the step metrics, with the per-sigma-bucket ratios weighted by their sample counts."""

import numpy as np

from ng_jax.logs import StepMetrics


def test_bucket_ratios_are_count_weighted_and_scalars_plain_means():
    m = StepMetrics([0.25, 0.75])
    m.add({"loss": 1.0, "finite": True, "norm_ratio_by_bucket": np.array([1.0, 2.0]), "bucket_count": np.array([3, 1])})
    m.add({"loss": 3.0, "finite": True, "norm_ratio_by_bucket": np.array([2.0, 0.0]), "bucket_count": np.array([1, 0])})
    r = m.record()
    assert m.steps == 2 and r["loss"] == 2.0
    assert r["norm_ratio_sigma_0.2"] == (3 * 1.0 + 1 * 2.0) / 4   # centre 0.25 printed as 0.2
    assert r["norm_ratio_sigma_0.8"] == 2.0                      # only the first step had samples there
    assert "finite" not in r and "bucket_count" not in r
