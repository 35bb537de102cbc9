"""Parity of the Flax AutoencoderKL port with diffusers on tiny random configs, and strict loading.

Two layouts: SD3/FLUX-like (no quant convs, 32 groups, shift factor) and SD1-like (quant convs,
8 groups, three resolutions, no shift factor). Every tensor, norms included, is randomised before
saving so that a wrong transpose, channel grouping or padding side cannot hide behind an identity init.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ng_jax.models.nets.vae import VAEConfig, from_model_latents, make_vae, to_model_latents
from ng_jax.models.weights.safetensors import WeightsError
from ng_jax.models.weights.vae import check_vae_dir, load_vae, vae_config_from_diffusers, vae_keymap
from ng_jax.tools.parity import parity_vae
from tests.fixtures import VAE_CONFIGS, torch_vae

pytestmark = pytest.mark.needs_torch

TOL = 1e-4
CONFIGS = VAE_CONFIGS


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{name: (WEIGHTS_DIR, torch model)} for each config, saved as diffusers does."""
    out = {}
    for i, (name, kw) in enumerate(CONFIGS.items()):
        model = torch_vae(i, **kw)
        root = tmp_path_factory.mktemp(name)
        model.save_pretrained(str(root / "vae"))
        out[name] = (str(root), model)
    return out


def _copy_with(src_root: str, dst_root: str, edit) -> str:
    """Copy WEIGHTS_DIR/vae with its state dict passed through `edit(dict) -> dict`."""
    from safetensors.numpy import load_file, save_file

    os.makedirs(os.path.join(dst_root, "vae"))
    shutil.copy(os.path.join(src_root, "vae", "config.json"), os.path.join(dst_root, "vae", "config.json"))
    name = "diffusion_pytorch_model.safetensors"
    save_file(edit(load_file(os.path.join(src_root, "vae", name))), os.path.join(dst_root, "vae", name))
    return dst_root


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_decode_match_diffusers(saved, name):
    torch = pytest.importorskip("torch")
    root, ref = saved[name]
    vae, params = load_vae(root)
    cfg = vae.cfg
    f = cfg.downsample_factor
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    latents = rng.standard_normal((2, 32 // f, 32 // f, 16)).astype(np.float32)
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist
        want_mean, want_logvar = (t.numpy().transpose(0, 2, 3, 1) for t in (dist.mean, dist.logvar))
        want_img = ref.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2))).sample.numpy().transpose(0, 2, 3, 1)

    got = jax.jit(vae.encode)(params, images)
    img = jax.jit(vae.decode)(params, latents)
    assert got.mean.shape == (2, 32 // f, 32 // f, 16) and img.shape == (2, 32, 32, 3)
    errs = {"mean": np.abs(np.asarray(got.mean) - want_mean).max(),
            "logvar": np.abs(np.asarray(got.logvar) - want_logvar).max(),
            "decode": np.abs(np.asarray(img) - want_img).max()}
    print(name, {k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) <= TOL, errs
    assert np.abs(want_img).max() > 0.1 and np.abs(want_mean).max() > 0.1  # not a trivially-zero comparison


def test_config_from_diffusers(saved):
    sd3 = vae_config_from_diffusers(os.path.join(saved["sd3"][0], "vae"))
    assert sd3 == VAEConfig(**CONFIGS["sd3"])
    sd1 = vae_config_from_diffusers(os.path.join(saved["sd1"][0], "vae"))
    assert (sd1.use_quant_conv, sd1.use_post_quant_conv, sd1.shift_factor, sd1.scaling_factor) == (
        True, True, 0.0, 0.18215)
    assert sd1.downsample_factor == 4


def test_latent_scaling_round_trip():
    cfg = VAEConfig(**CONFIGS["sd3"])
    z = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 16)) * 3.0 + 0.5
    model_z = to_model_latents(z, cfg)
    # the SD3 / FLUX pipelines: encode -> (z - shift) * scale; decode <- z / scale + shift
    np.testing.assert_allclose(model_z, (z - 0.0609) * 1.5305, rtol=1e-6)
    np.testing.assert_allclose(from_model_latents(model_z, cfg), z, rtol=1e-5, atol=1e-6)
    vae = make_vae(cfg)
    np.testing.assert_allclose(vae.from_model_latents(vae.to_model_latents(z)), z, rtol=1e-5, atol=1e-6)
    sd1 = VAEConfig(**{**CONFIGS["sd1"], "shift_factor": 0.0})
    np.testing.assert_allclose(to_model_latents(z, sd1), z * 0.18215, rtol=1e-6)


def test_strict_loading_names_every_problem(saved, tmp_path):
    root = saved["sd3"][0]
    load_vae(root)  # the pristine directory loads

    def rename(sd):
        sd["encoder.conv_in.weight_renamed"] = sd.pop("encoder.conv_in.weight")
        return sd

    def extra(sd):
        sd["decoder.mid_block.attentions.0.extra.weight"] = np.zeros((3,), np.float32)
        return sd

    def misshape(sd):
        sd["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"] = np.zeros((32, 64, 3, 3), np.float32)
        return sd

    def drop(sd):
        del sd["encoder.mid_block.attentions.0.to_k.bias"]
        return sd

    cases = {"rename": (rename, ["encoder.conv_in.weight_renamed", "encoder.conv_in.weight"]),
             "extra": (extra, ["decoder.mid_block.attentions.0.extra.weight"]),
             "misshape": (misshape, ["decoder.up_blocks.1.resnets.0.conv_shortcut.weight", "(3, 3, 64, 32)"]),
             "drop": (drop, ["encoder.mid_block.attentions.0.to_k.bias"])}
    for case, (edit, names) in cases.items():
        bad = _copy_with(root, str(tmp_path / case), edit)
        with pytest.raises(WeightsError) as err:
            load_vae(bad)
        for n in names:
            assert n in str(err.value), (case, str(err.value))

    # a config whose blocks we do not port is refused by name
    cfg_dir = _copy_with(root, str(tmp_path / "attn_blocks"), lambda sd: sd)
    path = os.path.join(cfg_dir, "vae", "config.json")
    raw = json.load(open(path))
    raw["down_block_types"] = ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]
    json.dump(raw, open(path, "w"))
    with pytest.raises(WeightsError, match="AttnDownEncoderBlock2D"):
        load_vae(cfg_dir)
    # a key map for the wrong tree is refused before any checkpoint is read
    other = jax.eval_shape(make_vae(VAEConfig(**CONFIGS["sd1"])).init, jax.random.PRNGKey(0))
    with pytest.raises(WeightsError, match="does not match its config"):
        vae_keymap(other, VAEConfig(**CONFIGS["sd3"]))


def test_legacy_attention_layout_loads_identically(saved, tmp_path):
    """LDM-era names (query/key/value/proj_attn) with 1x1-conv shapes give the same parameters."""
    root = saved["sd3"][0]

    def legacy(sd):
        out = {}
        for k, v in sd.items():
            for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
                if ".attentions.0." in k and f".{new}." in k:
                    k = k.replace(f".{new}.", f".{old}.")
                    v = v[:, :, None, None] if v.ndim == 2 else v
            out[k] = v
        return out

    _, want = load_vae(root)
    _, got = load_vae(_copy_with(root, str(tmp_path / "legacy"), legacy))
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


def test_no_mid_attention_layout(tmp_path):
    model = torch_vae(3, **{**CONFIGS["sd3"], "mid_block_add_attention": False})
    model.save_pretrained(str(tmp_path / "vae"))
    cfg = vae_config_from_diffusers(str(tmp_path / "vae"))
    assert not cfg.mid_block_add_attention
    check_vae_dir(str(tmp_path))  # every tensor mapped, nothing left over, shapes agree


def test_remat_and_bf16_agree(saved):
    root = saved["sd3"][0]
    vae, params = load_vae(root)
    vae_r, _ = load_vae(root, remat=True)
    vae_b, params_b = load_vae(root, dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params_b))
    z = jax.random.normal(jax.random.PRNGKey(2), (1, 8, 8, 16))

    def loss(vae_):
        return lambda p: jnp.mean(vae_.decode(p, z) ** 2)

    ref, g = jax.jit(jax.value_and_grad(loss(vae)))(params)
    ref_r, g_r = jax.jit(jax.value_and_grad(loss(vae_r)))(params)
    np.testing.assert_allclose(ref_r, ref, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), g_r, g)
    out, out_b = jax.jit(vae.decode)(params, z), jax.jit(vae_b.decode)(params_b, z)
    assert out_b.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out_b - out) / jnp.linalg.norm(out))
    assert rel < 0.05, rel


def test_parity_vae_report(saved):
    for name in CONFIGS:
        report = parity_vae(saved[name][0], seed=0)
        print(name, report)
        assert report["family"] == "vae"
        assert report["params"] == sum(p.numel() for p in saved[name][1].parameters())
        assert 0.0 <= report["max_abs_err"] <= TOL
