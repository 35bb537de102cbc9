"""Rewards served over HTTP + JSON: a client (`RemoteReward`) and a server for any Reward (`serve_reward`).

This mirrors the reward servers of the public RL fine-tuning code bases (a scorer in its own
process or machine, e.g. a large judge on another GPU pool). Standard library + Pillow only.

Wire format (one request scores one batch):

    POST <url>    Content-Type: application/json
    {"prompts": ["a red circle", ...],            # B strings
     "images":  ["iVBORw0KGgo...", ...]}          # B base64 (standard alphabet, padded) encoded
                                                  # PNG or JPEG files, RGB, all of one size
    200 OK        Content-Type: application/json
    {"scores": [0.73, ...]}                       # B finite numbers, in request order

Errors from the server are a non-200 status with `{"error": "<message>"}` (400: malformed
request; 500: the reward failed). `GET <url>` answers `{"name": <reward name>}` (a health check).
Prompts read from a JSONL prompt file carry their other fields as metadata (GenEval's
`evaluation_metadata.jsonl` layout: tag, include, exclude): the request then also holds
`"metadata": [{...} or null, ...]`, one per image, and `serve_reward` hands it to a reward whose
`uses_metadata` is true.

The client also speaks the wire formats of two public code bases' reward servers (`protocol`):

- "flow_factory" (Flow-Factory's `reward_server`): `POST <url>/compute` with JSON `{"prompt": [...],
  "image": [base64 PNG, ...], "video": null, "condition_images": null, "condition_videos": null}`,
  reply `{"rewards": [...]}`; `GET <url>/health` answers `{"status": "ok"}`.
- "flow_grpo" (the reward servers of flow_grpo, e.g. its GenEval and DeQA servers): `POST <url>` with a
  **pickled** dict `{"images": [JPEG bytes, ...], "prompts": [...], "meta_datas": [...]}` plus
  `options` (GenEval: `{"only_strict": true}`); the reply is a pickled dict whose `score_key` list holds
  the scores ("scores" for GenEval's partial credit, "strict_rewards" for its strict score, "outputs"
  for DeQA). **Unpickling a reply runs whatever code the server sends**: this protocol is refused unless
  `allow_pickle=True` (`rewards.remote_allow_pickle`), for servers you control. The default protocol
  never unpickles anything.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import http.server
import io
import json
import pickle
import socket
import sys
import threading
import urllib.error
import urllib.request
from typing import Sequence

import numpy as np
from PIL import Image

from ng_jax.rewards.host import Reward, RewardError, check_reward_output

IMAGE_FORMATS = ("png", "jpeg")
PROTOCOLS = ("ng_jax", "flow_factory", "flow_grpo")
# Refuse request bodies above this size (bytes) on the server.
MAX_REQUEST_BYTES = 256 * 1024 * 1024
# How much of an HTTP error body is quoted in a RewardError.
_QUOTED_BODY_CHARS = 300


def image_file_bytes(image: np.ndarray, image_format: str = "png", quality: int = 95) -> bytes:
    """uint8 [H, W, 3] -> the bytes of a PNG (lossless) or JPEG (`quality`) file."""
    buffer = io.BytesIO()
    pil = Image.fromarray(image, mode="RGB")
    if image_format == "png":
        pil.save(buffer, format="PNG")
    else:
        pil.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encode_image(image: np.ndarray, image_format: str = "png", quality: int = 95) -> str:
    """uint8 [H, W, 3] -> base64 string of a PNG (lossless) or JPEG (`quality`) file."""
    return base64.b64encode(image_file_bytes(image, image_format, quality)).decode("ascii")


def decode_image(data: str) -> np.ndarray:
    """base64 PNG / JPEG -> uint8 [H, W, 3]; ValueError when it is not a decodable image."""
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as pil:
            return np.asarray(pil.convert("RGB"), dtype=np.uint8)
    except (binascii.Error, OSError, TypeError, ValueError) as err:
        raise ValueError(f"not a base64-encoded PNG/JPEG image ({type(err).__name__}: {err})") from err


class RemoteReward:
    """A Reward scored by a server speaking the module's JSON protocol.

    Args:
      url: the endpoint, e.g. "http://scorer:8000/".
      name: the reward's name (as it appears in WeightedRewards and the logs).
      timeout_s: socket timeout per request.
      batch_size: at most this many images per request (None: the whole batch in one request).
      image_format: "png" (lossless, default) or "jpeg" (smaller; the reward sees JPEG artefacts).

    Every failure (connection refused, timeout, HTTP error status, malformed JSON, a wrong
    number of scores, non-finite scores) raises a RewardError naming the reward and the URL.
    Requests go through urllib and honour the usual http_proxy / no_proxy environment variables.
    """

    uses_metadata = True  # WeightedRewards passes the prompts' metadata (None where a prompt has none)

    def __init__(self, url: str, name: str, timeout_s: float = 30, batch_size: int | None = None,
                 image_format: str = "png", protocol: str = "ng_jax", allow_pickle: bool = False,
                 score_key: str = "", options: dict | None = None):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"RemoteReward url must start with http:// or https://, got {url!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"RemoteReward name must be a non-empty string, got {name!r}")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"RemoteReward timeout_s must be a positive number of seconds, got {timeout_s!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"RemoteReward batch_size must be None or a positive integer, got {batch_size!r}")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"RemoteReward image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"RemoteReward protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if protocol == "flow_grpo" and not allow_pickle:
            raise ValueError("the flow_grpo reward-server protocol replies in Python pickle, and unpickling a reply "
                             "runs whatever code the server sends; set rewards.remote_allow_pickle=True only for a "
                             "server you control")
        self.url, self.name, self.protocol = url, name, protocol
        self.timeout_s, self.batch_size, self.image_format = float(timeout_s), batch_size, image_format
        self.score_key = score_key or {"ng_jax": "scores", "flow_factory": "rewards", "flow_grpo": "scores"}[protocol]
        self.options = dict(options or {})

    def __call__(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence | None = None) -> np.ndarray:
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{self.name}: images must be a numpy uint8 array [B, H, W, 3], got "
                             f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: got {len(prompts)} prompts for {images.shape[0]} images; expected one "
                             "per image")
        if metadata is not None and len(metadata) != len(prompts):
            raise ValueError(f"{self.name}: got {len(metadata)} metadata entries for {len(prompts)} prompts")
        meta = list(metadata) if metadata is not None and any(m is not None for m in metadata) else None
        step = self.batch_size or max(1, images.shape[0])
        chunks = [self._score_chunk(images[i:i + step], [str(p) for p in prompts[i:i + step]],
                                    None if meta is None else meta[i:i + step])
                  for i in range(0, images.shape[0], step)]
        return np.concatenate(chunks) if chunks else np.zeros((0,), np.float32)

    def _fail(self, what: str) -> RewardError:
        return RewardError(f"remote reward {self.name!r} at {self.url}: {what}")

    def _request(self, images: np.ndarray, prompts: list[str], metadata: list | None) -> urllib.request.Request:
        """The HTTP request of one chunk in this client's protocol."""
        if self.protocol == "flow_grpo":
            body = {"images": [image_file_bytes(im, "jpeg") for im in images], "prompts": prompts,
                    **({"meta_datas": metadata} if metadata is not None else {}), **self.options}
            return urllib.request.Request(self.url, data=pickle.dumps(body), method="POST",
                                          headers={"Content-Type": "application/octet-stream"})
        encoded = [encode_image(im, self.image_format) for im in images]
        if self.protocol == "flow_factory":
            body, url = {"prompt": prompts, "image": encoded, "video": None, "condition_images": None,
                         "condition_videos": None}, self.url.rstrip("/") + "/compute"
        else:
            body, url = {"prompts": prompts, "images": encoded}, self.url
            if metadata is not None:
                body["metadata"] = metadata
        return urllib.request.Request(url, data=json.dumps({**body, **self.options}).encode("utf-8"), method="POST",
                                      headers={"Content-Type": "application/json"})

    def _reply(self, payload: bytes):
        if self.protocol == "flow_grpo":  # allowed only with allow_pickle (see __init__)
            try:
                return pickle.loads(payload)  # noqa: S301 - opt-in, documented
            except Exception as err:  # noqa: BLE001 - any unpickling failure
                raise self._fail(f"malformed pickle in the reply ({type(err).__name__}: {err})") from err
        try:
            return json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise self._fail(f"malformed JSON in the reply ({err}); got {payload[:_QUOTED_BODY_CHARS]!r}") from err

    def _score_chunk(self, images: np.ndarray, prompts: list[str], metadata: list | None = None) -> np.ndarray:
        request = self._request(images, prompts, metadata)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")[:_QUOTED_BODY_CHARS]
            raise self._fail(f"HTTP {err.code} {err.reason}: {detail}") from err
        except urllib.error.URLError as err:
            reason = err.reason
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise self._fail(f"timed out after {self.timeout_s:g} s") from err
            if isinstance(reason, ConnectionRefusedError):
                raise self._fail("connection refused (is the reward server running?)") from err
            raise self._fail(f"could not connect ({reason})") from err
        except (socket.timeout, TimeoutError) as err:
            raise self._fail(f"timed out after {self.timeout_s:g} s") from err
        except (ConnectionError, http.client.HTTPException) as err:
            raise self._fail(f"connection failed ({type(err).__name__}: {err})") from err
        reply = self._reply(payload)
        key = self.score_key
        if not isinstance(reply, dict) or not isinstance(reply.get(key), (list, tuple, np.ndarray)):
            raise self._fail(f'the reply must be an object {{"{key}": [...]}}, got {str(reply)[:_QUOTED_BODY_CHARS]}')
        scores = [float(x) if isinstance(x, np.generic) else x for x in list(reply[key])]
        if len(scores) != len(prompts):
            raise self._fail(f"got {len(scores)} scores for {len(prompts)} images; expected one per image")
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            raise self._fail(f"scores must be numbers, got {str(scores)[:_QUOTED_BODY_CHARS]}")
        return check_reward_output(self.name, np.asarray(scores, np.float64), len(prompts))


class _RewardHandler(http.server.BaseHTTPRequestHandler):
    reward: Reward  # set on the per-server subclass
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - quiet: the training loop owns the logs
        pass

    def _reply(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 - http.server naming
        self._reply(200, {"name": self.reward.name})

    def do_POST(self):  # noqa: N802
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._reply(411, {"error": "a Content-Length header is required"})
        if not 0 <= length <= MAX_REQUEST_BYTES:
            return self._reply(413, {"error": f"request body of {length} bytes exceeds {MAX_REQUEST_BYTES}"})
        try:
            images, prompts, metadata = _parse_request(self.rfile.read(length))
        except ValueError as err:
            return self._reply(400, {"error": str(err)})
        try:
            if getattr(self.reward, "uses_metadata", False):
                out = self.reward(images, prompts, metadata=metadata or [None] * len(prompts))
            else:
                out = self.reward(images, prompts)
            scores = check_reward_output(self.reward.name, out, len(prompts))
        except RewardError as err:
            return self._reply(500, {"error": str(err)})
        except Exception as err:  # noqa: BLE001 - reported to the client
            return self._reply(500, {"error": f"reward {self.reward.name!r} raised {type(err).__name__}: {err}"})
        self._reply(200, {"scores": [float(s) for s in scores]})


def _parse_request(body: bytes) -> tuple[np.ndarray, list[str], list | None]:
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"malformed JSON request: {err}") from err
    if not isinstance(request, dict):
        raise ValueError('the request must be a JSON object {"prompts": [...], "images": [...]}')
    prompts, images = request.get("prompts"), request.get("images")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError('"prompts" must be a list of strings')
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise ValueError('"images" must be a list of base64 strings')
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images and {len(prompts)} prompts; expected one prompt per image")
    if not images:
        raise ValueError("the request holds no images")
    metadata = request.get("metadata")
    if metadata is not None and (not isinstance(metadata, list) or len(metadata) != len(prompts)
                                 or not all(m is None or isinstance(m, dict) for m in metadata)):
        raise ValueError('"metadata" must be a list of objects (or null), one per prompt')
    decoded = []
    for i, data in enumerate(images):
        try:
            decoded.append(decode_image(data))
        except ValueError as err:
            raise ValueError(f"image {i}: {err}") from err
    shapes = {im.shape for im in decoded}
    if len(shapes) != 1:
        raise ValueError(f"all images must have one size, got shapes {sorted(shapes)}")
    return np.stack(decoded), prompts, metadata


class RewardServer(http.server.ThreadingHTTPServer):
    """A ThreadingHTTPServer serving one Reward from a daemon thread; `url`, `close()`, context manager."""

    daemon_threads = True

    def __init__(self, reward: Reward, host: str, port: int):
        handler = type("BoundRewardHandler", (_RewardHandler,), {"reward": reward})
        super().__init__((host, port), handler)
        bound_host, bound_port = self.server_address[:2]
        self.url = f"http://{bound_host}:{bound_port}/"
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"reward-server-{reward.name}", daemon=True)
        self._thread.start()

    def handle_error(self, request, client_address) -> None:
        """A client that hung up (e.g. after its timeout) is not an error of the server."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def close(self) -> None:
        """Stops serving, joins the thread and closes the socket."""
        self.shutdown()
        self._thread.join()
        self.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def serve_reward(reward: Reward, host: str = "127.0.0.1", port: int = 0) -> RewardServer:
    """Serves `reward` over HTTP on (host, port) from a background thread; port 0 picks a free port.

    Returns the running server (`server.url`; stop it with `server.close()` or a `with` block).
    The reward must be thread-safe: each request runs in its own thread. The default host is the
    loopback interface; bind to "0.0.0.0" deliberately to accept other machines (no
    authentication is provided).
    """
    if not callable(reward) or not isinstance(getattr(reward, "name", None), str):
        raise ValueError(f"serve_reward needs a Reward (a callable with a str `name`), got {type(reward).__name__}")
    return RewardServer(reward, host, port)
