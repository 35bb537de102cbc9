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

from typing import Sequence

import numpy as np

from ng_jax.data import world
from ng_jax.judges import probes
from ng_jax.judges.features import JudgeFeatures
from ng_jax.judges.frechet import _check_features, frechet_distance  # noqa: F401 (re-exported)
from ng_jax.judges.kid import kid


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
