"""Every shipped config loads and passes the value checks; the experiment configs expand into runs that do
(so a typo in an arm's settings fails here, not hours into a background grid)."""
import os

import pytest

from ng_jax.config.checks import check_config
from ng_jax.config.methods import CONFIG_DIR, load_config_file
from ng_jax.eval import grid

REAL = ("sd35m_", "flux1dev_")   # need a weights directory to pass the checks (tests/e2e cover them)
CONFIGS = sorted(n for n in os.listdir(CONFIG_DIR) if n.endswith(".py") and not n.startswith("__"))
EXPERIMENTS = sorted(n for n in os.listdir(os.path.join(CONFIG_DIR, "experiments")) if n.endswith(".py"))


@pytest.mark.parametrize("name", [n for n in CONFIGS if not n.startswith(REAL)])
def test_config_loads_and_checks(name):
    c = load_config_file(name)
    check_config(c)
    assert c.job in ("rl", "pretrain", "evaluate", "analyze", "grid")


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n != "pilot.py"])
def test_experiment_runs_are_valid(name):
    c = load_config_file(f"experiments/{name}")
    runs = grid.run_specs(c)   # runs check_config on every run's config
    assert runs and len(set(runs)) == len(runs)
    for spec in runs.values():
        ng = spec.config.normguard
        assert (ng.lam > 0) == bool(c.grid.arms[spec.arm].normguard), spec


def test_frontier_carries_awms_calibrated_lambda_to_each_method_and_sets_the_kl_weights():
    from ng_jax.configs.experiments import frontier

    runs = grid.run_specs(load_config_file("experiments/frontier.py"))
    awm_lam = load_config_file("awm_normguard.py").normguard.lam
    for method in ("nft", "awm", "dpo"):
        shipped = load_config_file(f"{method}_normguard.py").normguard
        # the shipped lambda is AWM's at the exchange rate, and the frontier's middle arm is the shipped setting
        assert shipped.lam == frontier.method_lambda(method, awm_lam)
        assert runs[f"{method}_ng_x1_preference_s0"].config.normguard.lam == shipped.lam
        for arm, x in (("ng_x0p33", 1 / 3), ("ng_x3", 3.0)):
            ng = runs[f"{method}_{arm}_preference_s0"].config.normguard
            assert ng.lam == pytest.approx(frontier.LAMBDA_RATE[method] * awm_lam * x, rel=0.05)
            assert ng.margin == shipped.margin
    assert runs["awm_kl10_preference_s1"].config.loss.beta == 10.0
    assert runs["awm_kl100_preference_s1"].config.loss.beta == 100.0
    assert runs["nft_kl0p1_preference_s0"].config.loss.kl_beta == pytest.approx(0.68)
    assert runs["awm_kl0p03_preference_s1"].config.loss.beta == 0.03
    assert runs["nft_kl0p03_preference_s1"].config.loss.kl_beta == pytest.approx(0.2)
    assert not any(n.startswith("dpo_kl") for n in runs)
    assert len(runs) == 2 * (4 + 9 + 9)


@pytest.mark.parametrize("variant", ["soft_free", "headroom_free,centred,lr=3e-5", "clip_guided,lam"])
def test_pilot_variants(variant):
    check_config(load_config_file("experiments/pilot.py", variant))
