"""The analyses' pure parts (ng_jax.eval.analysis: adjoint summary statistics, the matched-reward control)
and the MLLM judge client (ng_jax.judges.mllm) against a local chat-completions server. The analyses on a
pretrained bundle and their command line: tests/e2e/test_analyze.py."""

from __future__ import annotations

import http.server
import json
import os
import threading

import numpy as np
from scipy import stats
import pytest

from ng_jax.eval.analysis import adjoint, matched
from ng_jax.eval.stats import holm
from ng_jax.judges import mllm

# ------------------------------------------------------------------ adjoint


def test_adjoint_summary_statistics():
    jac = np.array([[1.0, -1.0, 0.0], [3.0, 1.0, 0.0], [2.0, -3.0, 0.0]])
    s = adjoint.summarize(jac, np.array([1.0, 0.6, 0.3]))
    np.testing.assert_allclose(s["mean"], [2.0, -1.0, 0.0])
    np.testing.assert_allclose(s["spread"], [np.sqrt(2 / 3), np.sqrt(8 / 3), 0.0])
    np.testing.assert_allclose(s["sign_agreement"], [1.0, 2 / 3, 0.0])
    np.testing.assert_allclose(s["coherence"][:2], [2.0 / np.sqrt(2 / 3), 1.0 / np.sqrt(8 / 3)])
    # significance: scipy's one-sample t test per step, Holm-corrected over the 3 steps
    raw = [stats.ttest_1samp(jac[:, k], 0.0).pvalue for k in range(2)] + [1.0]
    np.testing.assert_allclose(s["p_holm"], holm(raw))
    assert s["significant_steps"] == 0  # 3 samples: even step 0's coherence 2.4 is not significant


def test_adjoint_coherence_is_significant_only_with_enough_samples():
    rng = np.random.default_rng(0)
    # steps 0 and 1: mean 1, spread 2 (coherence 0.5); steps 2 and 3: mean 0
    coherent = rng.normal(np.array([1.0, 1.0, 0.0, 0.0]), 2.0, (64, 4))
    s = adjoint.summarize(coherent, np.linspace(1, 0.25, 4))
    assert s["significant_steps"] == 2 and max(s["p_holm"][2:]) > 0.05
    few = adjoint.summarize(coherent[:4], np.linspace(1, 0.25, 4))
    assert few["significant_steps"] < 2


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
