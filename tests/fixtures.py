"""Builders shared by the tests (imported as `from tests.fixtures import ...`; the pytest fixtures
that use them are in tests/conftest.py).

- `tiny_model_cfg` / `tiny_text_cfg`: the tiny MMDiT and text encoder configs (keyword overrides for
  other sizes).
- `build_tiny_bundle`: a tiny *pretrained* reference bundle for the RL loop, the analyses, the grid and
  the notebook: a 32x32 MMDiT with 4-pixel patches (64 image tokens, hidden 48, depth 1), so the
  verifier and the quality judge (both 32x32) work on its samples. It is pretrained for a few hundred
  rectified-flow steps on renders of PROMPTS: the MMDiT zero-initialises its adaLN / output
  projections, so an untrained model would output v == 0 and every rollout would be the initial noise.
  The session fixture `tiny_reference` (tests/conftest.py) builds it once per test session.
- `write_prompt_file`, `tiny_rl_config`: an RL run small enough for 2 CPU cores and 8 fake devices.
- `write_clip_tokenizer`, `save_tiny_clip`: a tiny CLIP BPE tokenizer and a tiny random transformers
  `CLIPModel` saved with `save_pretrained` (torch and transformers, the test extra).
- `clip_text_config`, `write_t5_tokenizer`: a tiny transformers CLIPTextConfig and a WordLevel T5 tokenizer
  (the SD3 / FLUX text encoders' parity tests and the real-model RL tests); `save_text_encoders`: an SD3 or
  FLUX directory's random text encoders and tokenizers (tiny, or real widths for benchmarks/epoch.py).
- `VAE_CONFIGS`, `torch_vae`: tiny diffusers AutoencoderKL configs and a randomised torch VAE.
- `tiny_flux_cfg`, `save_flux_diffusers`: the tiny FLUX.1 transformer config and a randomised diffusers
  FluxTransformer2DModel saved with `save_pretrained`.
- `save_sd35_diffusers`: a complete random SD3.5 directory (transformer, VAE, text encoders, tokenizers).
- `tiny_real_config`: a shipped real-model (SD3.5 / FLUX) RL config shrunk for 2 CPU cores.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from ng_jax.config import blocks, methods

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root

# ------------------------------------------------------------------ tiny model configs


def tiny_model_cfg(**kw) -> mlc.ConfigDict:
    """The toy MMDiT at a tiny size: 8x8 images in 2-pixel patches (16 tokens), hidden 32, 2 blocks, 2 heads,
    16-wide text features; `kw` overrides any key."""
    c = blocks.toy_model_config()
    c.update(dict(image_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, context_dim=16, pooled_dim=16))
    c.update(kw)
    return c


def tiny_text_cfg() -> mlc.ConfigDict:
    """The toy text encoder at a tiny size (width 16 = tiny_model_cfg's context_dim and pooled_dim)."""
    c = blocks.toy_text_config()
    c.update(dict(width=16, depth=1, heads=2, pooled_dim=16))
    return c


# ------------------------------------------------------------------ the tiny pretrained reference

PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow cross",
           "a large white circle", "a small cyan square", "two red circles", "an orange triangle")
# The bundle's velocity model: 32x32 as the world's renders, the verifier and the judge.
BUNDLE_MODEL = dict(image_size=32, patch_size=4, hidden_size=48, depth=1)
BUNDLE_STEPS = 200  # about 200 steps give coloured blobs on a dark background


def _numpy_init(abstract, rng: np.random.Generator):
    """Parameters for an abstract tree without compiling an init: kernels ~ N(0, 1/fan_in), biases 0,
    norm scales 1, anything else ~ N(0, 0.02^2). The MMDiT's zero-initialised adaLN / output
    projections get random kernels too (harmless for a tiny model that is then trained)."""
    def one(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "bias":
            return np.zeros(leaf.shape, leaf.dtype)
        if name == "scale":
            return np.ones(leaf.shape, leaf.dtype)
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)
        return (0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
    return jax.tree_util.tree_map_with_path(one, abstract)


def build_tiny_bundle(directory: str, *, steps: int = BUNDLE_STEPS, batch: int = 32, seed: int = 0) -> str:
    """Pretrain the tiny velocity model (rectified flow, frozen random text encoder) on world renders of
    PROMPTS and save it as a bundle in `directory`."""
    from ng_jax import flow
    from ng_jax.data import world
    from ng_jax.models.bundle import ModelBundle, save_bundle
    from ng_jax.models.nets.text import EMPTY_PROMPT, make_text_encoder, tokenize
    from ng_jax.models.velocity import make_velocity_model
    from ng_jax.state import make_optimizer

    model_cfg, text_cfg = tiny_model_cfg(**BUNDLE_MODEL), tiny_text_cfg()
    model, text = make_velocity_model(model_cfg), make_text_encoder(text_cfg)
    rng = np.random.default_rng(seed)
    text_params = _numpy_init(jax.eval_shape(text.init, jax.random.key(0)), rng)
    params = _numpy_init(jax.eval_shape(model.init, jax.random.key(0)), rng)
    optimizer = make_optimizer(blocks.optim_config(lr=3e-3))

    per_prompt = 16  # a fixed render set, sampled from (with 10% empty prompts for guidance)
    prompts = [p for p in PROMPTS for _ in range(per_prompt)]
    images = np.stack([world.render_prompt(p, seed * 1000 + i)[0] for i, p in enumerate(prompts)])
    x_all = images.astype(np.float32) / 127.5 - 1.0
    ids, mask = tokenize(text.tokenizer, prompts + [EMPTY_PROMPT])
    conds = jax.jit(text.encode)(text_params, ids, mask)  # frozen text features, computed once

    @jax.jit
    def step(params, opt_state, idx, key):
        k_drop, k_sigma, k_noise = jax.random.split(key, 3)
        drop = jax.random.uniform(k_drop, idx.shape) < 0.1
        cond = jax.tree.map(lambda c: c[jnp.where(drop, len(prompts), idx)], conds)
        x0 = jnp.asarray(x_all)[idx]
        sigma = flow.sample_logit_normal(k_sigma, idx.shape)
        noise = jax.random.normal(k_noise, x0.shape)

        def loss_fn(p):
            v = model.apply(p, flow.interpolate(x0, noise, sigma), sigma, cond)
            return jnp.mean(jnp.square(v - flow.velocity_target(x0, noise)))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return jax.tree.map(jnp.add, params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    keys = jax.random.split(jax.random.key(seed), steps)
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, rng.choice(len(prompts), batch, replace=False), keys[i])
    loss = float(loss)
    if not np.isfinite(loss):
        raise FloatingPointError(f"tiny pretraining diverged (loss {loss})")
    bundle = ModelBundle(model_cfg=model_cfg, text_cfg=text_cfg,
                         sampling={"num_steps": 6, "shift": 1.0, "cfg_scale": 2.0},
                         params={"text": text_params, "velocity": jax.device_get(params)},
                         info={"trained_steps": steps, "final_loss": loss})
    save_bundle(directory, bundle)
    return directory


def write_tiny_config_file(directory, bundle: str, prompts: str, settings: dict | None = None, **kw) -> str:
    """DIRECTORY/tiny_rl_config.py, a config file for the entry point: `tiny_rl_config(bundle, prompts, **kw)`
    with `settings` ({"eval.every": 2, ...}) assigned after."""
    lines = "".join(f"    c.{k} = {v!r}\n" for k, v in (settings or {}).items())
    path = os.path.join(str(directory), "tiny_rl_config.py")
    with open(path, "w") as f:
        f.write(f"import sys\nsys.path.insert(0, {REPO!r})\nfrom tests.fixtures import tiny_rl_config\n\n\n"
                f"def get_config(arg=None):\n    c = tiny_rl_config({bundle!r}, {prompts!r}, **{kw!r})\n{lines}"
                "    return c\n")
    return path


def write_prompt_file(directory: str, prompts=PROMPTS, name: str = "prompts.txt") -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("\n".join(prompts) + "\n")
    return path


def tiny_rl_config(bundle_dir: str, prompt_file: str, *, method: str = "awm", epochs: int = 8,
                   rewards: dict | None = None, quality: bool = True) -> mlc.ConfigDict:
    """An RL config small enough for 2 CPU cores with 8 fake devices (batches divisible by 8).

    The default reward is JPEG incompressibility: its score moves within a few epochs for this tiny
    model, whereas compressibility is dominated by the residual noise of 6-step samples, which the
    tiny model cannot remove in 8 epochs. AWM runs with advantages clipped at 1 (instead of 5)
    and a weaker EMA anchor (0.1 instead of 1) so that 16 optimizer steps show a clear effect.
    """
    c = methods.rl_config(method)
    c.reference = bundle_dir
    c.data.prompt_file = prompt_file
    c.rl.epochs = epochs
    c.rl.prompts_per_epoch = 4
    c.rl.group_size = 4          # 16 rollouts per epoch
    c.rl.train_batch = 8
    c.rl.micro_batch = 8         # 2 optimizer steps per epoch
    c.rl.num_timesteps = 2
    c.rl.rollout.num_steps = 6
    c.rl.rollout.cfg_scale = 2.0
    c.optim.lr = 3e-3
    if method == "awm":
        c.loss.adv_clip = 1.0
        c.loss.ema_beta = 0.1
    c.rewards.weights = mlc.ConfigDict(rewards or {"jpeg_incompressibility": 1.0})
    c.rewards.timeout_s = 0.0
    c.eval.prompt_file = prompt_file
    c.eval.num_prompts = 4
    c.eval.samples_per_prompt = 2
    c.eval.batch_size = 8
    c.eval.num_steps = 6
    c.eval.cfg_scale = 2.0
    c.eval.every = 3
    c.eval.grid_size = 8
    c.eval.quality = quality
    c.ckpt.every = 2
    c.ckpt.max_to_keep = 3
    return c


# ------------------------------------------------------------------ tiny CLIP (test extra)

CLIP_MERGES = (("t", "h"), ("th", "e</w>"), ("r", "e"), ("re", "d</w>"), ("c", "a"), ("ca", "t</w>"), ("d", "o"),
               ("do", "g</w>"))
CLIP_IMAGE = 32  # the tiny CLIPModel's image size


def write_clip_tokenizer(directory, *, merges=CLIP_MERGES, pad_token: str = "<|endoftext|>") -> int:
    """A CLIPTokenizer over the 256 byte symbols (+ `</w>` forms), `merges` and the two specials (last),
    saved in `directory`; returns the vocabulary size."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    os.makedirs(directory, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    CLIPTokenizer(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"), pad_token=pad_token,
                  model_max_length=77).save_pretrained(directory)
    return len(vocab)


def tiny_clip_config(vocab: int, act: str):
    """A transformers CLIPConfig: 2-layer, 32-wide text and vision towers (8-pixel patches), projection 24."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=vocab, max_position_embeddings=77, hidden_act=act, bos_token_id=vocab - 2,
                         eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=CLIP_IMAGE, patch_size=8, hidden_act=act),
        projection_dim=24, logit_scale_init_value=4.3)


def save_tiny_clip(directory, act: str, seed: int):
    """A random tiny CLIPModel (torch seed `seed`) with its tokenizer and CLIPImageProcessor config, saved in
    `directory`; returns the torch model."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    vocab = write_clip_tokenizer(directory)
    model = CLIPModel(tiny_clip_config(vocab, act)).eval()
    model.save_pretrained(directory)
    processor = CLIPImageProcessor(size={"shortest_edge": CLIP_IMAGE},
                                   crop_size={"height": CLIP_IMAGE, "width": CLIP_IMAGE})
    processor.save_pretrained(directory)
    return model


def clip_text_config(vocab, hidden, eos, layers: int = 2):
    """A transformers CLIPTextConfig: `layers` layers, `hidden` wide (projection too), EOS id `eos`. Tiny
    widths (< 64) get 2 heads and a 64-wide MLP; real ones (CLIP-L 768, bigG 1280) 64-wide heads and a 4x MLP."""
    from transformers import CLIPTextConfig

    real = hidden >= 64
    return CLIPTextConfig(hidden_size=hidden, intermediate_size=4 * hidden if real else 64, num_hidden_layers=layers,
                          num_attention_heads=hidden // 64 if real else 2, vocab_size=vocab,
                          max_position_embeddings=77, projection_dim=hidden, eos_token_id=eos,
                          bos_token_id=vocab - 2, pad_token_id=vocab - 1)


# ------------------------------------------------------------------ tiny T5 tokenizer (test extra)

T5_WORDS = "a the red cat dog on of photo blue".split()


def write_t5_tokenizer(directory, words=T5_WORDS) -> int:
    """A WordLevel T5TokenizerFast over `words` (lower-cased, whitespace split, `</s>` appended), saved in
    `directory`; returns the vocabulary size."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import T5TokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>"] + list(words))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    T5TokenizerFast(tokenizer_object=tok, extra_ids=0, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                    model_max_length=512).save_pretrained(directory)
    return len(vocab)


def save_text_encoders(directory, family, *, clip_widths=None, clip_layers: int = 2, t5=None):
    """Random text encoders (torch seed 1) and toy tokenizers of a diffusers directory: "sd3" CLIP-L and
    bigG-style CLIPTextModelWithProjection (text_encoder, _2) + T5 (text_encoder_3), "flux" CLIP-L
    (CLIPTextModel) + T5 (text_encoder_2). `clip_widths`: the CLIP widths (default (16, 32) / (32,)),
    `clip_layers` their depth (`clip_text_config`); `t5`: T5Config overrides (default 1 layer of d_model
    48 / 32 = the tiny transformers' joint_attention_dim, 2 heads of 8, d_ff 32)."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    sd3 = family == "sd3"
    torch.manual_seed(1)
    v = write_clip_tokenizer(os.path.join(directory, "tokenizer"))
    t5_cfg = {"d_model": 48 if sd3 else 32, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_heads": 2, **(t5 or {})}
    t5_model = T5EncoderModel(T5Config(**t5_cfg, feed_forward_proj="gated-gelu", vocab_size=write_t5_tokenizer(
        os.path.join(directory, "tokenizer_3" if sd3 else "tokenizer_2")))).eval()
    if sd3:
        write_clip_tokenizer(os.path.join(directory, "tokenizer_2"), pad_token="!")
        for sub, width, eos in zip(("text_encoder", "text_encoder_2"), clip_widths or (16, 32), (v - 1, 2)):
            CLIPTextModelWithProjection(clip_text_config(v, width, eos, clip_layers)).eval().save_pretrained(
                os.path.join(directory, sub))
    else:  # FLUX: pooled = CLIP-L's pooler output (the transformer's pooled_projection_dim)
        (width,) = clip_widths or (32,)
        CLIPTextModel(clip_text_config(v, width, v - 1, clip_layers)).eval().save_pretrained(
            os.path.join(directory, "text_encoder"))
    t5_model.save_pretrained(os.path.join(directory, "text_encoder_3" if sd3 else "text_encoder_2"))


# ------------------------------------------------------------------ tiny diffusers VAE (test extra)

VAE_CONFIGS = {
    "sd3": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, latent_channels=16,
                scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
    "sd1": dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=16,
                scaling_factor=0.18215, shift_factor=None, use_quant_conv=True, use_post_quant_conv=True),
}


def torch_vae(seed: int, **kw):
    """A diffusers AutoencoderKL (`kw`: its config) with random norm scales and biases (torch seed `seed`);
    skips the test without torch / diffusers."""
    import pytest

    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    n = len(kw["block_out_channels"])
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                                    up_block_types=("UpDecoderBlock2D",) * n, sample_size=32, **kw).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


# ------------------------------------------------------------------ tiny FLUX.1 transformer (test extra)

# batch, latent height / width / channels, text length: non-square latents, so that a row/column mix-up in
# the ids or packing shows
FLUX_SHAPE = (2, 4, 6, 4, 5)


def tiny_flux_cfg(guidance_embeds: bool, **kw) -> dict:
    """A tiny FLUX.1 model config: 2 double + 2 single blocks, 2 heads of 16 = RoPE axes (4, 6, 6), 4 latent
    channels packed to 16; `kw` overrides any key."""
    _, h, w, c, n = FLUX_SHAPE
    cfg = dict(family="flux1_dev", patch_size=1, in_channels=4 * c, out_channels=None, num_layers=2,
               num_single_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
               guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6), sample_size=(h, w),
               max_sequence_length=n)
    cfg.update(kw)
    return cfg


def save_flux_diffusers(root, guidance_embeds: bool, seed: int):
    """A diffusers FluxTransformer2DModel of `tiny_flux_cfg` with every parameter perturbed (torch seed
    `seed`), saved in ROOT/transformer; returns the torch model."""
    import torch
    from diffusers import FluxTransformer2DModel

    cfg = tiny_flux_cfg(guidance_embeds)
    keys = ("patch_size", "in_channels", "num_layers", "num_single_layers", "attention_head_dim",
            "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "axes_dims_rope")
    torch.manual_seed(seed)
    ref = FluxTransformer2DModel(**{k: cfg[k] for k in keys}).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(os.path.join(root, "transformer"))
    return ref


# SD3.5-like transformer: token width = T5 width 48 (>= CLIP-L 16 + bigG 32), pooled = 16 + 32.
SD35 = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=48,
            pos_embed_max_size=12, qk_norm="rms_norm", dual_attention_layers=(0,))


def save_sd35_transformer(directory, seed=0, dims=SD35, noise: float = 0.05):
    """A diffusers SD3Transformer2DModel of `dims` (default `SD35`: qk RMS-norm, one MMDiT-X block) with every
    parameter perturbed by `noise` standard deviations (0: diffusers' initialisation), saved in
    DIRECTORY/transformer."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    tm = diffusers.SD3Transformer2DModel(**dims).eval()
    with torch.no_grad():  # random norms and zero-initialised projections too, so the velocity is not 0
        for p in tm.parameters() if noise else ():
            p.add_(noise * torch.randn_like(p))
    tm.save_pretrained(os.path.join(directory, "transformer"))


def save_sd35_diffusers(directory, *, dims=SD35, noise: float = 0.05, vae=None, **text):
    """A complete random SD3.5 diffusers directory: transformer (`save_sd35_transformer`), vae (`torch_vae`
    of `vae`, default VAE_CONFIGS["sd3"]), text encoders and tokenizers (`save_text_encoders(**text)`)."""
    save_sd35_transformer(directory, dims=dims, noise=noise)
    torch_vae(0, **(vae or VAE_CONFIGS["sd3"])).save_pretrained(os.path.join(directory, "vae"))
    save_text_encoders(directory, "sd3", **text)
    return directory


# ------------------------------------------------------------------ real-model RL configs, shrunk

REAL_T5_LEN = 8  # the T5 sequence length of tiny_real_config


def tiny_real_config(config, weights_dir, d, *, epochs=2):
    """A shipped real-model config shrunk for 2 CPU cores: 16 px images (8x8 latents), 4 prompts x 4
    rollouts per epoch in two rollout calls of 8, 2 optimizer steps per epoch, float32 except the
    frozen base (bf16, the shipped policy), on the shipped FSDP mesh (8-way here). `d`: {"prompts": a
    prompt file, "clip": a tiny CLIP directory (`save_tiny_clip`)}.

    Unrolled blocks without remat: with FSDP-sharded parameters, scanned blocks inside the sampler's
    and the train step's loops deadlock XLA:CPU's collectives (jaxlib 0.10.2, 8 host devices;
    tests/parity/test_parity_sd3.py and test_parity_flux.py check scanned == unrolled), and remat only
    costs compile time here."""
    m = config.model
    m.weights_dir = weights_dir
    m.resolution = 16
    m.dtype = "float32"
    m.scan_blocks = False
    m.remat = False
    m.text.update(dtype="float32", param_dtype="float32", max_sequence_length=REAL_T5_LEN, batch_size=4)
    m.vae.dtype = "float32"
    config.data.prompt_file = d["prompts"]
    r = config.rl
    r.update(epochs=epochs, prompts_per_epoch=4, group_size=4, train_batch=8, micro_batch=8, num_timesteps=2)
    r.rollout.update(num_steps=4, batch_size=8)
    config.lora.update(rank=4, alpha=8.0)
    config.rewards.weights = mlc.ConfigDict({"clip_score": 1.0})
    config.rewards.update(clip_score_dir=d["clip"], clip_backend="numpy", timeout_s=0.0)
    config.eval.update(prompt_file=d["prompts"], num_prompts=2, samples_per_prompt=4, batch_size=8, num_steps=3,
                       every=epochs, grid_size=8)
    config.ckpt.every = epochs
    return config
