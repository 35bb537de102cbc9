"""CLIP-based rewards on the host: CLIP score, PickScore and HPSv2, from local weights.

Each is `scale * cosine(image embedding, text embedding)` of a CLIP model stored as a transformers
`CLIPModel` directory (config.json with model_type "clip"; model.safetensors, a sharded set, or
pytorch_model.bin with torch; tokenizer files; optionally preprocessor_config.json):

- `ClipScore` ("clip_score"): scale 100, as torchmetrics' CLIPScore (default model
  openai/clip-vit-large-patch14). torchmetrics clamps the batch mean at 0; a per-image reward
  keeps the sign (a clamp would hide differences between bad images).
- `PickScore` ("pickscore"): scale `logit_scale.exp()` (~100), as the PickScore reference code
  (yuvalkirstain/PickScore_v1, CLIP-H/14). That repo ships no tokenizer: pass `tokenizer_dir` =
  laion/CLIP-ViT-H-14-laion2B-s32B-b79K, whose processor the reference uses.
- `HPSv2` ("hpsv2"): scale 1. HPSv2 (tgxs002/HPSv2 img_score.py) scores
  `diag(image_features @ text_features.T)` of open_clip's L2-normalised features: the raw cosine
  (~0.2-0.35), not x100. Its checkpoints (HPS_v2[.1]_compressed.pt) are open_clip ViT-H-14 state
  dicts: `python -m ng_jax.rewards.open_clip_convert CKPT --tokenizer CLIP_H_DIR --out DIR` converts one once
  into a CLIPModel directory (ng_jax/rewards/open_clip_convert.py: every key mapped, every shape checked).

Preprocessing (`preprocess_images`, numpy + PIL) is CLIP's: shorter side to `image_size` (PIL
bicubic, long side truncated), centre crop, /255, CLIP mean/std (or preprocessor_config.json's).
transformers' CLIPImageProcessor (CLIP score, PickScore) crops at floor((H - S) / 2), torchvision's
CenterCrop (open_clip, HPSv2) at round((H - S) / 2): `crop_rounding`. Prompts are truncated to
77 tokens; the text feature is the causal transformer's state at EOS, so padding never matters.

Where the forward runs: the Reward protocol forbids JAX on the run's devices (a jax computation
inside the rollout's host callback deadlocks a multi-device CPU backend). `backend="torch"` runs
transformers' torch CLIPModel on `device` ("cpu"; "cuda" only if JAX leaves it memory);
`backend="numpy"` runs this module's float32 numpy forward (`numpy_image_embeds`,
`numpy_text_embeds`, tested against torch): numpy/scipy only, any host (CPU-only runs, TPU VMs),
thread-safe. "auto" (default) takes torch when importable (faster), else numpy. Text features
are cached per prompt (RL scores a group of images per prompt).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from ng_jax.rewards.clip_weights import (ClipWeightsError, check_clip_tensors, clip_tensor_shapes, read_clip_config,
                                         read_clip_tensors)

__all__ = ["ClipScore", "PickScore", "HPSv2", "ClipSimilarityReward", "ClipWeightsError", "preprocess_images"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ------------------------------------------------------------------------------------ preprocessing


def preprocess_images(images: np.ndarray, size: int, mean=CLIP_MEAN, std=CLIP_STD, crop_rounding: str = "floor",
                      resize: int | None = None) -> np.ndarray:
    """uint8 [B, H, W, 3] -> float32 [B, size, size, 3], normalised CLIP input (see module docstring);
    the shorter side is resized to `resize` (default: `size`) before the centre crop."""
    if crop_rounding not in ("floor", "round"):
        raise ValueError(f"crop_rounding must be 'floor' (transformers) or 'round' (torchvision), "
                         f"got {crop_rounding!r}")
    out = np.empty((images.shape[0], size, size, 3), np.float32)
    resize = resize or size
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(resize * long / short)
        nh, nw = (resize, new_long) if h <= w else (new_long, resize)
        pil = Image.fromarray(np.ascontiguousarray(image))
        if (nh, nw) != (h, w):
            pil = pil.resize((nw, nh), resample=Image.BICUBIC)
        x = np.asarray(pil)
        offset = (lambda m: m // 2) if crop_rounding == "floor" else (lambda m: int(round(m / 2.0)))
        top, left = offset(nh - size), offset(nw - size)
        out[i] = x[top:top + size, left:left + size]
    return (out / np.float32(255.0) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


# ------------------------------------------------------------------------------------ numpy forward


def _layer_norm(x, w, b, eps, xp=np):
    mu = x.mean(-1, keepdims=True)
    var = xp.square(x - mu).mean(-1, keepdims=True)
    return (x - mu) / xp.sqrt(var + eps) * w + b


def _linear(x, kernel, bias):
    """x [..., in] @ kernel [in, out] + bias as one 2-D GEMM (numpy loops over leading axes otherwise)."""
    return (x.reshape(-1, x.shape[-1]) @ kernel).reshape(*x.shape[:-1], kernel.shape[1]) + bias


def _activation(name: str, xp=np):
    if xp is np:
        from scipy.special import erf, expit
    else:  # jax.numpy: the same functions, traceable
        from jax.nn import sigmoid as expit
        from jax.scipy.special import erf
    if name == "quick_gelu":
        return lambda x: x * expit(np.float32(1.702) * x)
    if name == "gelu":
        return lambda x: np.float32(0.5) * x * (np.float32(1.0) + erf(x / np.float32(np.sqrt(2.0))))
    raise ClipWeightsError(f"CLIP hidden_act {name!r} is not supported by the numpy forward (quick_gelu, gelu)")


def _encoder(x, w, tower: str, c, causal: bool, xp=np):
    """transformers CLIPEncoder (pre-LN blocks) in numpy (or jax.numpy); w holds Linear weights as [in, out]."""
    b, n, d = x.shape
    heads, act = c.num_attention_heads, _activation(c.hidden_act, xp)
    dh = d // heads
    mask = np.triu(np.full((n, n), -np.inf, np.float32), 1) if causal else np.float32(0.0)
    for i in range(c.num_hidden_layers):
        p = f"{tower}.encoder.layers.{i}."
        lin = lambda h, name: _linear(h, w[f"{p}{name}.weight"], w[f"{p}{name}.bias"])  # noqa: E731
        h = _layer_norm(x, w[p + "layer_norm1.weight"], w[p + "layer_norm1.bias"], c.layer_norm_eps, xp)
        q, k, v = (lin(h, f"self_attn.{m}").reshape(b, n, heads, dh).transpose(0, 2, 1, 3)
                   for m in ("q_proj", "k_proj", "v_proj"))
        s = (q * np.float32(dh ** -0.5)) @ k.transpose(0, 1, 3, 2) + mask
        s = xp.exp(s - s.max(-1, keepdims=True))
        o = ((s / s.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
        x = x + lin(o, "self_attn.out_proj")
        h = _layer_norm(x, w[p + "layer_norm2.weight"], w[p + "layer_norm2.bias"], c.layer_norm_eps, xp)
        x = x + lin(act(lin(h, "mlp.fc1")), "mlp.fc2")
    return x


def numpy_weights(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Checkpoint tensors -> the numpy forward's layout (Linear weights transposed to [in, out])."""
    out = {}
    for k, v in tensors.items():
        v = np.asarray(v, np.float32)
        if k.endswith("patch_embedding.weight"):
            v = v.reshape(v.shape[0], -1).T
        elif v.ndim == 2 and k.endswith(".weight") and "embedding" not in k:
            v = v.T
        out[k] = np.array(v, np.float32, order="C")
    return out


def numpy_image_embeds(w, config, pixels, xp=np):
    """CLIPModel.get_image_features in numpy (`xp=jax.numpy`: traceable, for the device placement): pixels
    float32 [B, S, S, 3] -> [B, projection_dim]."""
    c = config.vision_config
    b, s, p = pixels.shape[0], c.image_size, c.patch_size
    g = s // p
    patches = pixels.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 5, 2, 4).reshape(b * g * g, 3 * p * p)
    x = (patches @ w["vision_model.embeddings.patch_embedding.weight"]).reshape(b, g * g, c.hidden_size)
    cls = xp.broadcast_to(w["vision_model.embeddings.class_embedding"], (b, 1, c.hidden_size))
    x = xp.concatenate([cls, x], axis=1) + w["vision_model.embeddings.position_embedding.weight"]
    x = _layer_norm(x, w["vision_model.pre_layrnorm.weight"], w["vision_model.pre_layrnorm.bias"], c.layer_norm_eps,
                    xp)
    x = _encoder(x, w, "vision_model", c, causal=False, xp=xp)[:, 0]
    x = _layer_norm(x, w["vision_model.post_layernorm.weight"], w["vision_model.post_layernorm.bias"],
                    c.layer_norm_eps, xp)
    return x @ w["visual_projection.weight"]


def numpy_text_embeds(w, config, ids: np.ndarray) -> np.ndarray:
    """CLIPModel.get_text_features in numpy: int ids [B, L] -> [B, projection_dim] (pooled at EOS)."""
    c = config.text_config
    x = w["text_model.embeddings.token_embedding.weight"][ids]
    x = x + w["text_model.embeddings.position_embedding.weight"][: ids.shape[1]]
    x = _encoder(x, w, "text_model", c, causal=True)
    x = _layer_norm(x, w["text_model.final_layer_norm.weight"], w["text_model.final_layer_norm.bias"],
                    c.layer_norm_eps)
    # transformers: eos_token_id == 2 is the legacy config (pool at the highest id, the EOS of CLIP's vocabulary)
    eos = ids.argmax(-1) if c.eos_token_id == 2 else (ids == c.eos_token_id).argmax(-1)
    return x[np.arange(ids.shape[0]), eos] @ w["text_projection.weight"]


PIL_BITS = 22   # Pillow's fixed-point precision for 8-bit resampling (32 - 8 - 2)


def _pil_bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel (Keys, a = -0.5), support 2."""
    x = np.abs(x)
    a = -0.5
    return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
                    np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0))


def pil_bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """int64 [out_size, in_size]: the fixed-point taps with which Pillow's `resize(..., BICUBIC)` computes each
    output pixel of an 8-bit image along one axis (antialiased: the kernel widens by the downscale factor),
    so that `clip((taps @ row + 2^21) >> 22, 0, 255)` is Pillow's output to the bit."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    taps = np.zeros((out_size, in_size), np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = _pil_bicubic((np.arange(lo, hi) - center + 0.5) / filterscale)
        w = w / w.sum() if w.sum() != 0.0 else w
        taps[xx, lo:hi] = np.where(w < 0, np.trunc(-0.5 + w * (1 << PIL_BITS)), np.trunc(0.5 + w * (1 << PIL_BITS)))
    return taps


def _pil_pass(levels, taps: np.ndarray, axis: int):
    """One of Pillow's two resampling passes on int32 levels [B, H, W, C] along `axis` (1: rows, 2: columns)."""
    import jax.numpy as jnp

    t = jnp.asarray(taps, jnp.int32)
    spec = "bhwc,oh->bowc" if axis == 1 else "bhwc,ow->bhoc"
    acc = jnp.einsum(spec, levels, t, preferred_element_type=jnp.int32) + (1 << (PIL_BITS - 1))
    return jnp.clip(acc >> PIL_BITS, 0, 255)


def device_pixels(images, size: int, mean=CLIP_MEAN, std=CLIP_STD, crop_rounding: str = "floor",
                  resize: int | None = None):
    """Traceable CLIP preprocessing of float images in [-1, 1] [B, H, W, 3], the host path's
    (`preprocess_images`) to the bit: quantised to the uint8 levels the host path sees (`sampling.to_uint8`),
    the shorter side resized to `resize` (default `size`) as Pillow's bicubic resize does it (fixed-point
    taps, horizontal pass then vertical, uint8 in between), centre-cropped to `size`, /255, mean/std.
    Exact for square images (what the generators produce); for some portrait images Pillow 13 runs the
    vertical pass first, and a few pixels may then differ by one level."""
    import jax.numpy as jnp

    resize = resize or size
    h, w = images.shape[1:3]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(resize * long / short)
    nh, nw = (resize, new_long) if h <= w else (new_long, resize)
    levels = jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0.0, 255.0).astype(jnp.int32)
    if nw != w:
        levels = _pil_pass(levels, pil_bicubic_weights(w, nw), axis=2)
    if nh != h:
        levels = _pil_pass(levels, pil_bicubic_weights(h, nh), axis=1)
    offset = (lambda m: m // 2) if crop_rounding == "floor" else (lambda m: int(round(m / 2.0)))
    top, left = offset(nh - size), offset(nw - size)
    levels = levels[:, top:top + size, left:left + size].astype(jnp.float32)
    return (levels / 255.0 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# ------------------------------------------------------------------------------------------ rewards


class ClipSimilarityReward:
    """`scale * cosine(image, prompt)` of a CLIP model: uint8 [B, H, W, 3] + B prompts -> float32 [B].

    scale: a number, or "logit_scale" for the checkpoint's `logit_scale.exp()`.
    backend: "auto" | "torch" | "numpy" (module docstring); device: the torch device.
    """

    name = "clip_similarity"

    def __init__(self, weights_dir: str, *, scale: float | str = 100.0, backend: str = "auto", device: str = "cpu",
                 tokenizer_dir: str | None = None, crop_rounding: str = "floor", batch_size: int = 16,
                 name: str | None = None, max_cached_prompts: int = 65536):
        from transformers import AutoTokenizer

        if backend == "auto":
            import importlib.util

            backend = "torch" if importlib.util.find_spec("torch") is not None else "numpy"
        if backend not in ("torch", "numpy"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'numpy', got {backend!r}")
        self.name = name or self.name
        self.backend, self.batch_size, self.crop_rounding = backend, int(batch_size), crop_rounding
        self.config, self._weights_dir = read_clip_config(weights_dir), weights_dir
        check_clip_tensors(clip_tensor_shapes(weights_dir), self.config, weights_dir)
        self.logit_scale = float(np.exp(read_clip_tensors(weights_dir, ["logit_scale"])["logit_scale"]))
        self.scale = self.logit_scale if scale == "logit_scale" else float(scale)
        tok_dir = tokenizer_dir or weights_dir
        if not any(os.path.isfile(os.path.join(tok_dir, f)) for f in ("tokenizer.json", "vocab.json")):
            raise ClipWeightsError(f"{tok_dir}: no CLIP tokenizer (tokenizer.json or vocab.json + merges.txt); "
                                   "pass tokenizer_dir")
        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        self.image_size, self.resize, self.mean, self.std = self._preprocessing(weights_dir, tok_dir)
        if backend == "numpy":
            self._w = numpy_weights(read_clip_tensors(weights_dir))
        else:
            import torch
            from transformers import CLIPModel

            self._torch = torch
            self._model = CLIPModel.from_pretrained(weights_dir, dtype=torch.float32).eval().to(device)
            self._device = device
        self._lock = threading.Lock()
        self._text_cache: dict[str, np.ndarray] = {}
        self.max_cached_prompts = int(max_cached_prompts)

    def _preprocessing(self, *directories: str):
        """(crop size, resize, mean, std): the first preprocessor_config.json found (weights, tokenizer dir)."""
        size, mean, std = self.config.vision_config.image_size, CLIP_MEAN, CLIP_STD
        resize = size
        found = [p for p in (os.path.join(d, "preprocessor_config.json") for d in directories) if os.path.isfile(p)]
        if found:
            path = found[0]
            with open(path) as f:
                pre = json.load(f)
            mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
            crop = pre.get("crop_size", size)
            crop = crop.get("height", size) if isinstance(crop, dict) else crop
            resize = pre.get("size", {}).get("shortest_edge", size) if isinstance(pre.get("size"), dict) else size
            if crop != size:
                raise ClipWeightsError(f"{path}: crop size {crop} differs from the model's image_size {size}")
        return size, int(resize), tuple(mean), tuple(std)

    # -- features (L2-normalised) -----------------------------------------------------------------

    def image_features(self, images: np.ndarray) -> np.ndarray:
        feats = []
        for i in range(0, images.shape[0], self.batch_size):
            pixels = preprocess_images(images[i:i + self.batch_size], self.image_size, self.mean, self.std,
                                       self.crop_rounding, self.resize)
            if self.backend == "numpy":
                feats.append(numpy_image_embeds(self._w, self.config, pixels))
            else:
                x = self._torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()).to(self._device)
                with self._torch.no_grad():
                    feats.append(self._model.get_image_features(pixel_values=x).float().cpu().numpy())
        f = np.concatenate(feats).astype(np.float32)
        return f / np.linalg.norm(f, axis=-1, keepdims=True)

    def text_features(self, prompts: Sequence[str]) -> np.ndarray:
        with self._lock:  # also serialises the tokenizer: fast tokenizers are not thread-safe
            feats = {p: self._text_cache[p] for p in prompts if p in self._text_cache}
            todo = [p for p in dict.fromkeys(prompts) if p not in feats]
            if todo:
                length = self.config.text_config.max_position_embeddings
                ids = self.tokenizer(todo, padding="longest", truncation=True, max_length=length)["input_ids"]
                ids = np.asarray(ids)
        if todo:
            if self.backend == "numpy":
                f = numpy_text_embeds(self._w, self.config, ids)
            else:
                with self._torch.no_grad():
                    f = self._model.get_text_features(input_ids=self._torch.from_numpy(ids).to(self._device))
                f = f.float().cpu().numpy()
            feats.update(zip(todo, (f / np.linalg.norm(f, axis=-1, keepdims=True)).astype(np.float32)))
            with self._lock:
                if len(self._text_cache) + len(todo) > self.max_cached_prompts:
                    self._text_cache.clear()  # bounded memory; RL prompt sets are usually far smaller
                self._text_cache.update((p, feats[p]) for p in todo)
        return np.stack([feats[p] for p in prompts])

    def device_fn(self):
        """`(images float [B, S, S, 3] in [-1, 1], text features [B, D]) -> rewards [B]`, a jittable JAX
        function of the image tower (weights captured as constants of the jit), for rewards computed on the
        devices: equal to this reward's host path on the same images (see `device_pixels`); the text
        features come from `text_features` on the host."""
        import jax.numpy as jnp

        if not hasattr(self, "_w"):
            self._w = numpy_weights(read_clip_tensors(self._weights_dir))
        w = {k: jnp.asarray(v) for k, v in self._w.items() if k.startswith(("vision_model.", "visual_projection."))}
        config, size, mean, std, scale = self.config, self.image_size, self.mean, self.std, self.scale
        crop_rounding, resize = self.crop_rounding, self.resize

        def rewards(images, text_feats):
            pixels = device_pixels(images, size, mean, std, crop_rounding, resize)
            f = numpy_image_embeds(w, config, pixels, xp=jnp)
            f = f / jnp.linalg.norm(f, axis=-1, keepdims=True)
            return scale * jnp.sum(f * text_feats, axis=-1)
        return rewards

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{self.name}: images must be a numpy uint8 array [B, H, W, 3], got "
                             f"{type(images).__name__} {getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}")
        if isinstance(prompts, str) or len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: expected one prompt per image ({images.shape[0]})")
        if images.shape[0] == 0:
            return np.zeros((0,), np.float32)
        cos = np.sum(self.image_features(images) * self.text_features([str(p) for p in prompts]), axis=-1)
        return (self.scale * cos).astype(np.float32)


class ClipScore(ClipSimilarityReward):
    """torchmetrics' CLIPScore per image: 100 * cosine (no clamp at 0; see the module docstring)."""

    name = "clip_score"

    def __init__(self, weights_dir: str, **kwargs):
        super().__init__(weights_dir, **{"scale": 100.0, **kwargs})


class PickScore(ClipSimilarityReward):
    """PickScore: logit_scale.exp() * cosine of the PickScore_v1 CLIP-H model."""

    name = "pickscore"

    def __init__(self, weights_dir: str, **kwargs):
        super().__init__(weights_dir, **{"scale": "logit_scale", **kwargs})


class HPSv2(ClipSimilarityReward):
    """HPSv2 / v2.1: cosine (x1) of the converted open_clip ViT-H-14, open_clip's centre crop."""

    name = "hpsv2"

    def __init__(self, weights_dir: str, **kwargs):
        super().__init__(weights_dir, **{"scale": 1.0, "crop_rounding": "round", **kwargs})
