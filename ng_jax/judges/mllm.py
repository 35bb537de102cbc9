"""A multimodal-LLM image judge over an OpenAI-compatible chat-completions endpoint.

Quality beyond the reward, for real runs: a vision-language model served by vLLM or sglang
(`POST <base_url>/chat/completions`, the OpenAI wire format) scores each image on a rubric. The
judge is not a reward: it is only used by the analyses (`ng_jax.eval.analyze judge`).

Request (one image per request, temperature 0):

    {"model": MODEL, "temperature": 0, "max_tokens": 96,
     "messages": [{"role": "system", "content": RUBRIC},
                  {"role": "user", "content": [
                      {"type": "text", "text": "Prompt: <prompt>. Rate the image."},
                      {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}]}

Reply: `choices[0].message.content`, parsed by `parse_score` into a number on the rubric's scale
(JSON `{"score": 7}`, "Score: 7/10", "7.5 out of 10", "**8**", ...). A reply without a usable
number (a refusal, an empty or malformed reply, a number off the scale) is recorded as missing
(NaN) and counted; transport failures (connection, HTTP status, malformed JSON envelope) raise
`JudgeError`, because a silently missing judge would read as a bad model.
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.request
from typing import Sequence

import numpy as np

from ng_jax.errors import UserError
from ng_jax.rewards.remote import encode_image

SCALE = (0.0, 10.0)
RUBRICS = {
    "quality": ("You are a strict judge of image quality. Rate the technical quality of the image: sharpness, "
                "clean edges, absence of noise, blotches and artifacts. Ignore whether it matches the prompt. "
                "Answer with JSON {\"score\": S} where S is a number from 0 (unusable) to 10 (flawless)."),
    "realism": ("You are a strict judge of realism. Rate how plausible the image is as a genuine image of its "
                "kind (a clean rendering, or a photograph), with coherent shapes and lighting. Answer with JSON "
                "{\"score\": S} where S is a number from 0 (implausible) to 10 (indistinguishable from real)."),
}
_REFUSAL = re.compile(r"\b(i\s*(?:can(?:'|no)?t|cannot|am unable|won't|will not)|unable to|as an ai|"
                      r"i'm sorry|i am sorry|not able to)\b", re.IGNORECASE)
_PATTERNS = (
    re.compile(r"\"?score\"?\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE),
    re.compile(r"(-?\d+(?:\.\d+)?)\s*\**\s*(?:/|out of)\s*10\b", re.IGNORECASE),
    re.compile(r"\brating\s*(?:is|of)?\s*[:=]?\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE),
)


class JudgeError(UserError, RuntimeError):
    """The judge endpoint could not be used (not: the judge declined to score one image)."""


def parse_score(text: str | None, scale: tuple[float, float] = SCALE) -> float | None:
    """The score in a judge's reply, or None when there is no usable one.

    Tries, in order: a JSON object with a numeric "score"; "score: S" / "S/10" / "S out of 10" /
    "rating: S" anywhere in the text; a reply that is a bare number. A reply that reads as a
    refusal and has none of these is None; a number outside `scale` is None (not clipped).
    """
    if not isinstance(text, str) or not text.strip():
        return None
    body = text.strip()
    fenced = re.search(r"\{.*?\}", body, re.DOTALL)
    candidates: list[float] = []
    if fenced:
        try:
            obj = json.loads(fenced.group(0))
            if isinstance(obj, dict) and isinstance(obj.get("score"), (int, float)) and not isinstance(
                    obj.get("score"), bool):
                candidates.append(float(obj["score"]))
        except json.JSONDecodeError:
            pass
    if not candidates:
        for pattern in _PATTERNS:
            m = pattern.search(body)
            if m:
                candidates.append(float(m.group(1)))
                break
    if not candidates:
        bare = re.fullmatch(r"\**\s*(-?\d+(?:\.\d+)?)\s*\**\.?", body)
        if bare:
            candidates.append(float(bare.group(1)))
    if not candidates:
        return None  # refusals land here too
    score = candidates[0]
    if not math.isfinite(score) or not scale[0] <= score <= scale[1]:
        return None
    return score


def is_refusal(text: str | None) -> bool:
    return isinstance(text, str) and bool(_REFUSAL.search(text)) and parse_score(text) is None


class MLLMJudge:
    """Scores images with a chat-completions vision model.

    Args:
      base_url: e.g. "http://localhost:8000/v1" (the request goes to base_url + "/chat/completions").
      model: the served model's name. rubric: a key of RUBRICS or a full system prompt.
      timeout_s: per request. api_key: sent as a Bearer token when given.
    """

    def __init__(self, base_url: str, model: str, *, rubric: str = "quality", timeout_s: float = 60.0,
                 api_key: str | None = None, max_tokens: int = 96):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"MLLMJudge: base_url must start with http:// or https://, got {base_url!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout_s, self.api_key, self.max_tokens = model, float(timeout_s), api_key, int(max_tokens)
        self.rubric_name = rubric if rubric in RUBRICS else "custom"
        self.system = RUBRICS.get(rubric, rubric)

    def request_body(self, image: np.ndarray, prompt: str) -> dict:
        data_url = "data:image/png;base64," + encode_image(np.asarray(image, np.uint8))
        return {"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                "messages": [{"role": "system", "content": self.system},
                             {"role": "user", "content": [
                                 {"type": "text", "text": f"Prompt: {prompt}. Rate the image."},
                                 {"type": "image_url", "image_url": {"url": data_url}}]}]}

    def ask(self, image: np.ndarray, prompt: str) -> str:
        """The raw reply text for one image (JudgeError on transport or envelope problems)."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(self.request_body(image, prompt)).encode(),
                                     headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            body = err.read()[:300].decode("utf-8", "replace")
            raise JudgeError(f"MLLM judge {self.url}: HTTP {err.code}: {body}") from None
        except (urllib.error.URLError, OSError) as err:
            raise JudgeError(f"MLLM judge {self.url}: {getattr(err, 'reason', err)}") from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise JudgeError(f"MLLM judge {self.url}: not a chat-completions reply: {raw[:200]!r}") from None
        if isinstance(content, list):  # some servers return content parts
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else ""

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> dict:
        """Scores on [0, 1] (rubric score / 10; NaN where the reply had none) and reply statistics."""
        if len(images) != len(prompts):
            raise ValueError(f"MLLMJudge.score: {len(images)} images but {len(prompts)} prompts")
        scores, refused, unparsed = [], 0, 0
        for image, prompt in zip(images, prompts):
            reply = self.ask(image, prompt)
            s = parse_score(reply)
            if s is None:
                refused += is_refusal(reply)
                unparsed += not is_refusal(reply)
                scores.append(float("nan"))
            else:
                scores.append(s / SCALE[1])
        arr = np.asarray(scores, np.float32)
        valid = arr[np.isfinite(arr)]
        return {"rubric": self.rubric_name, "scores": arr, "mean": float(valid.mean()) if valid.size else None,
                "scored": int(valid.size), "refused": int(refused), "unparsed": int(unparsed)}
