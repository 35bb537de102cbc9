"""FLUX.1 port: numerical parity with diffusers' FluxTransformer2DModel on tiny random configs, strict
weight loading, scanned == unrolled blocks, 2x2 packing, LoRA targets.

Ground truth is a tiny `FluxTransformer2DModel` built here (2 double + 2 single blocks, 2 heads of
16 = RoPE axes (4, 6, 6), 4 latent channels packed to 16) with every parameter perturbed (RMSNorm
scales included), saved with `save_pretrained`, then loaded into the Flax model."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ng_jax.models.nets import flux
from ng_jax.models.nets.lora import lora_init
from ng_jax.models.nets.text import TextCond
from ng_jax.models.velocity import make_velocity_model
from ng_jax.models.weights import flux as flux_weights
from ng_jax.models.weights import stacked
from ng_jax.models.weights.flux import load_flux_transformer
from ng_jax.models.weights.safetensors import WeightsError
from ng_jax.models.weights.transformer import model_config_from_diffusers
from tests.fixtures import FLUX_SHAPE, save_flux_diffusers
from tests.fixtures import tiny_flux_cfg as tiny_cfg

B, H, W, C, L = FLUX_SHAPE  # non-square latents: a row/column mix-up in the ids or packing shows
TOL = 1e-4


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, H, W, C)).astype(np.float32)
    tokens = rng.standard_normal((B, L, 32)).astype(np.float32)
    pooled = rng.standard_normal((B, 32)).astype(np.float32)
    sigma = np.array([0.9, 0.3], np.float32)
    guidance = np.array([2.0, 4.0], np.float32)
    return x, TextCond(tokens=tokens, pooled=pooled, mask=np.ones((B, L), bool)), sigma, guidance


# ----------------------------------------------------------------------------------------------
# Without torch: packing, scan == unrolled, LoRA targets, config validation


def test_pack_latents_follows_flux_pipeline_channel_order():
    x = np.arange(B * H * W * C, dtype=np.float32).reshape(B, H, W, C)
    packed = np.asarray(flux.pack_latents(jnp.asarray(x)))
    assert packed.shape == (B, (H // 2) * (W // 2), 4 * C)
    # token (row r, col q) holds x[2r + dy, 2q + dx, c] at channel c * 4 + dy * 2 + dx
    r, q, c, dy, dx = 1, 2, 3, 1, 0
    assert packed[1, r * (W // 2) + q, c * 4 + dy * 2 + dx] == x[1, 2 * r + dy, 2 * q + dx, c]
    np.testing.assert_array_equal(np.asarray(flux.unpack_latents(jnp.asarray(packed), H, W)), x)
    ids = flux.latent_image_ids(H // 2, W // 2)
    np.testing.assert_array_equal(ids[r * (W // 2) + q], [0, r, q])


@pytest.fixture(scope="module")
def random_dev():
    """A tiny dev-like model with every parameter random (adaLN-Zero init would make blocks identities)."""
    model = make_velocity_model(tiny_cfg(True))
    leaves, treedef = jax.tree_util.tree_flatten(jax.eval_shape(model.init, jax.random.key(0)))
    rng = np.random.default_rng(1)
    return model, jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(0.2 * rng.standard_normal(p.shape), jnp.float32) for p in leaves])


def test_scanned_and_rematted_blocks_match_unrolled(random_dev):
    model, params = random_dev
    x, cond, sigma, guidance = _inputs()
    v = jax.jit(model.apply)(params, x, sigma, cond, guidance)
    assert float(jnp.max(jnp.abs(v))) > 0.1
    model_s = make_velocity_model(tiny_cfg(True, scan_blocks=True, remat=True))
    runs = flux_weights.runs(jax.eval_shape(model_s.init, jax.random.key(0)))
    scanned = stacked.stack(params, runs)
    assert scanned["transformer_blocks"]["attn"]["to_q"]["kernel"].shape == (2, 32, 32)
    assert scanned["single_transformer_blocks"]["proj_out"]["kernel"].shape == (2, 32 + 128, 32)
    assert jax.tree_util.tree_structure(jax.eval_shape(model_s.init, jax.random.key(0))) == \
        jax.tree_util.tree_structure(scanned)
    v_s = jax.jit(model_s.apply)(scanned, x, sigma, cond, guidance)
    np.testing.assert_allclose(np.asarray(v_s), np.asarray(v), atol=1e-5, rtol=0)
    back = stacked.unstack(scanned, runs)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), back, params))


def test_lora_targets_are_attention_and_feed_forward_kernels(random_dev):
    _, params = random_dev
    adapters = lora_init(params, jax.random.key(2), rank=2, alpha=4.0, targets=flux.FLUX_LORA_TARGETS)
    found = {"/".join(str(getattr(k, "key", k)) for k in p[:-1])
             for p, _ in jax.tree_util.tree_flatten_with_path(adapters)[0] if str(p[-1].key) == "lora_a"}
    want = set()
    for i in range(2):
        want |= {f"transformer_blocks_{i}/attn/{n}" for n in
                 ("to_q", "to_k", "to_v", "to_out_0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")}
        want |= {f"transformer_blocks_{i}/{ff}/{n}" for ff in ("ff", "ff_context") for n in ("net_0/proj", "net_2")}
        want |= {f"single_transformer_blocks_{i}/attn/{n}" for n in ("to_q", "to_k", "to_v")}
    assert found == want  # nothing else: no adaLN linears, embedders, proj_mlp / proj_out


def test_make_flux_model_rejects_inconsistent_configs():
    with pytest.raises(ValueError, match="axes_dims_rope"):
        make_velocity_model(tiny_cfg(True, axes_dims_rope=(4, 4, 4)))
    with pytest.raises(ValueError, match="guidance_embeds=False"):
        make_velocity_model(tiny_cfg(False, guidance=3.5))
    with pytest.raises(ValueError, match="patch_size"):
        make_velocity_model(tiny_cfg(False, patch_size=2))
    assert make_velocity_model(tiny_cfg(True)).guidance == 3.5
    assert make_velocity_model(tiny_cfg(False)).guidance is None


# ----------------------------------------------------------------------------------------------
# Against diffusers


def _diffusers_velocity(ref, x, cond, sigma, guidance):
    import torch
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    with torch.no_grad():
        packed = FluxPipeline._pack_latents(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), B, C, H, W)
        img_ids = FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, "cpu", torch.float32)
        out = ref(hidden_states=packed, encoder_hidden_states=torch.from_numpy(cond.tokens),
                  pooled_projections=torch.from_numpy(cond.pooled), timestep=torch.from_numpy(sigma),
                  img_ids=img_ids, txt_ids=torch.zeros(L, 3),
                  guidance=None if guidance is None else torch.from_numpy(guidance), return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, H * 8, W * 8, 8).numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def build_checkpoint(tmp_path_factory):
    """kind ("dev" | "schnell") -> saved checkpoint + the diffusers velocity on `_inputs()` (cached)."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    cache = {}

    def build(kind):
        if kind not in cache:
            dev = kind == "dev"
            root = str(tmp_path_factory.mktemp(f"flux_{kind}"))
            ref = save_flux_diffusers(root, dev, seed=0 if dev else 1)
            x, cond, sigma, guidance = _inputs()
            guidance = guidance if dev else None
            cache[kind] = dict(root=root, dev=dev, inputs=(x, cond, sigma, guidance),
                               v_ref=_diffusers_velocity(ref, x, cond, sigma, guidance))
        return cache[kind]

    return build


@pytest.fixture(params=["dev", "schnell"])
def checkpoint(request, build_checkpoint):
    return build_checkpoint(request.param)


@pytest.mark.needs_torch
@pytest.mark.parametrize("layout", [dict(), dict(scan_blocks=True, remat=True)], ids=["unrolled", "scanned"])
def test_velocity_matches_diffusers(checkpoint, layout):
    cfg = tiny_cfg(checkpoint["dev"], **layout)
    params = load_flux_transformer(checkpoint["root"], cfg)
    model = make_velocity_model(cfg)
    if layout:
        assert params["transformer_blocks"]["attn"]["norm_added_q"]["weight"].shape == (2, 16)
    x, cond, sigma, guidance = checkpoint["inputs"]
    v = np.asarray(jax.jit(model.apply)(params, x, sigma, cond, guidance))
    v_ref = checkpoint["v_ref"]
    assert v.shape == v_ref.shape == (B, H, W, C)
    assert np.abs(v_ref).max() > 0.1  # a meaningful comparison, not two near-zero outputs
    err = float(np.abs(v - v_ref).max())
    assert err <= TOL, f"max abs error {err:.3g}"


def _rewrite(root, dst, edit):
    """Copy the checkpoint at root to dst with `edit(dict of numpy tensors)` applied."""
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(root, dst)
    path = os.path.join(dst, "transformer", "diffusion_pytorch_model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return dst


def _rename(t):
    t["transformer_blocks.1.attn.to_qq.weight"] = t.pop("transformer_blocks.1.attn.to_q.weight")


def _extra(t):
    t["single_transformer_blocks.0.attn.to_out.0.weight"] = np.zeros((32, 32), np.float32)


def _misshape(t):
    t["single_transformer_blocks.1.proj_mlp.weight"] = np.zeros((128, 31), np.float32)


@pytest.mark.needs_torch
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("edit,names", [
    (_rename, ["transformer_blocks.1.attn.to_qq.weight", "transformer_blocks.1.attn.to_q.weight"]),
    (_extra, ["single_transformer_blocks.0.attn.to_out.0.weight"]),
    (_misshape, ["single_transformer_blocks.1.proj_mlp.weight"]),
], ids=["renamed", "extra", "misshaped"])
def test_loading_is_strict(build_checkpoint, tmp_path, scan, edit, names):
    bad = _rewrite(build_checkpoint("dev")["root"], str(tmp_path / "bad"), edit)
    with pytest.raises(WeightsError) as e:
        load_flux_transformer(bad, tiny_cfg(True, scan_blocks=scan))
    for name in names:
        assert re.search(re.escape(name) + r"\b", str(e.value)), (name, str(e.value))


@pytest.mark.needs_torch
def test_config_is_read_and_checked(checkpoint):
    cfg = model_config_from_diffusers(checkpoint["root"], sample_size=(H, W))
    want = tiny_cfg(checkpoint["dev"])
    for key in ("in_channels", "num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "axes_dims_rope"):
        assert cfg[key] == want[key], key
    assert cfg["guidance"] == (3.5 if checkpoint["dev"] else None)
    with pytest.raises(WeightsError, match="axes_dims_rope"):  # same tensor shapes, different RoPE split
        load_flux_transformer(checkpoint["root"], tiny_cfg(checkpoint["dev"], axes_dims_rope=(8, 4, 4)))


@pytest.mark.needs_torch
def test_parity_tool(checkpoint):
    from ng_jax.tools.parity import parity_flux

    out = parity_flux(checkpoint["root"], 3, latent_size=6)
    assert out["family"] == "flux"
    assert out["max_abs_err"] <= TOL and out["ref_max_abs"] > 0.1, out
    from diffusers import FluxTransformer2DModel

    ref = FluxTransformer2DModel.from_pretrained(os.path.join(checkpoint["root"], "transformer"))
    assert out["params"] == sum(p.numel() for p in ref.parameters())
