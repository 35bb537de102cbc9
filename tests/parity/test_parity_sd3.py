"""SD3 / SD3.5 MMDiT parity with diffusers' `SD3Transformer2DModel` on tiny random checkpoints.

Each checkpoint is built and saved once per module with diffusers (`save_pretrained`), loaded
strictly into the Flax model, and both run identical random inputs in float32 (NCHW in torch,
NHWC here; diffusers is fed `timestep = 1000 * sigma`, our `apply` takes sigma).
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the test extra (torch 2.13.0 + diffusers)")
diffusers = pytest.importorskip("diffusers", reason="needs the test extra (torch 2.13.0 + diffusers)")

from ng_jax import flow  # noqa: E402
from ng_jax.models.nets.text import TextCond  # noqa: E402
from ng_jax.models.velocity import make_velocity_model  # noqa: E402
from ng_jax.models.weights import sd3 as sd3_weights  # noqa: E402
from ng_jax.models.weights import stacked  # noqa: E402
from ng_jax.models.weights.safetensors import WeightsError  # noqa: E402
from ng_jax.models.weights.sd3 import load_sd3_transformer  # noqa: E402
from ng_jax.models.weights.transformer import model_config_from_diffusers  # noqa: E402
from ng_jax.sampling import make_sampler  # noqa: E402
from ng_jax.tools import check_weights, parity  # noqa: E402
from tests.fixtures import REPO  # noqa: E402

pytestmark = pytest.mark.needs_torch

TOL = 1e-4
COMMON = dict(patch_size=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
              caption_projection_dim=16, pooled_projection_dim=32)
# SD3: no qk-norm, no dual attention; pos_embed_max_size=None (diffusers then builds the table for the
# latent's own grid, interpolated from base_size = sample_size // patch_size).
SD3 = dict(COMMON, sample_size=16, in_channels=4, out_channels=4, num_layers=2, pos_embed_max_size=None)
# SD3.5: RMS qk-norm, MMDiT-X blocks 0-1, a 12x12 position table cropped to the latent's grid.
# Scanned, its 5 blocks are runs [0-1 dual] [2-3 plain] [4 context-pre-only].
SD35 = dict(COMMON, sample_size=16, in_channels=16, out_channels=16, num_layers=5, pos_embed_max_size=12,
            qk_norm="rms_norm", dual_attention_layers=(0, 1))


def _save(directory, kw, seed, dtype=None, **save_kw):
    torch.manual_seed(seed)
    tm = diffusers.SD3Transformer2DModel(**kw).eval()
    with torch.no_grad():  # perturb every weight (norm scales are ones at init) so the whole map matters
        for p in tm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = tm if dtype is None else tm.to(dtype)
    out.save_pretrained(os.path.join(directory, "transformer"), **save_kw)
    return tm


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """{name: (weights_dir, torch model)} for the SD3 and SD3.5 checkpoints."""
    root = tmp_path_factory.mktemp("sd3")
    return {name: (str(root / name), _save(str(root / name), kw, seed))
            for seed, (name, kw) in enumerate((("sd3", SD3), ("sd35", SD35)))}


def _inputs(seed, b, h, w, c, tokens=7):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, h, w, c)).astype(np.float32),
            rng.standard_normal((b, tokens, 32)).astype(np.float32),
            rng.standard_normal((b, 32)).astype(np.float32),
            rng.uniform(0.05, 1.0, (b,)).astype(np.float32))


def _torch_v(tm, x, tok, pooled, sigma):
    with torch.no_grad():
        out = tm(hidden_states=torch.from_numpy(x).permute(0, 3, 1, 2), encoder_hidden_states=torch.from_numpy(tok),
                 pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(1000.0 * sigma)).sample
    return out.permute(0, 2, 3, 1).numpy()


def _ours(model, params, x, tok, pooled, sigma):
    mask = np.zeros(tok.shape[:2], bool)  # ignored by sd3/sd35, as diffusers attends to every token
    return np.asarray(jax.jit(model.apply)(params, x, sigma, TextCond(tok, pooled, mask)))


def _err(a, b):
    return float(np.max(np.abs(a - b)))


@pytest.fixture(scope="module")
def sd35_unrolled(ckpt):
    cfg = model_config_from_diffusers(ckpt["sd35"][0])
    return cfg, make_velocity_model(cfg), load_sd3_transformer(cfg.weights_dir, cfg)


def test_config_from_diffusers_mirrors_config_json(ckpt):
    cfg = model_config_from_diffusers(os.path.join(ckpt["sd35"][0], "transformer"))
    assert cfg.family == "sd35" and cfg.qk_norm == "rms_norm" and tuple(cfg.dual_attention_layers) == (0, 1)
    assert (cfg.num_layers, cfg.pos_embed_max_size, cfg.weights_dir) == (5, 12, ckpt["sd35"][0])
    assert model_config_from_diffusers(ckpt["sd3"][0]).family == "sd3"


def test_sd3_parity_and_param_count(ckpt):
    wdir, tm = ckpt["sd3"]
    cfg = model_config_from_diffusers(wdir)
    model = make_velocity_model(cfg)
    params = load_sd3_transformer(wdir, cfg)
    assert sum(x.size for x in jax.tree.leaves(params)) == sum(p.numel() for p in tm.parameters())
    for h, w in ((16, 16), (16, 8)):  # full grid, and a non-square grid (interpolated table)
        args = _inputs(0, 2, h, w, 4)
        ref, ours = _torch_v(tm, *args), _ours(model, params, *args)
        assert ours.shape == ref.shape and np.abs(ref).max() > 0.5
        assert _err(ours, ref) <= TOL, (h, w, _err(ours, ref))


def test_sd35_parity_qk_norm_dual_attention_and_cropping(ckpt, sd35_unrolled):
    _, tm = ckpt["sd35"]
    _, model, params = sd35_unrolled
    assert "attn2" in params["transformer_blocks_0"] and "attn2" not in params["transformer_blocks_2"]
    last = params["transformer_blocks_4"]["attn"]  # context-pre-only: no to_add_out, still added-qk norms
    assert "norm_added_q" in last and "to_add_out" not in last
    # 16x16 latent -> an 8x8 grid centre-cropped from 12x12; 12x8 -> 6x4, off-square crop.
    for h, w in ((16, 16), (12, 8)):
        args = _inputs(1, 2, h, w, 16)
        ref, ours = _torch_v(tm, *args), _ours(model, params, *args)
        assert _err(ours, ref) <= TOL, (h, w, _err(ours, ref))
    with pytest.raises(ValueError, match="pos_embed_max_size"):  # as diffusers: larger than the table
        _ours(model, params, *_inputs(1, 1, 26, 26, 16))


def test_scanned_blocks_match_unrolled_and_torch(ckpt, sd35_unrolled):
    wdir, tm = ckpt["sd35"]
    cfg, model, params = sd35_unrolled
    scfg = model_config_from_diffusers(wdir, scan_blocks=True, remat=True)
    smodel = make_velocity_model(scfg)
    sparams = load_sd3_transformer(wdir, scfg)
    assert sorted(k for k in sparams if k.startswith("transformer_blocks")) == [
        "transformer_blocks_0_to_1", "transformer_blocks_2_to_3", "transformer_blocks_4"]
    assert sparams["transformer_blocks_0_to_1"]["block"]["attn2"]["to_q"]["kernel"].shape == (2, 16, 16)
    # The stacked layout is exactly the per-layer weights stacked, both ways.
    runs = sd3_weights.runs(sparams)
    restacked = stacked.stack(params, runs)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), restacked, sparams))
    unstacked = stacked.unstack(sparams, runs)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), unstacked, params))
    args = _inputs(2, 2, 16, 16, 16)
    ours_scan, ours = _ours(smodel, sparams, *args), _ours(model, params, *args)
    assert _err(ours_scan, ours) <= 1e-5
    assert _err(ours_scan, _torch_v(tm, *args)) <= TOL


def test_euler_sampling_matches_diffusers_scheduler(ckpt, sd35_unrolled):
    _, tm = ckpt["sd35"]
    _, model, params = sd35_unrolled
    n, shift = 4, 3.0
    noise, tok, pooled, _ = _inputs(3, 2, 16, 16, 16)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    # The FLUX-style grid s = linspace(1, 1/N, N) that flow.sigma_grid (and so make_sampler) uses.
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n))
    np.testing.assert_allclose(sched.sigmas.numpy(), np.asarray(flow.sigma_grid(n, shift=shift)), atol=1e-6)
    x = torch.from_numpy(noise).permute(0, 3, 1, 2)
    with torch.no_grad():
        for t in sched.timesteps:
            v = tm(hidden_states=x, encoder_hidden_states=torch.from_numpy(tok),
                   pooled_projections=torch.from_numpy(pooled), timestep=t.expand(2)).sample
            x = sched.step(v, t, x).prev_sample
    ref = x.permute(0, 2, 3, 1).numpy()
    sample = jax.jit(make_sampler(model.apply, num_steps=n, shift=shift))
    ours = np.asarray(sample(params, noise, TextCond(tok, pooled, np.ones(tok.shape[:2], bool))).x0)
    assert np.abs(ref - noise).max() > 0.5  # the trajectory moved
    assert _err(ours, ref) <= TOL, _err(ours, ref)


def test_scheduler_default_grid_is_sigma_grid_with_training_s_min():
    """`set_timesteps(N)` without sigmas (the SD3 pipeline's default) ends the linspace at the
    shifted smallest training sigma, not at 1/N: it equals sigma_grid(N, shift, s_min=shift(1/1000))."""
    n, shift = 4, 3.0
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(n)
    default = sched.sigmas.numpy()
    s_min = float(flow.shift_sigmas(1.0 / 1000, shift))
    np.testing.assert_allclose(default, np.asarray(flow.sigma_grid(n, shift=shift, s_min=s_min)), atol=1e-6)
    assert np.abs(default - np.asarray(flow.sigma_grid(n, shift=shift))).max() > 1e-2


def _rewrite(src_dir, dst_dir, edit):
    """Copy a single-file checkpoint, editing its tensor dict with `edit(dict) -> dict`."""
    from safetensors.numpy import load_file, save_file

    os.makedirs(os.path.join(dst_dir, "transformer"))
    shutil.copy(os.path.join(src_dir, "transformer", "config.json"), os.path.join(dst_dir, "transformer"))
    name = "diffusion_pytorch_model.safetensors"
    save_file(edit(load_file(os.path.join(src_dir, "transformer", name))),
              os.path.join(dst_dir, "transformer", name))
    return dst_dir


def _renamed(t):
    t["proj_out.wieght"] = t.pop("proj_out.weight")
    return t


@pytest.mark.parametrize("edit, names", [
    (_renamed, ("proj_out.weight", "proj_out.wieght")),
    (lambda t: {**t, "transformer_blocks.0.attn.extra.weight": np.zeros(3, np.float32)},
     ("transformer_blocks.0.attn.extra.weight",)),
    (lambda t: {**t, "transformer_blocks.1.ff.net.2.weight": t["transformer_blocks.1.ff.net.2.weight"][:, :-1].copy()},
     ("transformer_blocks.1.ff.net.2.weight", "mis-shaped")),
], ids=["renamed", "extra", "mis-shaped"])
def test_strict_loading_names_the_bad_tensor(ckpt, tmp_path, edit, names, capsys):
    good = ckpt["sd3"][0]
    bad = _rewrite(good, str(tmp_path / "bad"), edit)
    for scan in (False, True):
        with pytest.raises(WeightsError) as err:
            load_sd3_transformer(bad, model_config_from_diffusers(bad, scan_blocks=scan))
        assert all(n in str(err.value) for n in names), str(err.value)
    assert check_weights.main(["--family", "sd3", "--weights_dir", bad]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and names[0] in out


def _three_problems(t):
    t = dict(t)
    del t["context_embedder.weight"]                                               # missing
    t["transformer_blocks.0.attn.extra.weight"] = np.zeros(3, np.float32)            # unexpected
    t["transformer_blocks.1.ff.net.2.weight"] = t["transformer_blocks.1.ff.net.2.weight"][:, :-1].copy()  # mis-shaped
    return t


def test_missing_extra_and_misshaped_tensors_are_named_in_one_error(ckpt, tmp_path):
    bad = _rewrite(ckpt["sd3"][0], str(tmp_path / "bad3"), _three_problems)
    with pytest.raises(WeightsError) as err:
        load_sd3_transformer(bad, model_config_from_diffusers(bad))
    msg = str(err.value)
    for name in ("context_embedder.weight", "transformer_blocks.0.attn.extra.weight",
                 "transformer_blocks.1.ff.net.2.weight"):
        assert name in msg, (name, msg)
    assert "missing" in msg and "unexpected" in msg and "mis-shaped" in msg


def test_config_mismatch_is_an_error(ckpt, tmp_path):
    wdir = ckpt["sd35"][0]
    with pytest.raises(WeightsError, match="qk_norm"):
        load_sd3_transformer(wdir, model_config_from_diffusers(wdir, qk_norm=""))
    # A config.json whose sample_size does not match the saved position table (base size 8, not 16).
    edited = tmp_path / "edited"
    shutil.copytree(wdir, edited)
    raw = json.loads((edited / "transformer" / "config.json").read_text())
    (edited / "transformer" / "config.json").write_text(json.dumps({**raw, "sample_size": 8}))
    with pytest.raises(WeightsError, match="pos_embed.pos_embed differs"):
        load_sd3_transformer(str(edited), model_config_from_diffusers(str(edited)))


# The released architectures (their transformer config.json), checked structurally at full size:
# diffusers builds them on the meta device (no memory), and our key map must cover its state dict.
RELEASED = {
    "sd3-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
    "sd3.5-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                         qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
    "sd3.5-large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                        qk_norm="rms_norm"),
}


class _MetaReader:
    """The part of SafetensorsDir that check_map uses, over a state dict of meta tensors."""

    def __init__(self, state):
        self.state, self.directory, self.key_file = state, "<meta>", dict.fromkeys(state, "meta")

    def shape(self, key):
        return tuple(self.state[key].shape)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_architectures_map_completely(name):
    import ml_collections

    from ng_jax.models.weights.safetensors import check_map

    kw = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
              joint_attention_dim=4096, pooled_projection_dim=2048, **RELEASED[name])
    with torch.device("meta"):
        tm = diffusers.SD3Transformer2DModel(**kw)
    reader = _MetaReader(tm.state_dict())
    for scan in (False, True):
        cfg = ml_collections.ConfigDict(dict(kw, family="sd35", scan_blocks=scan))
        abstract = jax.eval_shape(lambda cfg=cfg: make_velocity_model(cfg).init(jax.random.key(0)))
        keymap = sd3_weights.sd3_keymap(abstract, cfg)
        source = stacked.StackedReader(reader, {s.key for s in keymap.values()}) if scan else reader
        check_map(keymap, abstract, source, ignore_unused=(sd3_weights.POS_EMBED_BUFFER,))  # raises on any gap
        assert sum(x.size for x in jax.tree.leaves(abstract)) == sum(p.numel() for p in tm.parameters())


def test_sharded_and_bf16_saves_load_identically(ckpt, sd35_unrolled, tmp_path):
    _, _, params = sd35_unrolled
    sharded = str(tmp_path / "sharded")
    _save(sharded, SD35, seed=1, max_shard_size="40KB")  # same seed as ckpt["sd35"]: same weights
    files = os.listdir(os.path.join(sharded, "transformer"))
    assert sum(f.endswith(".safetensors") for f in files) > 1 and any(f.endswith(".index.json") for f in files)
    cfg = model_config_from_diffusers(sharded)
    loaded = load_sd3_transformer(sharded, cfg)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), loaded, params))
    # Scanned, straight into shardings on the 8-device CPU mesh (one stacked kernel split 8 ways).
    from jax.sharding import NamedSharding, PartitionSpec as P

    scfg = model_config_from_diffusers(sharded, scan_blocks=True)
    abstract = jax.eval_shape(lambda: make_velocity_model(scfg).init(jax.random.key(0)))
    mesh = jax.make_mesh((8,), ("m",), axis_types=(jax.sharding.AxisType.Auto,))
    shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract)
    shardings["transformer_blocks_2_to_3"]["block"]["ff"]["net_2"]["kernel"] = NamedSharding(mesh, P(None, "m"))
    scanned = load_sd3_transformer(sharded, scfg, shardings=shardings)
    kernel = scanned["transformer_blocks_2_to_3"]["block"]["ff"]["net_2"]["kernel"]
    assert kernel.shape == (2, 64, 16) and kernel.sharding.spec == P(None, "m")
    unstacked = stacked.unstack(scanned, sd3_weights.runs(scanned))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), unstacked, params))
    # bf16 checkpoints (how released weights ship) read exactly as the bf16 rounding of the weights.
    bf16 = str(tmp_path / "bf16")
    _save(bf16, SD35, seed=1, dtype=torch.bfloat16)
    loaded = load_sd3_transformer(bf16, cfg, dtype=np.float32)
    import ml_dtypes

    rounded = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32), params)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), loaded, rounded))


def test_parity_cli(ckpt, tmp_path, capsys):
    wdir = ckpt["sd35"][0]
    assert parity.main(["--family", "sd3", "--weights_dir", wdir]) == 0
    result = json.loads(capsys.readouterr().out.strip())
    assert result["family"] == "sd3" and result["max_abs_err"] <= TOL and result["params"] > 0
    assert parity.main(["--family", "sd3", "--weights_dir", wdir, "--tol", "1e-12"]) == 1  # above tolerance
    capsys.readouterr()
    assert parity.main(["--family", "sd3", "--weights_dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "parity: error" in err and "nope" in err
    broken = tmp_path / "broken" / "transformer"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{not json")
    assert parity.main(["--family", "sd3", "--weights_dir", str(broken.parent)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_parity_cli_as_module(ckpt):
    proc = subprocess.run([sys.executable, "-m", "ng_jax.tools.parity", "--family", "sd3", "--weights_dir",
                           ckpt["sd3"][0]], capture_output=True, text=True, timeout=300,
                          cwd=REPO,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["max_abs_err"] <= TOL


def test_check_weights_cli(ckpt, capsys):
    wdir, tm = ckpt["sd35"]
    assert check_weights.main(["--family", "sd3", "--weights_dir", wdir]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["ok"] and summary["params"] == sum(p.numel() for p in tm.parameters())
    assert summary["dtypes"] == {"F32": summary["tensors"]} and "OK" in out
    assert check_weights.main(["--family", "sd3", "--weights_dir", wdir + "_missing"]) == 2
