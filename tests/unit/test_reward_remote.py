"""RemoteReward <-> serve_reward over loopback HTTP, and every client-side failure as a RewardError."""

import http.server
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from ng_jax.rewards.host import RewardError, WeightedRewards
from ng_jax.rewards.jpeg import JpegCompressibility
from ng_jax.rewards.remote import RemoteReward, serve_reward

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "x"] * 2


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


class PixelPromptReward:
    """Depends on every pixel and on the prompt, so any corruption in transit changes the score."""

    name = "pixel_prompt"

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, images, prompts):
        self.batch_sizes.append(len(prompts))
        weights = np.arange(images[0].size, dtype=np.float64).reshape(images.shape[1:]) % 7
        return ((images * weights).mean(axis=(1, 2, 3)) + [len(p) for p in prompts]).astype(np.float32)


class Failing:
    name = "failing"

    def __call__(self, images, prompts):
        raise KeyError("model weights missing")


def _images(seed=0, b=8):
    return np.random.default_rng(seed).integers(0, 256, size=(b, 6, 5, 3), dtype=np.uint8)


def test_round_trip_equals_direct_call_in_batches():
    reward = PixelPromptReward()
    images = _images()
    with serve_reward(reward, "127.0.0.1", 0) as server:
        direct = reward(images, PROMPTS)
        reward.batch_sizes.clear()
        remote = RemoteReward(server.url, name="pixel_prompt", timeout_s=10, batch_size=3)
        got = remote(images, PROMPTS)
        with urllib.request.urlopen(server.url, timeout=10) as health:
            assert json.loads(health.read()) == {"name": "pixel_prompt"}
    assert reward.batch_sizes == [3, 3, 2]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, direct)


def test_any_reward_can_be_served_and_composed():
    jpeg = JpegCompressibility()
    images = _images(1)
    with serve_reward(jpeg) as server:
        assert server.url.startswith("http://127.0.0.1:")
        weighted = WeightedRewards({"remote": RemoteReward(server.url, name="remote")}, {"remote": 2.0},
                                   timeout_s=10)
        total, parts = weighted.score_host(images, PROMPTS)
        approx = RemoteReward(server.url, name="remote", image_format="jpeg")(images, PROMPTS)
    np.testing.assert_array_equal(parts["remote"], jpeg(images, PROMPTS))
    np.testing.assert_array_equal(total, 2.0 * jpeg(images, PROMPTS))
    assert approx.shape == (8,) and np.all(np.isfinite(approx))


def test_server_reports_a_failing_reward_as_http_500():
    with serve_reward(Failing()) as server:
        with pytest.raises(RewardError, match=r"remote reward 'r' at http://127\.0\.0\.1:\d+/: HTTP 500 .*"
                                              r"raised KeyError: 'model weights missing'"):
            RemoteReward(server.url, name="r")(_images(), PROMPTS)


def test_server_rejects_malformed_requests_with_400():
    with serve_reward(PixelPromptReward()) as server:
        for body, match in ((b"{not json", "malformed JSON request"),
                            (json.dumps({"prompts": ["a"], "images": []}).encode(), "one prompt per image"),
                            (json.dumps({"prompts": ["a"], "images": ["!!"]}).encode(), "image 0: not a base64")):
            request = urllib.request.Request(server.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(request, timeout=10)
            assert info.value.code == 400
            assert match in json.loads(info.value.read())["error"]


class _ScriptedHandler(http.server.BaseHTTPRequestHandler):
    """Answers by path: what a broken or misbehaving reward server might send."""

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        status, body = {
            "/badjson": (200, b"<html>not json"),
            "/short": (200, json.dumps({"scores": [1.0, 2.0]}).encode()),
            "/noscores": (200, json.dumps({"score": [1.0] * 8}).encode()),
            "/nan": (200, b'{"scores": [1, 2, NaN, 4, 5, 6, 7, 8]}'),
            "/error": (503, b"overloaded"),
        }.get(self.path, (200, b""))
        if self.path == "/slow":
            time.sleep(1.0)
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except ConnectionError:  # "/slow": the client has given up already
            pass


@pytest.fixture(scope="module")
def scripted_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ScriptedHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()
    server.server_close()


@pytest.mark.parametrize("path, match", [
    ("/badjson", r"malformed JSON in the reply"),
    ("/short", r"got 2 scores for 8 images; expected one per image"),
    ("/noscores", r'must be an object \{"scores": \[...\]\}'),
    ("/nan", r"1 non-finite value\(s\) .* at batch indices \[2\]"),
    ("/error", r"HTTP 503 .*overloaded"),
])
def test_misbehaving_server_gives_reward_error(scripted_server, path, match):
    with pytest.raises(RewardError, match=match):
        RemoteReward(scripted_server + path, name="scripted", timeout_s=10)(_images(), PROMPTS)


def test_timeout_gives_reward_error(scripted_server):
    with pytest.raises(RewardError, match=r"timed out after 0.2 s"):
        RemoteReward(scripted_server + "/slow", name="scripted", timeout_s=0.2)(_images(), PROMPTS)


def test_connection_refused_gives_reward_error():
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(RewardError, match=r"remote reward 'gone' at http://127\.0\.0\.1:\d+/: connection refused"):
        RemoteReward(f"http://127.0.0.1:{port}/", name="gone", timeout_s=5)(_images(), PROMPTS)


@pytest.mark.parametrize("kwargs, match", [
    (dict(url="ftp://x", name="r"), "http:// or https://"),
    (dict(url="http://x", name=""), "non-empty"),
    (dict(url="http://x", name="r", timeout_s=0), "timeout_s"),
    (dict(url="http://x", name="r", batch_size=0), "batch_size"),
    (dict(url="http://x", name="r", image_format="gif"), "image_format"),
])
def test_bad_client_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RemoteReward(**kwargs)
