"""Statistics of the confirmatory grid: paired differences over seeds, their confidence intervals, Holm's
correction, and the three-way verdict of each of the paper's claims.

    d = paired(base, normguard)                   # seed -> value dicts; NormGuard - base over common seeds
    ci = interval(d)                              # mean, t interval and bootstrap interval (95%)
    holm([p1, p2, p3])                            # Holm-adjusted p-values, same order
    verdict = Claim("quality restored", "kid", "below", threshold=0.0, ...).judge(d, p_adjusted)

Seeds are the unit of replication: a run of one seed gives one number per endpoint, and the base and
NormGuard runs of a seed share initialisation, prompts and rollout noise, so their difference removes
what the seed alone explains. With n seeds, the t interval has n - 1 degrees of freedom; the
percentile bootstrap resamples seeds (at n = 5 it is too narrow, which is why both are printed and
the verdicts use the t interval and its one-sided test).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as _st

LEVEL = 0.95
VERDICTS = ("reproduces", "contradicts", "inconclusive")


def paired(base: Mapping, treated: Mapping) -> dict:
    """seed -> treated - base, over the seeds both have (values that are None are left out)."""
    return {s: float(treated[s]) - float(base[s]) for s in sorted(base.keys() & treated.keys())
            if base[s] is not None and treated[s] is not None}


@dataclasses.dataclass(frozen=True)
class Interval:
    n: int
    mean: float
    sd: float
    t_low: float
    t_high: float
    boot_low: float
    boot_high: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def interval(values, level: float = LEVEL, n_boot: int = 10_000, seed: int = 0) -> Interval:
    """Mean of `values` (a sequence or a seed -> value dict) with its Student-t interval and its
    percentile-bootstrap interval over the values (NaN bounds when fewer than 2 values)."""
    x = np.asarray(list(values.values()) if isinstance(values, Mapping) else list(values), np.float64)
    n = len(x)
    if n == 0:
        return Interval(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Interval(n, mean, math.nan, math.nan, math.nan, math.nan, math.nan)
    sd = float(x.std(ddof=1))
    half = float(_st.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    boots = np.random.default_rng(seed).choice(x, size=(n_boot, n), replace=True).mean(axis=1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return Interval(n, mean, sd, mean - half, mean + half, float(lo), float(hi))


def one_sided_p(values, threshold: float, direction: str) -> float:
    """p-value of the one-sided t test that the mean of `values` lies `direction` ("above" / "below")
    `threshold` (H0: it does not). 1.0 with fewer than 2 values; a zero-variance sample gives 0 or 1."""
    x = np.asarray(list(values.values()) if isinstance(values, Mapping) else list(values), np.float64)
    if direction not in ("above", "below"):
        raise ValueError(f"direction={direction!r}: expected 'above' or 'below'")
    if len(x) < 2:
        return 1.0
    diff = x.mean() - threshold
    sd = x.std(ddof=1)
    if sd == 0:
        return 0.0 if (diff > 0 if direction == "above" else diff < 0) else 1.0
    t = diff / (sd / math.sqrt(len(x)))
    return float(_st.t.sf(t, len(x) - 1) if direction == "above" else _st.t.cdf(t, len(x) - 1))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order (reject at alpha where adjusted p < alpha)."""
    p = np.asarray(pvalues, np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


@dataclasses.dataclass(frozen=True)
class Claim:
    """A claim of the paper as a one-sided statement about the mean of an endpoint's values.

    It reproduces when the Holm-adjusted one-sided p-value that the mean lies `direction` `threshold`
    is below 1 - LEVEL; it is contradicted when the t interval lies entirely on the other side of
    `contradicted_at` (the smallest effect that would still count as the claim; default `threshold`);
    otherwise it is inconclusive."""

    name: str
    endpoint: str
    direction: str               # "above" | "below"
    threshold: float
    margin_text: str             # how the report states the margin
    contradicted_at: float | None = None

    def judge(self, values, p_adjusted: float) -> str:
        ci = interval(values)
        if ci.n < 2:
            return "inconclusive"
        if p_adjusted < 1 - LEVEL:
            return "reproduces"
        edge = self.threshold if self.contradicted_at is None else self.contradicted_at
        outside = ci.t_high < edge if self.direction == "above" else ci.t_low > edge
        return "contradicts" if outside else "inconclusive"


def judge_claims(claims: Sequence[Claim], values: Mapping[str, Mapping]) -> list[dict]:
    """One row per claim whose endpoint is in `values` (endpoint -> seed -> value): the interval, the raw
    and Holm-adjusted one-sided p-values (adjusted across these claims) and the verdict."""
    present = [c for c in claims if values.get(c.endpoint)]
    raw = [one_sided_p(values[c.endpoint], c.threshold, c.direction) for c in present]
    adjusted = holm(raw) if raw else []
    rows = []
    for c, p, q in zip(present, raw, adjusted):
        rows.append({"claim": c.name, "endpoint": c.endpoint, "direction": c.direction, "threshold": c.threshold,
                     "margin": c.margin_text, "p": p, "p_holm": q, "verdict": c.judge(values[c.endpoint], q),
                     **interval(values[c.endpoint]).as_dict()})
    return rows


def value_at_reward(trajectory: Sequence[tuple[float, float]], reward: float) -> float | None:
    """Linear interpolation of a quantity along a run's evaluation trajectory [(reward, value), ...] (in
    epoch order) at `reward`: the first segment whose rewards bracket it; None ("not matchable") when no
    segment does."""
    pts = [(float(r), float(v)) for r, v in trajectory if r is not None and v is not None]
    for (r0, v0), (r1, v1) in zip(pts, pts[1:]):
        if min(r0, r1) <= reward <= max(r0, r1):
            return v0 if r1 == r0 else v0 + (v1 - v0) * (reward - r0) / (r1 - r0)
    if pts and len(pts) == 1 and pts[0][0] == reward:
        return pts[0][1]
    return None
