"""RL on the real model families (ng_jax.models.stack) with tiny random diffusers directories.

An SD3.5-style directory (transformer with RMS qk-norm and an MMDiT-X dual-attention layer, an
AutoencoderKL, CLIP-L / bigG / T5 encoders and tokenizers) and a FLUX.1-dev-style one (guidance
embedding, CLIP-L + T5) are saved with diffusers / transformers, then `ng_jax.rl.loop.run` runs AWM +
NormGuard and NFT + NormGuard through the shipped configs' builders, shrunk to 2 epochs of 16 tiny
rollouts on the 8-device CPU mesh, rewarded by a tiny CLIP score (numpy backend). The shipped
configs are also parsed by the entry point, with and without `model.weights_dir`.

The model pieces come from tests/fixtures.py, shared with the parity tests (the same tiny checkpoints
those tests check against diffusers); only the dimensions that must agree across components are chosen here.
"""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from ng_jax.config import methods
from ng_jax.logs import read_metrics
from ng_jax.main import main, parse_args
from ng_jax.rl import loop
from tests.fixtures import REAL_T5_LEN as T5_LEN
from tests.fixtures import REPO as ROOT
from tests.fixtures import (VAE_CONFIGS, save_flux_diffusers, save_sd35_diffusers, save_text_encoders,
                            save_tiny_clip, torch_vae)
from tests.fixtures import tiny_real_config as tiny

CONFIGS = ("sd35m_nft_normguard", "sd35m_awm_normguard", "sd35m_dpo_normguard", "flux1dev_nft_normguard",
           "flux1dev_awm_normguard")
PROMPTS = ["a red cat", "the blue dog", "a photo of a cat", "a dog on the red cat"]
VAE16 = VAE_CONFIGS["sd3"]  # 16 latent channels, downsample 2
VAE4 = dict(VAE16, block_out_channels=(32, 32), latent_channels=4, scaling_factor=0.3611, shift_factor=0.1159)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    pytest.importorskip("torch", reason="needs the test extra (torch 2.13.0 + diffusers)")
    pytest.importorskip("diffusers", reason="needs the test extra (torch 2.13.0 + diffusers)")
    root = tmp_path_factory.mktemp("real_models")
    sd35, flux = str(root / "sd35"), str(root / "flux")
    save_sd35_diffusers(sd35)
    save_flux_diffusers(flux, True, seed=0)  # 2 double + 2 single blocks, guidance embedding
    torch_vae(1, **VAE4).save_pretrained(os.path.join(flux, "vae"))
    save_text_encoders(flux, "flux")
    clip = str(root / "clip")
    save_tiny_clip(clip, "quick_gelu", 0)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return {"sd35": sd35, "flux": flux, "clip": clip, "prompts": str(prompts)}


def _spy_stack(monkeypatch) -> dict:
    """Filled by the next loop.run: the stack it builds and a host copy of its reference params at
    build time."""
    seen = {}
    build = loop.build_model_stack

    def spy(*args, **kwargs):
        stack = build(*args, **kwargs)
        seen.update(stack=stack, ref0=jax.device_get(stack.ref))
        return stack

    monkeypatch.setattr(loop, "build_model_stack", spy)
    return seen


def _run(config, workdir, monkeypatch):
    """loop.run, keeping what `_spy_stack` records."""
    seen = _spy_stack(monkeypatch)
    assert loop.run(config, str(workdir)) == 0
    return seen


def _check_run(seen, workdir, method, epochs=2):
    stack = seen["stack"]
    # The frozen reference is exactly what was loaded (not donated, not updated), in the bf16 base dtype.
    leaves = jax.tree.leaves(jax.device_get(stack.ref))
    assert {str(x.dtype) for x in leaves} == {"bfloat16"}
    for a, b in zip(leaves, jax.tree.leaves(seen["ref0"])):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))

    train_recs = [m for m in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in m]
    assert [m["step"] for m in train_recs] == list(range(1, epochs + 1))
    parts = {"awm": ("train/policy_loss", "train/kl_ref", "train/kl_ema", "train/ratio_mean"),
             "nft": ("train/policy_loss", "train/kl", "train/loss_pos", "train/loss_neg")}[method]
    for rec in train_recs:
        for key in ("train/loss", "train/base_loss", "train/normguard_penalty", "train/normguard_active_frac",
                    "train/norm_ratio", "train/grad_norm", "train/reward", "train/reward/clip_score") + parts:
            assert key in rec and np.isfinite(rec[key]), (key, rec.get(key))
        assert rec["train/optimizer_steps"] == 2 * rec["step"]
        assert 0.3 < rec["train/norm_ratio"] < 3.0
        assert rec["train/reward_std"] > 0  # distinct images got distinct CLIP scores
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    for tag in ("eval_initial", "eval"):
        assert np.isfinite(summary[tag]["reward"]) and np.isfinite(summary[tag]["norm_ratio"])
        assert summary[tag]["fd"] is None and "accuracy" not in summary[tag]  # toy judges off
    assert abs(summary["eval_initial"]["norm_ratio"] - 1.0) < 1e-3  # LoRA starts at the reference
    assert os.path.isfile(os.path.join(workdir, "samples", f"epoch_{epochs:04d}.png"))

    # The export: the trained LoRA adapters (float32), readable with orbax, and a note how to use them.
    import orbax.checkpoint as ocp

    export = summary["policy_export"]
    with open(os.path.join(export, "policy_params.json")) as f:
        note = json.load(f)
    assert note["trainable"] == "lora_adapters" and note["family"] == stack.family
    adapters = ocp.StandardCheckpointer().restore(os.path.join(export, "params"))
    flat = jax.tree_util.tree_flatten_with_path(adapters)[0]
    assert flat and {str(x.dtype) for _, x in flat} == {"float32"}
    assert max(float(np.abs(x).max()) for p, x in flat if str(p[-1].key) == "lora_b") > 0  # trained
    assert not os.path.exists(os.path.join(workdir, "policy"))  # no toy bundle for real models
    return {"/".join(str(k.key) for k in p[:-1]) for p, _ in flat}  # the adapted kernels


@pytest.mark.needs_torch
@pytest.mark.slow
def test_awm_normguard_on_sd35(dirs, tmp_path, monkeypatch):
    """Through the entry point, `python -m ng_jax.main --config=FILE --workdir=DIR`, in this process."""
    from ng_jax import main as entry

    (tmp_path / "dirs.json").write_text(json.dumps({k: str(v) for k, v in dirs.items()}))
    cfg_file = tmp_path / "sd35_tiny.py"
    cfg_file.write_text(
        "import json, sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from ng_jax.config import methods\n"
        "from tests.fixtures import tiny_real_config\n\n\n"
        "def get_config(arg=None):\n"
        f"    d = json.load(open({str(tmp_path / 'dirs.json')!r}))\n"
        "    return tiny_real_config(methods.sd35_medium_config('awm', normguard_lam=1.0), d['sd35'], d)\n")
    seen = _spy_stack(monkeypatch)
    workdir = tmp_path / "run"
    assert entry.main(["ng_jax.main", f"--config={cfg_file}", f"--workdir={workdir}"]) == 0
    tmp_path = workdir
    stack = seen["stack"]
    assert stack.family == "sd35" and stack.model.sample_shape == (8, 8, 16)
    assert stack.info["latent_size"] == 8
    # group conditioning: distinct prompts encoded once, rows repeated; the empty prompt broadcast
    cond = stack.encode(PROMPTS[:2], repeat=2)
    one = stack.encode(PROMPTS[:1])
    assert cond.tokens.shape == (4, 77 + T5_LEN, 48) and cond.pooled.shape == (4, 48)
    np.testing.assert_array_equal(np.asarray(cond.tokens[1]), np.asarray(one.tokens[0]))
    assert not np.array_equal(np.asarray(cond.tokens[1]), np.asarray(cond.tokens[2]))
    np.testing.assert_array_equal(np.asarray(stack.uncond(3).pooled[2]), np.asarray(stack.encode([""]).pooled[0]))
    assert {"transformer_blocks_0", "transformer_blocks_2"} <= set(stack.ref)
    assert "attn2" in stack.ref["transformer_blocks_0"] and "attn2" not in stack.ref["transformer_blocks_2"]
    adapted = _check_run(seen, str(tmp_path), "awm")
    # LoRA on q/k/v/out of both attention streams only (not attn2 of the MMDiT-X block, not the MLPs)
    assert {f"transformer_blocks_0/attn/{n}" for n in ("to_q", "to_k", "to_v", "to_out_0", "add_q_proj",
                                                       "add_k_proj", "add_v_proj", "to_add_out")} <= adapted
    assert not any("attn2" in p or "/ff" in p or "norm" in p for p in adapted)


@pytest.mark.needs_torch
@pytest.mark.slow
def test_nft_normguard_on_flux(dirs, tmp_path, monkeypatch):
    config = tiny(methods.flux1_dev_config("nft", normguard_lam=1.0), dirs["flux"], dirs)
    config.rl.num_timesteps = 2
    seen = _run(config, tmp_path, monkeypatch)
    stack = seen["stack"]
    assert stack.family == "flux1_dev" and stack.model.guidance == 3.5 and stack.model.sample_shape == (8, 8, 4)
    adapted = _check_run(seen, str(tmp_path), "nft")
    assert {"transformer_blocks_0/attn/add_q_proj", "transformer_blocks_0/ff_context/net_2",
            "single_transformer_blocks_1/attn/to_q"} <= adapted  # FLUX_LORA_TARGETS
    assert not any("proj_mlp" in p or "single_transformer_blocks_0/proj_out" in p for p in adapted)
    # the evaluate job scores the trained policy (LoRA merged on the base) as the run's final evaluation did
    from ng_jax.eval import evaluate
    from ng_jax.eval.grid import load_config_file

    ev = load_config_file("eval_reference.py")
    ev.model, ev.rewards, ev.eval, ev.mesh, ev.policy = config.model, config.rewards, config.eval, config.mesh, str(tmp_path)
    assert evaluate.run(ev, str(tmp_path / "evaluate")) == 0
    got = json.load(open(tmp_path / "evaluate" / "eval.json"))
    want = json.load(open(tmp_path / "summary.json"))["eval"]
    assert got["norm_ratio"] != 1.0
    for key in ("reward", "norm_ratio"):
        assert got[key] == pytest.approx(want[key], rel=1e-3), key


@pytest.mark.needs_torch
def test_check_weights_covers_the_config_families(dirs, capsys):
    from ng_jax.tools import check_weights

    for family, directory in (("sd35", dirs["sd35"]), ("flux1_dev", dirs["flux"]), ("vae", dirs["sd35"]),
                              ("vae", dirs["flux"])):
        assert check_weights.main(["--family", family, "--weights_dir", directory]) == 0, family
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["ok"]
    # the FLUX transformer is not an SD3 one: a clear failure, not a pass
    assert check_weights.main(["--family", "sd35", "--weights_dir", dirs["flux"]]) != 0
    capsys.readouterr()


def test_trainable_tree_is_float32_over_a_bf16_base():
    """The dtype policy: LoRA adapters and full fine-tuning's master weights are float32 whatever the
    frozen base's dtype; the merged LoRA policy keeps the base dtype and equals the base at step 0."""
    import jax.numpy as jnp

    from ng_jax.models.stack import trainable_init
    from ng_jax.rl.step import policy_params_fn

    rng = np.random.default_rng(0)
    base = {"blk": {"attn": {"to_q": {"kernel": jnp.asarray(rng.standard_normal((8, 4)), jnp.bfloat16),
                                      "bias": jnp.zeros((4,), jnp.bfloat16)}},
                    "ff": {"kernel": jnp.asarray(rng.standard_normal((4, 8)), jnp.bfloat16)}}}
    full = trainable_init(base, None, jax.random.key(0))
    assert {str(x.dtype) for x in jax.tree.leaves(full)} == {"float32"}
    np.testing.assert_array_equal(np.asarray(full["blk"]["ff"]["kernel"]),
                                  np.asarray(base["blk"]["ff"]["kernel"], np.float32))
    lora_cfg = ml_collections.ConfigDict(dict(rank=2, alpha=4.0, targets=methods.SD3_LORA_TARGETS))
    adapters = trainable_init(base, lora_cfg, jax.random.key(0))
    assert set(adapters["blk"]) == {"attn"} and {str(x.dtype) for x in jax.tree.leaves(adapters)} == {"float32"}
    policy = policy_params_fn(lora_cfg)(adapters, base)
    assert policy["blk"]["attn"]["to_q"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(policy["blk"]["attn"]["to_q"]["kernel"], np.float32),
                                  np.asarray(base["blk"]["attn"]["to_q"]["kernel"], np.float32))


# ------------------------------------------------------------------ the shipped configs, parsed


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_needs_weights_dir(name, tmp_path, capsys):
    path = os.path.join(ROOT, "ng_jax", "configs", f"{name}.py")
    assert main(["ng_jax.main", f"--config={path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.weights_dir is required" in err and "check_weights" in err
    missing = tmp_path / "nowhere"
    assert main(["ng_jax.main", f"--config={path}", f"--config.model.weights_dir={missing}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a directory" in err

    weights, pick = tmp_path / "w", tmp_path / "p"
    weights.mkdir()
    pick.mkdir()
    config, workdir, _ = parse_args(["ng_jax.main", f"--config={path}", f"--config.model.weights_dir={weights}",
                                     f"--config.rewards.pickscore_dir={pick}", "--config.rl.epochs=3"])
    flux = name.startswith("flux")
    method = name.split("_")[1]
    assert workdir == f"workdirs/{name}" and config.rl.epochs == 3 and config.rl.method == method
    assert config.model.family == ("flux1_dev" if flux else "sd35") and config.model.resolution == 512
    assert dict(config.rewards.weights) == {"pickscore": 1.0} and config.normguard.lam > 0
    assert tuple(config.mesh.shape) == (1, -1, 1)
    assert (config.lora.rank, config.lora.alpha) == (32, 64.0)
    assert config.rl.group_size == 24 and config.optim.grad_clip == 1.0
    if flux:
        assert config.model.guidance == 3.5 and abs(config.rl.rollout.mu - 0.63) < 1e-6
    else:
        assert config.rl.rollout.shift == 3.0 and config.model.resolution // 8 == 64
    expected = {"nft": dict(lr=3e-4, steps=10, cfg=1.0, ema=0.5, loss=dict(beta=1.0, kl_beta=1e-4)),
                "awm": dict(lr=3e-4, steps=14, cfg=1.0, ema=0.3, loss=dict(beta=1e-4, ema_beta=1.0)),
                "dpo": dict(lr=1e-5, steps=10, cfg=4.5, ema=0.0, loss=dict(beta=100.0))}[method]
    assert config.optim.lr == expected["lr"] and config.rl.rollout.num_steps == expected["steps"]
    assert config.rl.rollout.cfg_scale == expected["cfg"] and config.rl.ema.max == expected["ema"]
    assert {k: config.loss[k] for k in expected["loss"]} == expected["loss"]
    if method == "awm":
        assert (config.rl.num_timesteps, config.rl.grid_fraction) == (6, 0.9)
    # without the PickScore weights: one line too
    assert main(["ng_jax.main", f"--config={path}", f"--config.model.weights_dir={weights}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rewards.pickscore_dir is required" in err
