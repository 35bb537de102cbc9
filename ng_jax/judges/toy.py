"""Quality measures that are not rewards: Frechet distance and k-NN precision/recall on the
features of a judge network that no reward uses (``ng_jax.judges.features``).

- ``frechet_distance`` follows the FID formula of Heusel et al. 2017 as computed by the public
  pytorch-fid implementation (mean/covariance, ``scipy.linalg.sqrtm``, real part, an ``eps * I``
  offset when the product of covariances is singular).
- ``knn_precision_recall`` is the improved precision/recall of Kynkaanniemi et al. 2019: each set
  is a union of balls around its samples with radius the distance to the k-th nearest neighbour
  within the set; precision is the fraction of fake samples inside the real manifold, recall the
  fraction of real samples inside the fake manifold.

- ``kid`` (``ng_jax.judges.kid``) is the primary distribution measure: unbiased at any N, with a 95%
  interval; generated and real image i show the same prompt, so the paired form is used.
- The over-saturation probes (``ng_jax.judges.probes``): mean HSV saturation and RMS contrast of the
  generated images minus those of the real renders (paired by prompt).

Reference ("real") images are renders of the same prompts by the shapes world.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import scipy.linalg

from ng_jax.data import world
from ng_jax.judges import probes
from ng_jax.judges.features import JudgeFeatures
from ng_jax.judges.kid import kid


def _check_features(feats: np.ndarray, name: str, min_rows: int) -> np.ndarray:
    feats = np.asarray(feats)
    if feats.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D] of features, got shape {feats.shape}")
    if feats.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {feats.shape[0]}")
    if not np.all(np.isfinite(feats)):
        raise ValueError(f"{name} contains NaN or infinite values; expected finite features")
    return feats.astype(np.float64)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] and [M, D].

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``; the matrix square root's
    imaginary part (numerical noise) is dropped, and ``eps * I`` is added to both covariances
    when their product is singular (fewer samples than dimensions, dead features) or the square
    root is not finite. The result is clipped at 0 (tiny negative values are
    round-off).
    """
    a = _check_features(feats_a, "feats_a", 2)
    b = _check_features(feats_b, "feats_b", 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: feats_a has D={a.shape[1]}, feats_b has D={b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    singular = any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught)
    if singular or not np.all(np.isfinite(covmean)):
        offset = np.eye(cov_a.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    fd = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean)
    return float(max(fd, 0.0))


def _pairwise_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return np.sqrt(np.maximum(sq, 0.0))


def _knn_radii(feats: np.ndarray, k: int) -> np.ndarray:
    """Distance from each sample to its k-th nearest neighbour in the same set (itself excluded)."""
    d = _pairwise_distances(feats, feats)
    # Column 0 of the sorted row is the sample itself (distance 0).
    return np.partition(d, k, axis=1)[:, k]


def knn_precision_recall(real_feats: np.ndarray, fake_feats: np.ndarray, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (k-NN manifolds) of fake features against real features."""
    if not (isinstance(k, (int, np.integer)) and k >= 1):
        raise ValueError(f"k must be a positive integer, got {k!r}")
    real = _check_features(real_feats, "real_feats", k + 1)
    fake = _check_features(fake_feats, "fake_feats", k + 1)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: real D={real.shape[1]}, fake D={fake.shape[1]}")
    real_radii = _knn_radii(real, k)
    fake_radii = _knn_radii(fake, k)
    d_fake_real = _pairwise_distances(fake, real)  # [M, N]
    precision = np.mean(np.any(d_fake_real <= real_radii[None, :], axis=1))
    recall = np.mean(np.any(d_fake_real.T <= fake_radii[None, :], axis=1))
    return {"precision": float(precision), "recall": float(recall)}


def reference_renders(prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
    """Renders of the shapes world for (prompt, seed) pairs: uint8 [N, 32, 32, 3]."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds; expected one seed per prompt")
    if len(prompts) == 0:
        raise ValueError("reference_renders needs at least one prompt")
    return np.stack([world.render_prompt(p, int(s))[0] for p, s in zip(prompts, seeds)])


class QualityJudge:
    """Frechet distance and k-NN precision/recall between generated and reference images,
    measured in the feature space of the judge network (not used by any reward)."""
    def __init__(self, features=None, k: int = 3):
        if features is None:

            features = JudgeFeatures()
        self.features = features
        self.k = k

    def evaluate(self, fake_images: np.ndarray, real_images: np.ndarray) -> dict[str, float]:
        """FD, precision, recall, KID with its 95% interval, and the saturation / contrast differences of
        uint8 [N, H, W, 3] fakes against uint8 reals; image i of both shows the same prompt."""
        fake = self.features.features(fake_images)
        real = self.features.features(real_images)
        pr = knn_precision_recall(real, fake, k=self.k)
        k = kid(fake, real, paired=fake.shape[0] == real.shape[0])
        diffs = probes.compare_probes(fake_images, real_images, paired=fake_images.shape[0] == real_images.shape[0])
        return {"fd": frechet_distance(fake, real), "precision": pr["precision"], "recall": pr["recall"],
                "kid": k.kid, "kid_ci_low": k.ci_low, "kid_ci_high": k.ci_high,
                "saturation_diff": diffs["saturation"]["diff"], "contrast_diff": diffs["contrast"]["diff"]}
