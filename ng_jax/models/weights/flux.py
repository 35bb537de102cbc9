"""diffusers `FluxTransformer2DModel` checkpoints -> `ng_jax.models.nets.flux` parameters (strict).

    cfg = transformer.model_config_from_diffusers(WEIGHTS_DIR)   # config.json keys (+ sample_size, dtype, ...)
    params = load_flux_transformer(WEIGHTS_DIR, cfg)           # reads WEIGHTS_DIR/transformer

The key map is mechanical: the Flax path `transformer_blocks_3/attn/to_out_0/kernel` is the tensor
`transformer_blocks.3.attn.to_out.0.weight`, transposed; `net_0` / `net_2` are `net.0` / `net.2`;
RMS qk-norm `weight`s and biases are copied. With `scan_blocks` each stack (`transformer_blocks`,
`single_transformer_blocks`, leading layer axis) is a `weights.stacked` run over all its layers:
the checkpoint is first checked strictly layer by layer (so an error names the real tensor, e.g.
`transformer_blocks.1.attn.to_q.weight`), then each stacked parameter is read as the stack of its
per-layer tensors (host memory: one stack of a tensor at a time).
"""

from __future__ import annotations

import re

import jax

from ng_jax.models.velocity import make_velocity_model
from ng_jax.models.weights import stacked
from ng_jax.models.weights.safetensors import SafetensorsDir, Source, WeightsError, linear
from ng_jax.models.weights.transformer import check_config, transformer_dir

_STACKS = ("transformer_blocks", "single_transformer_blocks")
_RENAME = {"to_out_0": "to_out.0", "net_0": "net.0", "net_2": "net.2"}


def runs(tree) -> list[stacked.Run]:
    """The scanned stacks of a FLUX parameter tree (each over all its layers)."""
    return [stacked.Run(name, name, 0, jax.tree_util.tree_leaves(tree[name])[0].shape[0] - 1)
            for name in _STACKS if name in tree]


def _torch_prefix(path: tuple[str, ...]) -> str:
    parts = []
    for seg in path:
        m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)_(\d+)", seg)
        parts.append(f"{m[1]}.{m[2]}" if m else _RENAME.get(seg, seg))
    return ".".join(parts)


def _leaf_source(path: tuple[str, ...]) -> Source:
    prefix, leaf = _torch_prefix(path[:-1]), path[-1]
    if leaf in ("kernel", "bias"):
        return linear(prefix)[leaf]
    if leaf == "weight":  # RMSNorm scale (norm_q / norm_k / norm_added_q / norm_added_k)
        return Source(f"{prefix}.weight")
    raise WeightsError(f"no FLUX key rule for the parameter {'/'.join(path)}")


def _per_layer_keymap(params_abstract) -> dict[tuple[str, ...], Source]:
    flat = jax.tree_util.tree_flatten_with_path(params_abstract)[0]
    return {p: _leaf_source(p) for p in (tuple(str(getattr(k, "key", k)) for k in path) for path, _ in flat)}


def flux_keymap(params_abstract) -> dict[tuple[str, ...], Source]:
    """{flax path: Source} for every parameter of `params_abstract` (unrolled or scanned layout)."""
    return stacked.stacked_keymap(_per_layer_keymap, params_abstract, runs(params_abstract))


def load_flux_transformer(weights_dir: str, cfg, dtype=None, shardings=None):
    """Strictly load WEIGHTS_DIR/transformer (or a bare transformer directory) into the parameter
    tree of `make_velocity_model(cfg)`; raises WeightsError naming every unmapped, unexpected or
    mis-shaped tensor (and any disagreement between cfg and config.json) before reading any tensor.
    dtype / shardings as `safetensors.load_params` (None: float32 on the default device)."""
    tdir = transformer_dir(weights_dir)
    reader = SafetensorsDir(tdir)
    check_config(cfg, tdir)
    abstract = jax.eval_shape(make_velocity_model(cfg).init, jax.random.key(0))
    return stacked.load(_per_layer_keymap, abstract, runs(abstract), reader, dtype=dtype, shardings=shardings)
