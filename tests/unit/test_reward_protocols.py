"""Per-prompt metadata from JSONL prompt files reaching reward servers, and the client adapters for the wire
formats of flow_grpo's (pickle, opt-in) and Flow-Factory's (JSON) reward servers, each against a loopback
server that speaks that format."""

import base64
import io
import json
import pickle
import threading
import http.server

import ml_collections as mlc
import numpy as np
import pytest
from PIL import Image

from ng_jax.config.checks import ConfigError
from ng_jax.data.sources import read_prompt_file, read_prompt_metadata
from ng_jax.rewards import registry
from ng_jax.rewards.host import WeightedRewards
from ng_jax.rewards.remote import RemoteReward, serve_reward

# GenEval's evaluation_metadata.jsonl layout: tag, include (class, count, color, position), exclude, prompt
GENEVAL = [
    {"tag": "counting", "include": [{"class": "circle", "count": 2}], "exclude": [{"class": "circle", "count": 3}],
     "prompt": "two circles"},
    {"tag": "position", "include": [{"class": "square", "count": 1},
                                    {"class": "circle", "count": 1, "position": ["right of", 0]}],
     "prompt": "a circle right of a square"},
    {"tag": "colors", "include": [{"class": "triangle", "count": 1, "color": "red"}], "prompt": "a red triangle"},
]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def _geneval_file(tmp_path):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in GENEVAL) + "\n")
    return str(path)


def test_jsonl_metadata_reaches_an_ng_jax_server_through_weighted_rewards(tmp_path):
    path = _geneval_file(tmp_path)
    prompts = read_prompt_file(path, shapes_grammar=False)
    meta = read_prompt_metadata(path)
    assert meta["two circles"] == {k: v for k, v in GENEVAL[0].items() if k != "prompt"}

    class IncludeCount:  # scores = number of required objects; needs the metadata
        name, uses_metadata, seen = "include_count", True, []

        def __call__(self, images, prompts, metadata):
            self.seen.append(metadata)
            return np.array([sum(r["count"] for r in m["include"]) if m else -1 for m in metadata], np.float32)

    with serve_reward(IncludeCount()) as server:
        weighted = WeightedRewards({"remote": RemoteReward(server.url, "remote")}, {"remote": 1.0})
        weighted.metadata = meta
        total, _ = weighted.score_host(_images(4), prompts + ["a prompt without metadata"])
    np.testing.assert_array_equal(total, [2, 2, 1, -1])
    assert IncludeCount.seen[0][1]["include"][1]["position"] == ["right of", 0] and IncludeCount.seen[0][3] is None


def test_conflicting_metadata_for_one_prompt_is_named(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a", "tag": "x"}) + "\n" + json.dumps({"prompt": "a", "tag": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: prompt 'a' appears again with other metadata"):
        read_prompt_metadata(str(path))
    text = tmp_path / "p.txt"
    text.write_text("a red circle\n")
    assert read_prompt_metadata(str(text)) == {}


class _Loopback(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler):
        super().__init__(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/"
        self.requests = []
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status, body: bytes, ctype):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class FlowFactoryHandler(_Handler):
    """Flow-Factory's reward_server: GET /health, POST /compute {prompt, image [b64 PNG], video, ...} -> {rewards}."""

    def do_GET(self):  # noqa: N802
        self._send(200, b'{"status": "ok"}', "application/json") if self.path == "/health" else self._send(404, b"", "")

    def do_POST(self):  # noqa: N802
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, request))
        if self.path != "/compute":
            return self._send(404, b'{"detail": "not found"}', "application/json")
        images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")) for b in request["image"]]
        rewards = [float(im.mean()) / 255 + len(p) for im, p in zip(images, request["prompt"])]
        self._send(200, json.dumps({"rewards": rewards}).encode(), "application/json")


class FlowGrpoHandler(_Handler):
    """flow_grpo's reward-server (GenEval): POST / with a pickled {images: [JPEG bytes], meta_datas, only_strict};
    pickled reply {scores, rewards, strict_rewards, group_rewards, group_strict_rewards}."""

    def do_POST(self):  # noqa: N802
        request = pickle.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(request)
        n = len(request["images"])
        scores = [float(len(m["include"])) / 2 for m in request["meta_datas"]]
        strict = [0.0 if request["only_strict"] else 1.0] * n
        body = {"scores": scores, "rewards": [0.0] * n, "strict_rewards": strict,
                "group_rewards": {}, "group_strict_rewards": {}}
        self._send(200, pickle.dumps(body), "application/octet-stream")


def test_flow_factory_protocol():
    images = _images(3)
    with _Loopback(FlowFactoryHandler) as server:
        reward = RemoteReward(server.url, "ff", protocol="flow_factory")
        scores = reward(images, ["a", "bb", "ccc"])
        path, request = server.requests[0]
    assert path == "/compute" and request["video"] is None and request["condition_images"] is None
    np.testing.assert_allclose(scores, images.reshape(3, -1).mean(1) / 255 + [1, 2, 3], rtol=1e-6)  # PNG: lossless


def test_flow_grpo_protocol_is_opt_in_and_carries_geneval_metadata(tmp_path):
    with pytest.raises(ValueError, match="runs whatever code the server sends"):
        RemoteReward("http://127.0.0.1:1/", "g", protocol="flow_grpo")
    cfg = mlc.ConfigDict({"remote_url": "http://127.0.0.1:1/", "remote_protocol": "flow_grpo", "timeout_s": 5.0})
    with pytest.raises(ConfigError, match="reward 'remote': .*remote_allow_pickle=True"):
        registry.make_reward("remote", cfg)
    path = _geneval_file(tmp_path)
    meta = read_prompt_metadata(path)
    prompts = [r["prompt"] for r in GENEVAL]
    ramp = np.linspace(0, 255, 16, dtype=np.float64)
    images = np.stack([np.stack([ramp[None, :] + 0 * ramp[:, None], ramp[:, None] + 0 * ramp[None, :],
                                 np.full((16, 16), 40.0 * i)], -1) for i in range(3)]).astype(np.uint8)
    with _Loopback(FlowGrpoHandler) as server:
        cfg.remote_url, cfg.remote_allow_pickle = server.url, True
        cfg.remote_options = mlc.ConfigDict({"only_strict": True})
        weighted = WeightedRewards({"remote": registry.make_reward("remote", cfg)}, {"remote": 1.0})
        weighted.metadata = meta
        total, _ = weighted.score_host(images, prompts)
        strict = RemoteReward(server.url, "g", protocol="flow_grpo", allow_pickle=True, score_key="strict_rewards",
                              options={"only_strict": False})(images, prompts, metadata=[meta[p] for p in prompts])
        request = server.requests[0]
    np.testing.assert_allclose(total, [0.5, 1.0, 0.5])
    np.testing.assert_allclose(strict, [1.0, 1.0, 1.0])
    assert request["only_strict"] is True and request["meta_datas"][1]["tag"] == "position"
    decoded = np.asarray(Image.open(io.BytesIO(request["images"][0])).convert("RGB"), np.float64)
    assert Image.open(io.BytesIO(request["images"][0])).format == "JPEG"
    assert np.abs(decoded - images[0]).mean() < 6  # JPEG: lossy, but the same image


def test_the_default_protocol_never_unpickles(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("pickle.loads called")

    monkeypatch.setattr(pickle, "loads", refuse)

    class Echo:
        name = "echo"

        def __call__(self, images, prompts):
            return np.arange(len(prompts), dtype=np.float32)

    with serve_reward(Echo()) as server:
        np.testing.assert_array_equal(RemoteReward(server.url, "remote")(_images(2), ["a", "b"]), [0, 1])
