"""The trainers of the shipped verifier and judge (ng_jax.tools): their loop and command line end to end."""
import json

import numpy as np
import pytest

from ng_jax.data import world
from ng_jax.tools import train_judge, train_verifier


def _assert_training_lowers_the_loss(tool, factor: float) -> None:
    """60 steps of `tool.train` on 256 renders: finite losses, the last 10 below `factor` x the first 10."""
    cfg = tool.TrainConfig(train_images=256, steps=60, batch_size=32, learning_rate=3e-3, seed=3)
    _, losses = tool.train(cfg)
    assert losses.shape == (60,) and np.all(np.isfinite(losses))
    assert losses[-10:].mean() < factor * losses[:10].mean(), (losses[:10].mean(), losses[-10:].mean())


@pytest.mark.slow
def test_verifier_trainer_learns_and_writes_weights_and_metrics(tmp_path):
    _assert_training_lowers_the_loss(train_verifier, 0.7)

    out = tmp_path / "verifier"
    argv = ["--out", str(out), "--train-images", "128", "--steps", "5", "--batch-size", "8",
            "--eval-renders-per-prompt", "1"]
    train_verifier.main(argv)
    metrics = json.loads((out / "verifier_metrics.json").read_text())
    assert metrics["config"] == {**vars(train_verifier.TrainConfig()), "train_images": 128, "steps": 5,
                                 "batch_size": 8, "eval_renders_per_prompt": 1}
    assert set(metrics["per_category"]) == set(world.CATEGORIES)
    for cat in metrics["per_category"].values():
        assert 0.0 <= cat["judge_acc_correct"] <= 1.0 and cat["renders"] > 0
    # --eval-only re-measures the written weights under the recorded config (not the command line's).
    before = (out / "verifier.msgpack").read_bytes()
    train_verifier.main(["--out", str(out), "--eval-only", "--steps", "999"])
    again = json.loads((out / "verifier_metrics.json").read_text())
    assert (out / "verifier.msgpack").read_bytes() == before
    assert again["config"]["steps"] == 5 and again["train_seconds"] == metrics["train_seconds"]
    assert again["mean_over_categories"] == metrics["mean_over_categories"]


@pytest.mark.slow
def test_judge_trainer_learns_and_writes_weights_and_metrics(tmp_path):
    _assert_training_lowers_the_loss(train_judge, 0.9)

    train_judge.main(["--out", str(tmp_path), "--train-images", "64", "--steps", "3", "--batch-size", "8",
                      "--eval-renders", "32"])
    metrics = json.loads((tmp_path / "judge_features_metrics.json").read_text())
    assert metrics["config"]["steps"] == 3 and metrics["eval_images"] == 32
    assert (tmp_path / "judge_features.msgpack").stat().st_size > 0
    quality = metrics["quality_vs_reference_renders"]
    assert set(quality) == {"fresh_renders", "blurred_renders", "noisy_renders_std20", "saturated_renders_x1.3",
                            "uniform_noise_images"}
    assert all(q["fd"] >= 0.0 for q in quality.values())
