"""Train-state pytrees, the optimizer, and sharded initialisation.

The state's abstract shape comes from `jax.eval_shape`, its shardings from the config's rule table
(`ng_jax.sharding`: logical axis names -> mesh axes),
and `jax.jit(init, out_shardings=...)` creates it already sharded (no full copy on one device).
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from ng_jax import sharding


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes. `params` are trained; `ema` is a no-gradient copy
    (the pretraining EMA, NFT's "old" policy, AWM's EMA policy)."""
    step: jax.Array
    params: Any
    ema: Any
    opt_state: Any
    rng: jax.Array


def make_optimizer(optim_cfg) -> optax.GradientTransformation:
    """AdamW with linear warmup then constant (or cosine) learning rate, global-norm clipping."""
    warmup = int(optim_cfg.get("warmup_steps", 0))
    lr = float(optim_cfg.lr)
    if optim_cfg.get("schedule", "constant") == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), int(optim_cfg.decay_steps),
                                                      end_value=lr * float(optim_cfg.get("end_lr_frac", 0.1)))
    elif warmup > 0:
        schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)],
                                        [warmup])
    else:
        schedule = optax.constant_schedule(lr)
    chain = []
    if optim_cfg.get("grad_clip", 0.0):
        chain.append(optax.clip_by_global_norm(float(optim_cfg.grad_clip)))
    chain.append(optax.adamw(schedule, b1=float(optim_cfg.get("b1", 0.9)), b2=float(optim_cfg.get("b2", 0.999)),
                             eps=float(optim_cfg.get("eps", 1e-8)),
                             weight_decay=float(optim_cfg.get("weight_decay", 0.0))))
    return optax.chain(*chain)


def ema_update(ema, params, decay):
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), ema, params)


def create_sharded(init_fn: Callable[[], Any], mesh, rules, *, donate_check: bool = False):
    """Run `init_fn` (no arguments, returns a pytree) under jit with every leaf born sharded.

    `rules`: a `sharding.Layout` (or a legacy regex rule list). Returns `(tree, shardings)`.
    """
    abstract = jax.eval_shape(init_fn)
    shardings = sharding.as_layout(rules).shardings(abstract, mesh)
    tree = jax.jit(init_fn, out_shardings=shardings)()
    return tree, shardings


def state_shardings(state_abstract: TrainState, mesh, rules) -> TrainState:
    """Shardings for a TrainState: params, ema and optimizer moments follow the rule table
    (optimizer moments share their parameter's path suffix), scalars and RNG are replicated."""
    return sharding.as_layout(rules).shardings(state_abstract, mesh)


def count_params(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def tree_all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
