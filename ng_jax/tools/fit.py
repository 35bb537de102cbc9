"""What the verifier and judge trainers share: the minibatch training loop over in-memory renders, the
3x3 binomial blur (JAX for augmentation, NumPy for evaluation), and the dataclass command line."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

_BINOMIAL = (0.25, 0.5, 0.25)


def blur3x3(images: jax.Array) -> jax.Array:
    """Depthwise 3x3 binomial blur of float NHWC images (zero padding at the border)."""
    k = jnp.asarray(_BINOMIAL)
    kernel = jnp.tile(jnp.outer(k, k)[:, :, None, None], (1, 1, 1, images.shape[-1]))  # HWIO, depthwise
    return jax.lax.conv_general_dilated(images, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=images.shape[-1])


def blur3x3_uint8(images: np.ndarray) -> np.ndarray:
    """The same blur on uint8 NHWC images in NumPy, edge-padded, rounded back to uint8."""
    x = np.pad(images.astype(np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = images.shape[1:3]
    x = sum(k * x[:, i:i + h] for i, k in enumerate(_BINOMIAL))
    x = sum(k * x[:, :, j:j + w] for j, k in enumerate(_BINOMIAL))
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def to_float(images_u8: jax.Array) -> jax.Array:
    return images_u8.astype(jnp.float32) / 127.5 - 1.0


def fit(batch_loss: Callable, params, arrays: tuple[np.ndarray, ...], *, steps: int, batch_size: int,
        learning_rate: float, warmup_steps: int, seed: int, rng: np.random.Generator, desc: str):
    """AdamW (weight decay 1e-4, linear warm-up to `learning_rate` over min(warmup_steps, steps // 10),
    cosine decay to 0) on minibatches drawn with replacement from `arrays` by `rng`.

    `batch_loss(params, key, *batch)` gets a fresh PRNG key per step (for augmentation). Returns the
    trained parameters and the loss of every step (a NumPy array)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(warmup_steps, steps // 10), steps)
    optimizer = optax.adamw(schedule, weight_decay=1e-4)

    @jax.jit
    def step_fn(params, opt_state, key, *batch):
        loss, grads = jax.value_and_grad(batch_loss)(params, key, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    key = jax.random.key(seed + 1)
    losses = []
    bar = tqdm(range(steps), desc=desc, mininterval=2.0)
    for step in bar:
        idx = rng.integers(0, len(arrays[0]), batch_size)
        params, opt_state, loss = step_fn(params, opt_state, jax.random.fold_in(key, step), *(a[idx] for a in arrays))
        losses.append(loss)
        if step % 100 == 0:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    return params, np.asarray(jax.device_get(losses), np.float32)


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    """One --kebab-case option per field of the dataclass `cls`, typed and defaulted by the field."""
    for field in dataclasses.fields(cls):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)


def dataclass_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
