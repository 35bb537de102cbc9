"""The grid's reward columns: registered rewards and weighted composites."""

import ml_collections as mlc
import pytest

from ng_jax.eval.grid import reward_weights
from ng_jax.rewards import registry


def _grid(**kw):
    return mlc.ConfigDict({"composites": {"mix": {"verifier": 1.0, "colourfulness": 0.03}}, **kw})


def test_a_composite_column_gives_its_weights_and_a_name_gives_weight_one():
    assert reward_weights(_grid(), "mix") == {"verifier": 1.0, "colourfulness": 0.03}
    assert reward_weights(_grid(), "preference") == {"preference": 1.0}


def test_a_registered_reward_is_accepted_only_while_registered():
    with pytest.raises(ValueError, match="unknown reward 'mine'"):
        reward_weights(_grid(), "mine")
    with registry.registered("mine", lambda cfg: None):
        assert reward_weights(_grid(), "mine") == {"mine": 1.0}
    assert "mine" not in registry.EXTRA_REWARDS  # restored


def test_an_unknown_reward_inside_a_composite_is_named():
    g = mlc.ConfigDict({"composites": {"bad": {"verifier": 1.0, "sparkle": 2.0}}})
    with pytest.raises(ValueError, match=r"unknown reward 'sparkle' \(in 'bad'\)"):
        reward_weights(g, "bad")
