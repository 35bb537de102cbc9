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
  dicts: `python -m ng_jax.rewards.clip CKPT --tokenizer CLIP_H_DIR --out DIR` converts one once
  into a CLIPModel directory (`convert_open_clip_checkpoint`: every key mapped, every shape checked).

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

__all__ = ["ClipScore", "PickScore", "HPSv2", "ClipSimilarityReward", "ClipWeightsError", "preprocess_images",
           "convert_open_clip_checkpoint", "open_clip_to_transformers", "OPEN_CLIP_VIT_H_14"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OPEN_CLIP_VIT_H_14 = {  # open_clip ViT-H-14 (HPSv2 / PickScore backbone) as a transformers CLIPConfig
    "projection_dim": 1024,
    "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                    "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
                    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1, "projection_dim": 1024},
    "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                      "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "hidden_act": "gelu",
                      "layer_norm_eps": 1e-5, "projection_dim": 1024},
}
_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


class ClipWeightsError(ValueError):
    """A CLIP weights directory or checkpoint that cannot be used (missing, wrong kind, keys, shapes)."""


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


# ---------------------------------------------------------------------------------- weights on disk


def expected_clip_shapes(config) -> dict[str, tuple]:
    """Every tensor of a transformers CLIPModel checkpoint and its shape, from a CLIPConfig."""
    t, v, e = config.text_config, config.vision_config, config.projection_dim
    shapes = {"logit_scale": (), "text_projection.weight": (e, t.hidden_size),
              "visual_projection.weight": (e, v.hidden_size),
              "text_model.embeddings.token_embedding.weight": (t.vocab_size, t.hidden_size),
              "text_model.embeddings.position_embedding.weight": (t.max_position_embeddings, t.hidden_size),
              "vision_model.embeddings.class_embedding": (v.hidden_size,),
              "vision_model.embeddings.patch_embedding.weight": (v.hidden_size, 3, v.patch_size, v.patch_size),
              "vision_model.embeddings.position_embedding.weight": ((v.image_size // v.patch_size) ** 2 + 1,
                                                                    v.hidden_size)}
    for tower, c, norms in (("text_model", t, ("final_layer_norm",)),
                            ("vision_model", v, ("pre_layrnorm", "post_layernorm"))):
        d, f = c.hidden_size, c.intermediate_size
        for n in norms:
            shapes.update({f"{tower}.{n}.weight": (d,), f"{tower}.{n}.bias": (d,)})
        for i in range(c.num_hidden_layers):
            p = f"{tower}.encoder.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes.update({f"{p}self_attn.{proj}.weight": (d, d), f"{p}self_attn.{proj}.bias": (d,)})
            for n in ("layer_norm1", "layer_norm2"):
                shapes.update({f"{p}{n}.weight": (d,), f"{p}{n}.bias": (d,)})
            shapes.update({f"{p}mlp.fc1.weight": (f, d), f"{p}mlp.fc1.bias": (f,),
                           f"{p}mlp.fc2.weight": (d, f), f"{p}mlp.fc2.bias": (d,)})
    return shapes


def check_clip_tensors(tensors: Mapping[str, tuple | np.ndarray], config, where: str) -> None:
    """Raise ClipWeightsError naming missing, unexpected and mis-shaped tensors."""
    want = expected_clip_shapes(config)
    got = {k: tuple(np.shape(x)) if not isinstance(x, tuple) else x for k, x in tensors.items()}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(k for k in set(got) - set(want) if k not in _BUFFERS)
    shaped = sorted(f"{k}: {got[k]} (config wants {want[k]})" for k in set(want) & set(got) if got[k] != want[k])
    problems = [f"{len(x)} {label}: {x[:8]}{' ...' if len(x) > 8 else ''}" for label, x in
                (("missing tensors", missing), ("unexpected tensors", unexpected), ("mis-shaped", shaped)) if x]
    if problems:
        raise ClipWeightsError(f"{where} does not hold the CLIPModel its config describes: " + "; ".join(problems))


def read_clip_config(directory: str):
    from transformers import CLIPConfig

    if os.path.isfile(directory):
        raise ClipWeightsError(f"{directory} is a file; expected a transformers CLIPModel directory (an open_clip "
                               "checkpoint such as HPS_v2.1_compressed.pt must first be converted with "
                               "`python -m ng_jax.rewards.clip CHECKPOINT --tokenizer DIR --out DIR`)")
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ClipWeightsError(f"CLIP weights directory {directory}: no config.json (missing directory or not a "
                               "transformers CLIPModel save_pretrained directory)")
    with open(path) as f:
        raw = json.load(f)
    if raw.get("model_type") != "clip":
        raise ClipWeightsError(f"{directory}: config.json has model_type {raw.get('model_type')!r}; a CLIP reward "
                               "needs a full two-tower CLIPModel (model_type 'clip')")
    return CLIPConfig.from_dict(raw)


def _safetensors_files(directory: str) -> list[str]:
    names = sorted(os.listdir(directory))
    index = [n for n in names if n.endswith(".safetensors.index.json")]
    if index:
        with open(os.path.join(directory, index[0])) as f:
            return [os.path.join(directory, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
    files = [n for n in names if n.endswith(".safetensors")]
    if len(files) > 1:
        raise ClipWeightsError(f"{directory}: several unindexed safetensors files {files}; keep exactly one")
    if not files and "pytorch_model.bin" not in names:
        raise ClipWeightsError(f"{directory}: no model.safetensors (or sharded set, or pytorch_model.bin)")
    return [os.path.join(directory, n) for n in files]


def read_clip_tensors(directory: str, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """float32 numpy tensors (all, or `keys`) of model.safetensors / a sharded set / pytorch_model.bin
    (the last needs torch)."""
    from safetensors import safe_open

    files, out = _safetensors_files(directory), {}
    for path in files:
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():
                if keys is None or key in keys:
                    out[key] = np.asarray(f.get_tensor(key), np.float32)
    if not files:
        state = _torch_load(os.path.join(directory, "pytorch_model.bin"))
        out = {k: v.float().numpy() for k, v in state.items() if keys is None or k in keys}
    return out


def clip_tensor_shapes(directory: str) -> dict[str, tuple]:
    """Tensor shapes from the safetensors headers (nothing is read), or from pytorch_model.bin."""
    from safetensors import safe_open

    files, out = _safetensors_files(directory), {}
    for path in files:
        with safe_open(path, framework="numpy") as f:
            out.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return out if files else {k: v.shape for k, v in read_clip_tensors(directory).items()}


def _torch_load(path: str) -> dict:
    try:
        import torch
    except ImportError:
        raise ClipWeightsError(f"reading {path} needs torch; convert it to safetensors elsewhere") from None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj.get("state_dict", obj) if isinstance(obj, dict) else obj


# ------------------------------------------------------------------------------------ numpy forward


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = np.square(x - mu).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _linear(x, kernel, bias):
    """x [..., in] @ kernel [in, out] + bias as one 2-D GEMM (numpy loops over leading axes otherwise)."""
    return (x.reshape(-1, x.shape[-1]) @ kernel).reshape(*x.shape[:-1], kernel.shape[1]) + bias


def _activation(name: str):
    from scipy.special import erf, expit

    if name == "quick_gelu":
        return lambda x: x * expit(np.float32(1.702) * x)
    if name == "gelu":
        return lambda x: np.float32(0.5) * x * (np.float32(1.0) + erf(x / np.float32(np.sqrt(2.0))))
    raise ClipWeightsError(f"CLIP hidden_act {name!r} is not supported by the numpy forward (quick_gelu, gelu)")


def _encoder(x, w, tower: str, c, causal: bool):
    """transformers CLIPEncoder (pre-LN blocks) in numpy; w holds Linear weights as [in, out]."""
    b, n, d = x.shape
    heads, act = c.num_attention_heads, _activation(c.hidden_act)
    dh = d // heads
    mask = np.triu(np.full((n, n), -np.inf, np.float32), 1) if causal else 0.0
    for i in range(c.num_hidden_layers):
        p = f"{tower}.encoder.layers.{i}."
        lin = lambda h, name: _linear(h, w[f"{p}{name}.weight"], w[f"{p}{name}.bias"])  # noqa: E731
        h = _layer_norm(x, w[p + "layer_norm1.weight"], w[p + "layer_norm1.bias"], c.layer_norm_eps)
        q, k, v = (lin(h, f"self_attn.{m}").reshape(b, n, heads, dh).transpose(0, 2, 1, 3)
                   for m in ("q_proj", "k_proj", "v_proj"))
        s = (q * np.float32(dh ** -0.5)) @ k.transpose(0, 1, 3, 2) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        o = ((s / s.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
        x = x + lin(o, "self_attn.out_proj")
        h = _layer_norm(x, w[p + "layer_norm2.weight"], w[p + "layer_norm2.bias"], c.layer_norm_eps)
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


def numpy_image_embeds(w, config, pixels: np.ndarray) -> np.ndarray:
    """CLIPModel.get_image_features in numpy: pixels float32 [B, S, S, 3] -> [B, projection_dim]."""
    c = config.vision_config
    b, s, p = pixels.shape[0], c.image_size, c.patch_size
    g = s // p
    patches = pixels.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 5, 2, 4).reshape(b * g * g, 3 * p * p)
    x = (patches @ w["vision_model.embeddings.patch_embedding.weight"]).reshape(b, g * g, c.hidden_size)
    cls = np.broadcast_to(w["vision_model.embeddings.class_embedding"], (b, 1, c.hidden_size))
    x = np.concatenate([cls, x], axis=1) + w["vision_model.embeddings.position_embedding.weight"]
    x = _layer_norm(x, w["vision_model.pre_layrnorm.weight"], w["vision_model.pre_layrnorm.bias"], c.layer_norm_eps)
    x = _encoder(x, w, "vision_model", c, causal=False)[:, 0]
    x = _layer_norm(x, w["vision_model.post_layernorm.weight"], w["vision_model.post_layernorm.bias"], c.layer_norm_eps)
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
            try:
                import torch  # noqa: F401
                backend = "torch"
            except ImportError:
                backend = "numpy"
        if backend not in ("torch", "numpy"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'numpy', got {backend!r}")
        self.name = name or self.name
        self.backend, self.batch_size, self.crop_rounding = backend, int(batch_size), crop_rounding
        self.config = read_clip_config(weights_dir)
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


# ------------------------------------------------------------------------------- open_clip converter


def open_clip_to_transformers(state_dict: Mapping[str, np.ndarray], config) -> dict[str, np.ndarray]:
    """An open_clip CLIP state dict (`visual.transformer.resblocks.0.attn.in_proj_weight`,
    `token_embedding.weight`, `positional_embedding`, `text_projection`, `visual.proj`,
    `logit_scale`, ...) -> transformers CLIPModel tensors. Strict: every key used, shapes checked."""
    sd = {k[len("module."):] if k.startswith("module.") else k: np.asarray(v, np.float32)
          for k, v in state_dict.items()}
    used, missing, out = set(), [], {}

    def take(key):
        used.add(key)
        if key not in sd:
            missing.append(key)
            return np.zeros((0,), np.float32)
        return sd[key]

    def blocks(src: str, dst: str, n: int):
        for i in range(n):
            s, d = f"{src}.{i}.", f"{dst}.{i}."
            for name, qkv in (("weight", take(s + "attn.in_proj_weight")), ("bias", take(s + "attn.in_proj_bias"))):
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), np.split(qkv, 3) if qkv.size else [qkv] * 3):
                    out[f"{d}self_attn.{proj}.{name}"] = part
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{d}{b}.weight"], out[f"{d}{b}.bias"] = take(f"{s}{a}.weight"), take(f"{s}{a}.bias")

    out["text_model.embeddings.token_embedding.weight"] = take("token_embedding.weight")
    out["text_model.embeddings.position_embedding.weight"] = take("positional_embedding")
    blocks("transformer.resblocks", "text_model.encoder.layers", config.text_config.num_hidden_layers)
    out["text_model.final_layer_norm.weight"], out["text_model.final_layer_norm.bias"] = (
        take("ln_final.weight"), take("ln_final.bias"))
    out["text_projection.weight"] = take("text_projection").T
    out["vision_model.embeddings.class_embedding"] = take("visual.class_embedding")
    out["vision_model.embeddings.patch_embedding.weight"] = take("visual.conv1.weight")
    out["vision_model.embeddings.position_embedding.weight"] = take("visual.positional_embedding")
    for a, b in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        out[f"vision_model.{b}.weight"] = take(f"visual.{a}.weight")
        out[f"vision_model.{b}.bias"] = take(f"visual.{a}.bias")
    blocks("visual.transformer.resblocks", "vision_model.encoder.layers", config.vision_config.num_hidden_layers)
    out["visual_projection.weight"] = take("visual.proj").T
    scale = take("logit_scale")
    out["logit_scale"] = scale.reshape(()) if scale.size == 1 else scale
    unused = sorted(k for k in sd if k not in used and k != "attn_mask")  # attn_mask: a buffer in old open_clip
    if missing or unused:
        raise ClipWeightsError(f"open_clip state dict does not match the config: missing {missing[:8]}, "
                               f"unused {unused[:8]}{' ...' if len(unused) > 8 else ''}")
    out = {k: np.array(v, np.float32, order="C") for k, v in out.items()}
    check_clip_tensors(out, config, "the converted open_clip state dict")
    return out


def convert_open_clip_checkpoint(checkpoint, out_dir: str, tokenizer_dir: str, config: Mapping | None = None) -> str:
    """Write an open_clip checkpoint (path to .pt/.bin/.safetensors, or a state dict) as a transformers
    CLIPModel directory `out_dir` (config.json, model.safetensors, tokenizer, preprocessor_config.json).
    config: CLIPConfig kwargs; default `OPEN_CLIP_VIT_H_14` (HPSv2, HPSv2.1)."""
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor

    cfg = CLIPConfig(**dict(config or OPEN_CLIP_VIT_H_14))
    if isinstance(checkpoint, (str, os.PathLike)):
        path = str(checkpoint)
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file

            state = load_file(path)
        else:
            state = {k: v.float().numpy() for k, v in _torch_load(path).items() if hasattr(v, "float")}
    else:
        state = checkpoint
    tensors = open_clip_to_transformers(state, cfg)
    os.makedirs(out_dir, exist_ok=True)
    cfg.save_pretrained(out_dir)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    s = cfg.vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_mean=list(CLIP_MEAN),
                       image_std=list(CLIP_STD)).save_pretrained(out_dir)
    return out_dir


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Convert an open_clip ViT-H-14 checkpoint (HPSv2) to a CLIPModel dir.")
    ap.add_argument("checkpoint")
    ap.add_argument("--tokenizer", required=True, help="a CLIP tokenizer dir (laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    print(convert_open_clip_checkpoint(args.checkpoint, args.out, args.tokenizer))


if __name__ == "__main__":
    main()
