"""The analyses of ng_jax.eval.analyze: checkpoints, adjoint sensitivity, matched reward, the MLLM judge
client, and the CLI end to end on a tiny bundle and a copy whose velocity is exactly 1.1x larger."""

from __future__ import annotations

import http.server
import json
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rl_fixtures
from ng_jax.eval import analyze
from ng_jax.eval.analysis import adjoint, checkpoints, matched
from ng_jax.judges import mllm
from ng_jax.models.bundle import BundleError, ModelBundle, load_bundle, save_bundle

SCALE = 1.1


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """The tiny reference and an 'inflated' policy: proj_out scaled by 1.1, so v_policy = 1.1 v_ref exactly
    (the output projection is linear and CFG combines velocities linearly)."""
    root = tmp_path_factory.mktemp("analysis")
    ref_dir = rl_fixtures.build_tiny_bundle(str(root / "reference"), steps=150)
    ref = load_bundle(ref_dir)
    vel = jax.tree.map(np.array, ref.params["velocity"])
    proj = vel["proj_out"]
    proj["kernel"] = proj["kernel"] * SCALE
    proj["bias"] = proj["bias"] * SCALE
    workdir = root / "inflated_run"
    save_bundle(str(workdir / checkpoints.POLICY_DIR),
                ModelBundle(ref.model_cfg, ref.text_cfg, ref.sampling, {"text": ref.params["text"], "velocity": vel}))
    prompts = rl_fixtures.write_prompt_file(str(root))
    return {"root": root, "reference": ref_dir, "run": str(workdir), "prompts": prompts}


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


def test_adjoint_summary_statistics():
    jac = np.array([[1.0, -1.0, 0.0], [3.0, 1.0, 0.0], [2.0, -3.0, 0.0]])
    s = adjoint.summarize(jac, np.array([1.0, 0.6, 0.3]))
    np.testing.assert_allclose(s["mean"], [2.0, -1.0, 0.0])
    np.testing.assert_allclose(s["spread"], [np.sqrt(2 / 3), np.sqrt(8 / 3), 0.0])
    np.testing.assert_allclose(s["sign_agreement"], [1.0, 2 / 3, 0.0])
    np.testing.assert_allclose(s["coherence"][:2], [2.0 / np.sqrt(2 / 3), 1.0 / np.sqrt(8 / 3)])


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
    h = 2e-3
    for k in range(n):
        e = jnp.zeros(n).at[k].set(h)
        fd = (np.asarray(rewards(1.0 + e)) - np.asarray(rewards(1.0 - e))) / (2 * h)
        np.testing.assert_allclose(jac[:, k], fd, rtol=0.05, atol=2e-3)


# ------------------------------------------------------------------ matched reward


def _summary(method, lam, rewards_hist, final, fd_hist, rewards=None):
    hist = [{"epoch": 10 * (i + 1), "reward": r, "fd": f, "precision": 0.5} for i, (r, f) in
            enumerate(zip(rewards_hist, fd_hist))]
    return {"method": method, "normguard": {"lam": lam}, "rewards": rewards or {"verifier": 1.0},
            "eval_initial": {"reward": 0.3, "fd": 100.0, "precision": 0.4},
            "eval": {"reward": final, "fd": 50.0, "precision": 0.6}, "history": hist}


def test_matched_reward_picks_the_closest_baseline_evaluation(tmp_path):
    runs = {"awm": _summary("awm", 0.0, [0.4, 0.5, 0.7], 0.7, [120, 130, 150]),
            "awm_ng": _summary("awm", 0.5, [0.4, 0.52], 0.52, [90, 50]),
            "nft": _summary("nft", 0.0, [0.51], 0.51, [200]),                       # other method
            "awm_jpeg": _summary("awm", 0.0, [0.52], 0.52, [10], {"jpeg": 1.0})}     # other reward
    rows = matched.matched_reward(runs)
    assert len(rows) == 1
    row = rows[0]
    assert (row["normguard_run"], row["baseline_run"], row["baseline_epoch"]) == ("awm_ng", "awm", 20)
    assert row["baseline_fd"] == 130 and row["fd"] == 50.0
    assert row["reward_gap"] == pytest.approx(0.5 - 0.52)
    # From disk, with a clear error for an unfinished run.
    for name, s in runs.items():
        os.makedirs(tmp_path / name)
        (tmp_path / name / "summary.json").write_text(json.dumps(s))
    assert matched.matched_reward(matched.load_runs([str(tmp_path / n) for n in runs])) == rows
    os.makedirs(tmp_path / "unfinished")
    with pytest.raises(matched.RunSummaryError, match="no summary.json"):
        matched.load_runs([str(tmp_path / "unfinished")])


# ------------------------------------------------------------------ MLLM judge


@pytest.mark.parametrize("reply, score", [
    ('{"score": 7}', 7.0), ('```json\n{"score": 8.5}\n```', 8.5), ("Score: 6/10", 6.0),
    ("I would give it **9** out of 10.", 9.0), ("Rating: 3", 3.0), ("7", 7.0), ("score = 10", 10.0),
    ("I'm sorry, I can't evaluate this image.", None), ("", None), (None, None), ("great image!", None),
    ('{"score": "high"}', None), ("Score: 14/10", None), ('{"score": -1}', None)])
def test_parse_score(reply, score):
    assert mllm.parse_score(reply) == score


class _ChatServer(http.server.BaseHTTPRequestHandler):
    replies: list = []
    requests: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body))
        status, payload = type(self).replies.pop(0)
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ChatServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _ChatServer.replies, _ChatServer.requests = [], []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", _ChatServer
    server.shutdown()


def _chat(content):
    return 200, {"choices": [{"message": {"role": "assistant", "content": content}}]}


def test_judge_client_scores_refusals_and_malformed_replies(chat_server):
    url, handler = chat_server
    handler.replies = [_chat('{"score": 8}'), _chat("I cannot help with that."), _chat("nice colours"),
                       _chat("Score: 5/10")]
    judge = mllm.MLLMJudge(url, "vlm", rubric="realism")
    images = np.zeros((4, 32, 32, 3), np.uint8)
    res = judge.score(images, ["a red circle"] * 4)
    np.testing.assert_allclose(res["scores"], [0.8, np.nan, np.nan, 0.5])
    assert (res["mean"], res["scored"], res["refused"], res["unparsed"]) == (pytest.approx(0.65), 2, 1, 1)
    path, body = handler.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "vlm" and body["temperature"] == 0
    assert body["messages"][0]["content"] == mllm.RUBRICS["realism"]
    image_part = body["messages"][1]["content"][1]
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,")


@pytest.mark.parametrize("reply, match", [((500, {"error": "boom"}), "HTTP 500"),
                                          ((200, "not json"), "not a chat-completions reply"),
                                          ((200, {"choices": []}), "not a chat-completions reply")])
def test_judge_transport_failures_are_errors(chat_server, reply, match):
    url, handler = chat_server
    handler.replies = [reply]
    with pytest.raises(mllm.JudgeError, match=match):
        mllm.MLLMJudge(url, "vlm").score(np.zeros((1, 8, 8, 3), np.uint8), ["x"])


def test_judge_connection_refused_is_an_error():
    with pytest.raises(mllm.JudgeError, match="127.0.0.1:9"):
        mllm.MLLMJudge("http://127.0.0.1:9/v1", "vlm", timeout_s=2).ask(np.zeros((8, 8, 3), np.uint8), "x")


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
    # Rescaled to the reference norm at every step, the inflated policy IS the reference sampler.
    assert renorm["inflated_run"]["renorm"]["reward"] == pytest.approx(renorm["reference"]["plain"]["reward"], abs=1e-6)
    assert renorm["inflated_run"]["renorm"]["fd"] == pytest.approx(renorm["reference"]["plain"]["fd"], rel=1e-3)
    assert set(renorm["reference"]) == {"plain", "renorm", "cfg_rescale_0.7"}

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
