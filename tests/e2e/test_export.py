"""`python -m ng_jax.tools.export`: a trained real-model policy (full fine-tune or LoRA) into diffusers, on
tiny generated SD3.5 and FLUX directories; diffusers (torch) computes the exported policy's velocity and
it equals ng_jax's to 1e-4.

The trained trees are written exactly as an RL run's export writes them (`checkpoint.export_params` with the
loop's note); the run itself is tested in tests/e2e/test_real_model_rl.py.
"""

import os

import jax
import numpy as np
import pytest

from ng_jax.checkpoint import export_params
from ng_jax.config import blocks
from ng_jax.models.nets.lora import lora_init, lora_merge
from ng_jax.models.nets.text import TextCond
from ng_jax.models.stack import load_transformer, velocity_config
from ng_jax.models.velocity import make_velocity_model
from ng_jax.rl.export import POLICY_PARAMS_DIR
from ng_jax.tools import export as tool
from tests.fixtures import VAE_CONFIGS, save_flux_diffusers, save_sd35_transformer, torch_vae

pytestmark = [pytest.mark.needs_torch, pytest.mark.slow]
LORA = {"rank": 4, "alpha": 8.0}
TARGETS = {"sd35": (r"(^|/)attn/(to_q|to_k|to_v|to_out_0|add_q_proj)$",), "flux1_dev": (r"attn/(to_q|to_v)$",)}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("export_weights")
    out = {"sd35": str(root / "sd35"), "flux1_dev": str(root / "flux")}
    save_sd35_transformer(out["sd35"])
    torch_vae(0, **VAE_CONFIGS["sd3"]).save_pretrained(os.path.join(out["sd35"], "vae"))
    save_flux_diffusers(out["flux1_dev"], True, seed=0)
    torch_vae(1, **dict(VAE_CONFIGS["sd3"], latent_channels=4)).save_pretrained(os.path.join(out["flux1_dev"], "vae"))
    return out


def _model_cfg(family, weights_dir):
    m = blocks.real_model_config(family)
    m.update(weights_dir=weights_dir, resolution=16, dtype="float32", scan_blocks=False, remat=False)
    return m


def _trained(family, weights_dir, workdir, lora: bool):
    """A 'trained' policy as an RL run exports it; returns (vcfg, the policy's full parameters)."""
    mcfg = _model_cfg(family, weights_dir)
    vcfg = velocity_config(mcfg, 8)
    base = jax.device_get(load_transformer(vcfg, dtype=np.float32))
    rng = np.random.default_rng(0)
    if lora:
        adapters = lora_init(base, jax.random.key(0), rank=LORA["rank"], alpha=LORA["alpha"], targets=TARGETS[family])
        adapters = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32), adapters)
        trainable, policy = adapters, lora_merge(base, adapters, **LORA)
    else:
        trainable = policy = jax.tree.map(lambda x: x + 0.02 * rng.standard_normal(x.shape).astype(np.float32), base)
    export_params(os.path.join(workdir, POLICY_PARAMS_DIR), trainable, {
        "family": family, "model": mcfg.to_dict(), "trainable": "lora_adapters" if lora else "full_weights_float32",
        "lora": dict(LORA, targets=TARGETS[family]) if lora else None})
    return vcfg, jax.device_get(policy)


def _inputs(vcfg, family, seed=0):
    rng = np.random.default_rng(seed)
    model = make_velocity_model(vcfg)
    x = rng.standard_normal((2,) + tuple(model.sample_shape)).astype(np.float32)
    tokens = rng.standard_normal((2, 8, int(vcfg.joint_attention_dim))).astype(np.float32)
    pooled = rng.standard_normal((2, int(vcfg.pooled_projection_dim))).astype(np.float32)
    sigma = np.array([0.3, 0.8], np.float32)
    return model, x, tokens, pooled, sigma


def _ours(vcfg, family, params):
    model, x, tokens, pooled, sigma = _inputs(vcfg, family)
    return np.asarray(model.apply(params, x, sigma, TextCond(tokens, pooled, np.ones(tokens.shape[:2], bool))))


def _torch(model_dir, vcfg, family, lora_file=None):
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    _, x, tokens, pooled, sigma = _inputs(vcfg, family)
    cls = FluxTransformer2DModel if family == "flux1_dev" else SD3Transformer2DModel
    net = cls.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    if lora_file:
        net.load_lora_adapter(lora_file, prefix="transformer")
    with torch.no_grad():
        if family != "flux1_dev":
            return net(hidden_states=torch.from_numpy(x).permute(0, 3, 1, 2), encoder_hidden_states=torch.from_numpy(tokens),
                       pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(1000 * sigma),
                       return_dict=False)[0].permute(0, 2, 3, 1).numpy()
        b, h, w, c = x.shape
        packed = FluxPipeline._pack_latents(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), b, c, h, w)
        ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
        out = net(hidden_states=packed, encoder_hidden_states=torch.from_numpy(tokens),
                  pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(sigma), img_ids=ids,
                  txt_ids=torch.zeros(tokens.shape[1], 3), guidance=torch.full((b,), 3.5), return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8).numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("family", ["sd35", "flux1_dev"])
def test_full_fine_tune_exports_to_a_diffusers_transformer(weights, tmp_path, family):
    vcfg, policy = _trained(family, weights[family], tmp_path / "run", lora=False)
    assert tool.main([str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    ours, theirs = _ours(vcfg, family, policy), _torch(str(tmp_path / "out" / "transformer"), vcfg, family)
    base = _torch(os.path.join(weights[family], "transformer"), vcfg, family)
    assert np.max(np.abs(theirs - base)) > 1e-2  # the export carries the trained weights, not the base
    np.testing.assert_allclose(theirs, ours, atol=1e-4 * max(1.0, float(np.abs(ours).max())))


@pytest.mark.parametrize("family", ["sd35", "flux1_dev"])
def test_lora_exports_merged_and_as_a_peft_adapter(weights, tmp_path, family):
    pytest.importorskip("peft")
    vcfg, policy = _trained(family, weights[family], tmp_path / "run", lora=True)
    run, out = str(tmp_path / "run"), tmp_path / "out"
    assert tool.main([run, "--out", str(out)]) == 0
    assert tool.main([run, "--out", str(out), "--format", "peft"]) == 0
    ours = _ours(vcfg, family, policy)
    tol = 1e-4 * max(1.0, float(np.abs(ours).max()))
    np.testing.assert_allclose(_torch(str(out / "transformer"), vcfg, family), ours, atol=tol)
    with_adapter = _torch(os.path.join(weights[family], "transformer"), vcfg, family, str(out / tool.PEFT_FILE))
    np.testing.assert_allclose(with_adapter, ours, atol=tol)
    base = _torch(os.path.join(weights[family], "transformer"), vcfg, family)
    assert np.max(np.abs(with_adapter - base)) > 100 * tol  # the adapter was loaded and acts


def test_export_errors_are_one_line(weights, tmp_path, capsys):
    (tmp_path / "toy" / "policy").mkdir(parents=True)
    assert tool.main([str(tmp_path / "toy"), "--out", str(tmp_path / "o")]) == 1
    assert "toy-world run" in capsys.readouterr().err
    _trained("sd35", weights["sd35"], tmp_path / "full", lora=False)
    assert tool.main([str(tmp_path / "full"), "--out", str(tmp_path / "o"), "--format", "peft"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no LoRA adapters" in err
