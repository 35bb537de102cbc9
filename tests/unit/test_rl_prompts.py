"""The RL prompt stream's category balancing (ng_jax.rl.prompts)."""
from ng_jax.data.prompts import category_of
from ng_jax.rl.prompts import balance_categories


def test_balance_categories_gives_every_category_the_same_share():
    prompts = ["a red circle", "a blue square"] + [f"a {c} circle left of a {d} square" for c, d in
                                                   [("red", "blue"), ("green", "white"), ("cyan", "red")]]
    out = balance_categories(prompts)
    cats = [category_of(p) for p in out]
    assert sorted(set(out)) == sorted(prompts)
    assert cats.count("colors") == cats.count("position") == 3
