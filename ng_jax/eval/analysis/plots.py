"""PNG figures of the analyses (matplotlib `Figure` objects written straight to PNG: no display needed, and
no pyplot, so importing this module leaves the process's backend alone, e.g. a notebook's inline plots)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from ng_jax import logs


def _save(fig, path: str) -> str:
    fig.tight_layout()
    return logs.write_png(path, fig, dpi=110)  # a local path or a bucket (gs://...)


def norm_curves(path: str, curves: dict[str, dict]) -> str:
    """curves: label -> {"sigma": [...], "mean": [...], "spread": [...]} (norm ratio per step)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for label, c in curves.items():
        s, m, sd = (np.asarray(c[k]) for k in ("sigma", "mean", "spread"))
        ax.plot(s, m, marker="o", ms=3, label=label)
        ax.fill_between(s, m - sd, m + sd, alpha=0.15)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("sigma (1 = noise)")
    ax.set_ylabel("||v_theta|| / ||v_ref||")
    ax.invert_xaxis()
    ax.set_title("velocity-norm ratio along sampling trajectories")
    ax.legend(fontsize=8)
    return _save(fig, path)


def grouped_bars(path: str, table: dict[str, dict[str, float]], metrics: tuple[str, ...], title: str) -> str:
    """table: label -> variant -> {metric: value}; one panel per metric, bars per variant."""
    labels = list(table)
    variants = list(next(iter(table.values())))
    fig = Figure(figsize=(4.2 * len(metrics), 3.6))
    axes = fig.subplots(1, len(metrics))
    axes = np.atleast_1d(axes)
    width = 0.8 / max(len(variants), 1)
    for ax, metric in zip(axes, metrics):
        for j, v in enumerate(variants):
            vals = [table[l][v].get(metric) for l in labels]
            vals = [np.nan if x is None else x for x in vals]
            ax.bar(np.arange(len(labels)) + j * width, vals, width, label=v)
        ax.set_xticks(np.arange(len(labels)) + width * (len(variants) - 1) / 2)
        ax.set_xticklabels(labels, rotation=20, fontsize=8)
        ax.set_title(metric)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def lines(path: str, series: dict[str, dict[str, list]], x_key: str, metrics: tuple[str, ...], title: str,
          xlabel: str, logx: bool = False) -> str:
    """series: label -> {x_key: [...], metric: [...]}; one panel per metric."""
    fig = Figure(figsize=(4.2 * len(metrics), 3.6))
    axes = fig.subplots(1, len(metrics))
    axes = np.atleast_1d(axes)
    for ax, metric in zip(axes, metrics):
        for label, s in series.items():
            ys = [np.nan if y is None else y for y in s[metric]]
            ax.plot(s[x_key], ys, marker="o", ms=3, label=label)
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(metric)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def adjoint(path: str, results: dict[str, dict]) -> str:
    """results: label -> adjoint.summarize output. Mean +- spread and coherence per step."""
    fig = Figure(figsize=(9, 3.6))
    a1, a2 = fig.subplots(1, 2)
    for label, r in results.items():
        s, m, sd = (np.asarray(r[k]) for k in ("sigma", "mean", "spread"))
        a1.plot(s, m, marker="o", ms=3, label=label)
        a1.fill_between(s, m - sd, m + sd, alpha=0.15)
        a2.plot(s, r["coherence"], marker="o", ms=3, label=label)
    for ax in (a1, a2):
        ax.invert_xaxis()
        ax.set_xlabel("sigma at the step")
    a1.axhline(0.0, color="k", lw=0.8)
    a1.set_title("dR / d alpha_k: batch mean +- per-sample spread")
    a2.set_title("coherence |mean| / spread")
    a2.set_yscale("log")
    a1.legend(fontsize=8)
    return _save(fig, path)
