"""The analyses of ng_jax.eval.analyze on the tiny pretrained reference and a copy whose velocity is exactly
1.1x larger: checkpoint resolution, the adjoint Jacobian against finite differences, and the command line
end to end (the analyses' pure parts: tests/unit/test_analysis.py)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ng_jax.eval import analyze
from ng_jax.eval.analysis import adjoint, checkpoints
from ng_jax.models.bundle import BundleError, ModelBundle, load_bundle, save_bundle

pytestmark = pytest.mark.slow
SCALE = 1.1


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_reference):
    """The tiny reference and an 'inflated' policy: proj_out scaled by 1.1, so v_policy = 1.1 v_ref exactly
    (the output projection is linear and CFG combines velocities linearly)."""
    root = tmp_path_factory.mktemp("analysis")
    ref_dir = tiny_reference.bundle
    ref = load_bundle(ref_dir)
    vel = jax.tree.map(np.array, ref.params["velocity"])
    proj = vel["proj_out"]
    proj["kernel"] = proj["kernel"] * SCALE
    proj["bias"] = proj["bias"] * SCALE
    workdir = root / "inflated_run"
    save_bundle(str(workdir / checkpoints.POLICY_DIR),
                ModelBundle(ref.model_cfg, ref.text_cfg, ref.sampling, {"text": ref.params["text"], "velocity": vel}))
    return {"root": root, "reference": ref_dir, "run": str(workdir), "prompts": tiny_reference.prompts}


# ------------------------------------------------------------------ checkpoints


def test_checkpoint_resolution(bundles):
    got = checkpoints.resolve(f"reference,{bundles['run']},mine={bundles['reference']}", bundles["reference"])
    assert got == [("reference", bundles["reference"]),
                   ("inflated_run", os.path.join(bundles["run"], checkpoints.POLICY_DIR)),
                   ("mine", bundles["reference"])]
    with pytest.raises(BundleError, match="nor a finished RL workdir.*nowhere"):
        checkpoints.resolve(["reference", str(bundles["root"] / "nowhere")])
    with pytest.raises(BundleError, match="unique"):
        checkpoints.resolve([bundles["reference"], bundles["reference"]])
    with pytest.raises(BundleError, match="no checkpoints"):
        checkpoints.resolve(" , ")


# ------------------------------------------------------------------ adjoint


def test_adjoint_jacobian_matches_finite_differences(bundles):
    from ng_jax.models.nets.text import EMPTY_PROMPT, make_text_encoder, tokenize
    from ng_jax.models.velocity import make_velocity_model
    from ng_jax.rewards.verifier import load_verifier_params
    from ng_jax.sampling import make_sampler

    ref = load_bundle(bundles["reference"])
    model, text = make_velocity_model(ref.model_cfg), make_text_encoder(ref.text_cfg)
    prompts = ["a red circle", "a blue square", "two red circles"]
    ids, mask = tokenize(text.tokenizer, prompts)
    uids, umask = tokenize(text.tokenizer, [EMPTY_PROMPT] * 3)
    cond, uncond = text.encode(ref.params["text"], ids, mask), text.encode(ref.params["text"], uids, umask)
    noise = jax.random.normal(jax.random.key(3), (3,) + model.sample_shape)
    n = 4
    sampler = make_sampler(model.apply, num_steps=n, cfg_scale=2.0)
    reward_fn = adjoint.verifier_reward_fn(load_verifier_params(), prompts)
    params = ref.params["velocity"]
    jac = np.asarray(jax.jit(lambda p: adjoint.reward_jacobian(sampler, reward_fn, p, noise, cond, uncond, n))(params))
    assert jac.shape == (3, n) and np.all(np.isfinite(jac)) and np.abs(jac).max() > 1e-4

    rewards = jax.jit(lambda a: reward_fn(sampler(params, noise, cond, uncond, step_scales=a).x0))

    def central(k, h):
        e = jnp.zeros(n).at[k].set(h)
        return (np.asarray(rewards(1.0 + e), np.float64) - np.asarray(rewards(1.0 - e), np.float64)) / (2 * h)

    # Where the reward curves sharply a central difference is off by O(h^2): several % at h = 2e-3 for this
    # reference (one entry read -0.546 at h = 2e-3 and -0.520 at 5e-4 for a Jacobian of -0.515). Richardson
    # extrapolation of two step sizes cancels the h^2 term.
    h = 1e-3
    for k in range(n):
        fd = (4 * central(k, h / 2) - central(k, h)) / 3
        np.testing.assert_allclose(jac[:, k], fd, rtol=0.05, atol=2e-3)


# ------------------------------------------------------------------ the CLI end to end


def _cli(bundles, analysis, out, *extra):
    return analyze.main(["analyze", analysis, f"--checkpoints=reference,{bundles['run']}", f"--out={out}",
                         f"--config.reference={bundles['reference']}", f"--config.eval.prompt_file={bundles['prompts']}",
                         "--config.eval.num_prompts=4", "--config.eval.samples_per_prompt=2",
                         "--config.eval.batch_size=8", "--config.eval.num_steps=4", "--config.eval.cfg_scale=2.0",
                         *extra])


def test_cli_norms_renorm_and_few_step(bundles, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert _cli(bundles, "norms", out) == 0
    assert _cli(bundles, "renorm", out) == 0
    assert _cli(bundles, "few_step", out, "--config.analysis.few_steps=(2,4)") == 0
    norms = json.loads(open(os.path.join(out, "norms.json")).read())
    np.testing.assert_allclose(norms["reference"]["mean"], 1.0, rtol=1e-5)
    np.testing.assert_allclose(norms["inflated_run"]["mean"], SCALE, rtol=1e-4)
    assert norms["inflated_run"]["sigma"][0] == pytest.approx(1.0) and len(norms["inflated_run"]["sigma"]) == 4

    renorm = json.loads(open(os.path.join(out, "renorm.json")).read())
    # CFG-free and guided (ng_jax/configs/analyze.py: CFG 4.5), CFG-rescale guided only.
    assert set(renorm["reference"]) == {"plain", "renorm", "plain_cfg4.5", "renorm_cfg4.5", "cfg_rescale_0.7_cfg4.5"}
    # Rescaled to the reference norm at every step, the inflated policy IS the reference sampler, guided or not.
    for plain, renormed in (("plain", "renorm"), ("plain_cfg4.5", "renorm_cfg4.5")):
        want, got = renorm["reference"][plain], renorm["inflated_run"][renormed]
        assert got["reward"] == pytest.approx(want["reward"], abs=1e-6), plain
        assert got["fd"] == pytest.approx(want["fd"], rel=1e-3), plain

    few = json.loads(open(os.path.join(out, "few_step.json")).read())
    assert few["reference"]["num_steps"] == [2, 4]
    assert few["reference"]["reward"][1] == pytest.approx(renorm["reference"]["plain"]["reward"], abs=1e-6)
    for name in ("norms.png", "renorm.png", "few_step.png"):
        assert os.path.getsize(os.path.join(out, name)) > 1000
    text = capsys.readouterr().out
    assert "| inflated_run |" in text and "renorm" in text


def test_cli_errors_are_one_line(bundles, tmp_path, capsys):
    assert analyze.main(["analyze", "nonsense"]) == 2
    assert "unknown analysis 'nonsense'" in capsys.readouterr().err
    assert _cli(bundles, "matched", str(tmp_path / "m")) == 1
    assert "needs RL workdirs" in capsys.readouterr().err
    assert analyze.main(["analyze", "norms", f"--checkpoints={tmp_path / 'missing'}", f"--out={tmp_path / 'o'}"]) == 1
    assert "nor a finished RL workdir" in capsys.readouterr().err
