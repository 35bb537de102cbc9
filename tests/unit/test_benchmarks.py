"""benchmarks/: the PyTorch baseline computes ng_jax's losses, and `benchmarks.run` writes every result key.

The losses are compared value and gradient (torch autograd vs `jax.grad`) on random inputs chosen so
that every branch matters (clipped advantages, active and inactive NormGuard hinges, both powers and
forms). The end-to-end check runs the benchmark's micro profile (`--tiny`: a 1-layer SD3 transformer,
one compiled step per method and NormGuard weight) and reads back its JSON.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ng_jax import losses

torch = pytest.importorskip("torch", reason="needs the test extra (torch 2.13.0 + diffusers)")
pytest.importorskip("diffusers", reason="needs the test extra (torch 2.13.0 + diffusers)")

from benchmarks import run as bench_run  # noqa: E402
from benchmarks import torch_reference as tr  # noqa: E402
from tests.fixtures import REPO  # noqa: E402

pytestmark = pytest.mark.needs_torch

SHAPE = (6, 4, 4, 3)
TOL = dict(rtol=2e-5, atol=2e-6)


def _arrays(seed, n):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(n)]


def _sigma_adv(seed):
    rng = np.random.default_rng(seed + 100)
    sigma = rng.uniform(0.05, 1.0, SHAPE[0]).astype(np.float32)
    adv = (rng.standard_normal(SHAPE[0]) * 4).astype(np.float32)  # some beyond the clip at 5
    adv[0] = 7.0
    return sigma, adv


def _compare(jax_fn, torch_fn, arrays):
    """Value and gradient with respect to the first array (the policy velocity)."""
    j_val, j_grad = jax.value_and_grad(lambda v: jax_fn(v, *[jnp.asarray(a) for a in arrays[1:]]))(
        jnp.asarray(arrays[0]))
    t_args = [torch.tensor(a) for a in arrays]
    t_args[0].requires_grad_(True)
    t_val = torch_fn(*t_args)
    t_val.backward()
    np.testing.assert_allclose(float(t_val.detach()), float(j_val), **TOL)
    np.testing.assert_allclose(t_args[0].grad.numpy(), np.asarray(j_grad), **TOL)
    assert np.abs(np.asarray(j_grad)).max() > 0


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_loss_matches(beta):
    sigma, adv = _sigma_adv(0)
    kw = dict(beta=beta, kl_beta=1e-2, adv_clip=5.0)
    _compare(lambda v, vo, vr, xt, x0: losses.nft_loss(v, vo, vr, xt, x0, sigma, adv, **kw)[0],
             lambda v, vo, vr, xt, x0: tr.nft_loss(v, vo, vr, xt, x0, torch.tensor(sigma), torch.tensor(adv), **kw)[0],
             _arrays(0, 5))


def test_awm_loss_matches():
    sigma, adv = _sigma_adv(1)
    kw = dict(beta=1e-2, ema_beta=1.0, p=0.25, clip_range=1.0, adv_clip=5.0)
    _compare(lambda v, vr, ve, u: losses.awm_loss(v, vr, ve, u, sigma, adv, **kw)[0],
             lambda v, vr, ve, u: tr.awm_loss(v, vr, ve, u, torch.tensor(sigma), torch.tensor(adv), **kw)[0],
             _arrays(1, 4))
    v, u = _arrays(2, 2)
    np.testing.assert_allclose(tr.awm_log_prob(torch.tensor(v), torch.tensor(u), torch.tensor(sigma)).numpy(),
                               np.asarray(losses.awm_log_prob(v, u, sigma)), **TOL)


def test_dpo_loss_matches():
    a = _arrays(3, 6)
    a[0] = a[4] + 0.3 * a[0]  # errors of a realistic size, so the sigmoid is not saturated everywhere
    _compare(lambda *x: losses.dpo_loss(*x, beta=100.0)[0], lambda *x: tr.dpo_loss(*x, beta=100.0)[0], a)


@pytest.mark.parametrize("power,relative,margin", [(1, True, 0.0), (2, True, 0.05), (1, False, 0.0), (2, False, 0.1)])
def test_normguard_matches(power, relative, margin):
    v, v_ref, v2, v_ref2 = _arrays(4, 4)
    scale = np.array([1.5, 0.5, 1.2, 0.8, 1.01, 2.0], np.float32).reshape(-1, 1, 1, 1)  # active and inactive
    v = v_ref * scale + 0.01 * v
    v2 = v_ref2 * scale[::-1] + 0.01 * v2
    kw = dict(margin=margin, power=power, relative=relative)

    def jax_fn(v, v_ref, v2, v_ref2):
        total, aux = losses.with_normguard(jnp.float32(0.25), [v, v2], [v_ref, v_ref2], lam=0.5, **kw)
        return total

    def torch_fn(v, v_ref, v2, v_ref2):
        return tr.with_normguard(torch.tensor(0.25), [v, v2], [v_ref, v_ref2], lam=0.5, **kw)[0]

    _compare(jax_fn, torch_fn, [v, v_ref, v2, v_ref2])
    pen_j = losses.normguard_penalty(v, v_ref, **kw)
    pen_t = tr.normguard_penalty(torch.tensor(v), torch.tensor(v_ref), **kw)
    np.testing.assert_allclose(pen_t.numpy(), np.asarray(pen_j), **TOL)
    assert (np.asarray(pen_j) == 0).any() and (np.asarray(pen_j) > 0).any()
    _, aux_j = losses.with_normguard(0.0, [v], [v_ref], lam=0.0, **kw)
    _, aux_t = tr.with_normguard(torch.tensor(0.0), [torch.tensor(v)], [torch.tensor(v_ref)], lam=0.0, **kw)
    for k in aux_j:
        np.testing.assert_allclose(float(aux_t[k]), float(aux_j[k]), **TOL)


def test_training_sigmas_follow_each_scheme():
    rng = np.random.default_rng(0)
    grid = tuple(np.linspace(1.0, 0.1, 10))
    nft = tr.training_sigmas("nft", rng, 8, 4, 3, grid, 0.99)
    assert nft.shape == (2, 3, 4) and np.isclose(nft.ravel()[:, None], np.asarray(grid[:9])[None]).any(1).all()
    per_sample = nft.transpose(0, 2, 1).reshape(8, 3)
    assert all(len(set(row)) == 3 for row in per_sample)  # a permutation: no repeated timestep per sample
    awm = tr.training_sigmas("awm", rng, 8, 4, 3, grid, 0.9)
    assert awm.shape == (2, 3, 4) and (awm == awm[:, :, :1]).all()  # shared by the micro-batch
    assert (awm[:, 0] > awm[:, 1]).all() and (awm[:, 1] > awm[:, 2]).all()  # one per stratum, in order
    dpo = tr.training_sigmas("dpo", rng, 8, 4, 2, grid, 1.0)
    assert dpo.shape == (2, 2, 4) and ((dpo > 0) & (dpo < 1)).all()


def test_tiny_run_writes_every_key(tmp_path):
    out = tmp_path / "results.json"
    bench_run.main(["--tiny", "--out", str(out)])
    res = json.loads(out.read_text())
    for key in ("ng_overhead", "train_speedup_vs_torch"):
        assert set(res[key]) == set(bench_run.METHODS)
        assert all(np.isfinite(v) and v > 0 for v in res[key].values())
    for key in ("rollout_speedup_vs_torch", "roofline_fraction"):
        assert np.isfinite(res[key]) and res[key] > 0
    assert "cpu" in res["device"].lower() or res["device"]
    assert res["threads"]["torch"] >= 1 and res["model"]["params"] > 0
    # The two rollouts run the same network from the same weights: they must agree.
    assert all(r["max_abs_diff"] < 1e-4 for r in res["rollout"].values())
    assert res["scaling"]["rows"] and all(r["step_gflop"] > 0 for r in res["scaling"]["rows"])
    assert len(res["targets"]) == 8


@pytest.mark.slow
@pytest.mark.needs_torch
def test_epoch_breakdown_smoke(tmp_path, tiny_reference):
    """benchmarks/epoch.py at tiny size: every part of the breakdown is recorded, and the device-placed CLIP
    reward leaves nothing for the host callbacks to score."""
    from benchmarks import epoch

    out = tmp_path / "e.json"
    res = epoch.run(epochs=2, tiny=True, out=str(out), log=lambda *_: None, reference=tiny_reference.bundle,
                    prompts=tiny_reference.prompts)
    assert json.load(open(out)) == json.loads(json.dumps(res))
    s = res["scenarios"]
    for name in ("verifier_host", "clip_host", "clip_device"):
        assert s[name]["epoch_s"] >= s[name]["rollout_s"] > 0 and s[name]["train_s"] > 0 and s[name]["timed_epochs"] == 1
    assert s["clip_host"]["reward_host_s"] > 0 and s["clip_device"]["reward_host_s"] == 0.0
    assert "| clip_device |" in epoch.markdown(res) and "cores" in res["device"]


def test_epoch_breakdown_is_the_median_epoch():
    """The compiling first epoch is dropped; the row is the median epoch's own parts (they add up to it), not
    medians per part (here rollout 4 and train 8)."""
    from benchmarks import epoch

    parts = ((50.0, 50.0, 5.0), (9.0, 3.0, 1.0), (2.0, 8.0, 0.5), (4.0, 18.0, 2.0))
    records = [{"eval/eval_s": 9.0}] + [
        {"train/rollout_s": ro, "train/train_s": tr, "train/epoch_s": ro + tr, "train/reward_host_s": h,
         "train/reward_host_span_s": h} for ro, tr, h in parts] + [{"eval/eval_s": 7.0}]
    row = epoch.breakdown(records)
    assert (row["epoch_s"], row["rollout_s"], row["train_s"], row["reward_host_span_s"]) == (12.0, 9.0, 3.0, 1.0)
    assert row["timed_epochs"] == len(row["per_epoch"]) == 3 and row["eval_s_final"] == 7.0


@pytest.mark.slow
@pytest.mark.needs_torch
def test_epoch_breakdown_sd35m_smoke(tmp_path):
    """benchmarks/epoch.py --scale sd35m --tiny: the SD3.5 directory is built once into the cache, both
    placements run, and each breakdown's parts are present, positive and add up to the epoch."""
    from benchmarks import epoch

    out = tmp_path / "e.json"
    argv = ["--scale", "sd35m", "--tiny", "--epochs", "2", "--cache", str(tmp_path / "cache"), "--out", str(out)]
    assert epoch.main(argv) == 0
    res = json.load(open(out))
    assert res["scale"] == "sd35m" and res["shape"]["resolution"] == 16 and "load_average_after" in res
    assert json.load(open(tmp_path / "cache" / "sd35m_tiny" / "built.json"))["tiny"] is True
    s = res["scenarios"]
    assert set(s) == {"clip_host", "clip_device"}
    for r in s.values():
        assert r["timed_epochs"] == 1 and r["rollout_s"] > 0 and r["train_s"] > 0 and r["eval_s_final"] > 0
        assert r["rollout_s"] + r["train_s"] == pytest.approx(r["epoch_s"], rel=0.01)
        assert r["reward_host_span_s"] <= r["rollout_s"]
        assert r["reward_fraction"] == pytest.approx((r["reward_host_span_s"] + r["reward_device_s"]) / r["epoch_s"])
        assert 0 < r["reward_fraction"] < 1
    assert s["clip_host"]["reward_host_s"] > 0 and s["clip_host"]["reward_device_s"] == 0.0
    assert s["clip_device"]["reward_host_s"] == 0.0 and s["clip_device"]["reward_device_s"] > 0
    assert "SD3.5-Medium-shaped" in epoch.markdown(res) and "| clip_device |" in epoch.markdown(res)


@pytest.mark.slow
@pytest.mark.needs_torch
def test_accelerator_script_smoke(tmp_path):
    """benchmarks/accelerator.py --tiny runs both sides of every row on the CPU (the accelerator run is manual)."""
    pytest.importorskip("peft")
    from benchmarks import accelerator

    res = accelerator.run(tiny=True, out=str(tmp_path / "a.json"), log=lambda *_: None)
    assert set(res["rows"]) == {"train_full", "train_lora", "rollout"}
    for row in res["rows"].values():
        assert row["flops"] > 0 and row["ng_jax_xla"]["seconds"] > 0 and row["pytorch_sdpa"]["seconds"] > 0
    assert res["dims"]["num_layers"] == 2 and json.load(open(tmp_path / "a.json"))["dtype"] == "float32"


def test_workers_benchmark_reports_the_throughput_of_side_by_side_processes(tmp_path):
    """benchmarks/workers.py at its smoke size: one process alone, then two side by side, and the ratio."""
    out = tmp_path / "w.json"
    subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "workers.py"), "--calls", "1", "--batch", "2",
                    "--out", str(out)], check=True, capture_output=True, cwd=REPO)
    r = json.loads(out.read_text())
    assert r["workers"] == 2 and len(r["side_by_side_s_per_call"]) == 2 and r["alone_s_per_call"] > 0
    assert r["throughput_ratio"] == pytest.approx(2 * r["alone_s_per_call"] / np.mean(r["side_by_side_s_per_call"]))
    assert r["device"].startswith("cpu")
