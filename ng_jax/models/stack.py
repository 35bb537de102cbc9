"""The model stack of a run, built from its config: what the RL loop and the evaluation need of a model.

    stack = build_model_stack(config, mesh, layout)
    v = stack.model.apply(params, x_t, sigma, cond)        # the one velocity contract (velocity.py)
    stack.ref                                              # frozen reference params, in stack.ref_shardings
    cond = stack.encode(prompts, repeat=k)                 # TextCond, row i // k is prompts[i // k]
    uncond = stack.uncond(n)                               # the empty prompt's TextCond, n rows
    images = stack.decode_fn(stack.decoder_params, x0)     # pure, jittable: float [B, H, W, 3] in ~[-1, 1]

Samples live in the model's space (`stack.model.sample_shape`); `decode_fn` turns them into the
images the host rewards, the judges and the sample grids see. Images stay float here: the one
conversion to uint8 is where images leave the device (`rewards.host.images_to_uint8` inside the
reward callback, `sampling.to_uint8` in the evaluation), exactly as before this module existed.

Two worlds, chosen by `config.model.family` (no `model` block: the toy world):

- "toy_mmdit": the model bundle `config.reference` ("" = the shipped reference): the toy MMDiT in
  pixel space, the toy text encoder. `decode_fn` is the identity (the samples are the images), so
  runs are bit-identical to the loop that predates this module.
- "sd3" / "sd35" / "flux1_dev": a local diffusers directory `model.weights_dir` (transformer/,
  vae/, text_encoder*/, tokenizer*/; `python -m ng_jax.tools.check_weights` validates one). The
  transformer config comes from transformer/config.json; the latent side is
  `model.resolution / VAE downsample factor` (512 px -> 64); `model.attention` picks the attention
  implementation ("auto": cuDNN flash attention on GPU, splash on TPU, the reference on CPU). Dtype policy: the frozen base
  (the reference, and with LoRA the weights the float32 adapters apply to) is stored in
  `model.param_dtype` (bf16 on accelerators) and computes in `model.dtype`; the trainable tree is
  always float32 (LoRA adapters, or full fine-tuning's master weights: `trainable_init`). Text
  encoders and the VAE are frozen in `model.text.param_dtype` / `model.vae.dtype`. The reference and
  text encoders follow the run's reference layout (`ng_jax.sharding`: logical axis names mapped
  by `mesh.ref_logical_rules`; each tensor read straight into its shards); the
  VAE decoder is replicated (84M parameters; the batch-parallel decode then needs no communication).
  `decode_fn` is the VAE decode of `from_model_latents(x0)`, traced into the rollout's jit so that
  only images travel to the reward callbacks.

The text encoders run on the devices. Real encoders encode each distinct prompt once in batches of
`model.text.batch_size` (the last padded with empty prompts: one compiled shape) and repeat rows on
device; the toy encoder tokenizes the repeated list, as the loop always did.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from ng_jax import sharding
from ng_jax.config.checks import ConfigError, weights_dir_problem
from ng_jax.models.bundle import load_bundle
from ng_jax.models.dtypes import dtype_of
from ng_jax.models.nets.layers import ATTENTION
from ng_jax.models.nets.lora import lora_init
from ng_jax.models.nets.text import EMPTY_PROMPT, TextCond, make_text_encoder, tokenize
from ng_jax.models.nets.vae import make_vae
from ng_jax.models.velocity import make_velocity_model
from ng_jax.models.weights.flux import load_flux_transformer
from ng_jax.models.weights.hf_text import load_text_encoders
from ng_jax.models.weights.sd3 import load_sd3_transformer
from ng_jax.models.weights.transformer import model_config_from_diffusers
from ng_jax.models.weights.vae import load_vae, vae_config_from_diffusers

TOY = "toy_mmdit"
REAL_FAMILIES = ("sd3", "sd35", "flux1_dev")


@dataclasses.dataclass(frozen=True, eq=False)
class ModelStack:
    family: str                       # "toy_mmdit" | "sd3" | "sd35" | "flux1_dev"
    model: Any                        # velocity.VelocityModel (FluxVelocityModel for FLUX)
    ref: Any                          # reference velocity params (frozen; the LoRA base)
    ref_shardings: Any                # tree of shardings like `ref` (None without a mesh)
    decoder_params: Any               # VAE params, or {} (toy)
    decoder_shardings: Any            # tree like decoder_params, or {} (toy) / None without a mesh
    decode_fn: Callable[[Any, jax.Array], jax.Array]   # pure: (decoder_params, x0) -> float images
    encode_fn: Callable[[list[str]], TextCond]         # host: distinct prompts -> TextCond (device)
    repeat_on_device: bool = True     # False (toy): encode the repeated prompt list itself
    bundle: Any = None                # toy: the ModelBundle (config/text params, for the policy export)
    info: dict = dataclasses.field(default_factory=dict)
    render: str = "clip"              # how decoded samples become images (ng_jax.data.render; set by with_render)
    shift: tuple | None = None        # "centred" toy space: samples are images minus this (set by with_space)

    @property
    def is_toy(self) -> bool:
        return self.family == TOY

    def encode(self, prompts: Sequence[str], repeat: int = 1) -> TextCond:
        """TextCond of `prompts`, each row repeated `repeat` times (group rollouts)."""
        if isinstance(prompts, str):
            raise TypeError("encode expects a sequence of prompts, not a single string")
        prompts = [str(p) for p in prompts]
        if not self.repeat_on_device:
            return self.encode_fn([p for p in prompts for _ in range(repeat)])
        cond = self.encode_fn(prompts)
        return cond if repeat == 1 else jax.tree.map(lambda x: jnp.repeat(x, repeat, axis=0), cond)

    def uncond(self, n: int) -> TextCond:
        """The unconditional (empty-prompt) TextCond with n rows."""
        if not self.repeat_on_device:
            return self.encode_fn([EMPTY_PROMPT] * n)
        one = self.encode_fn([EMPTY_PROMPT])
        return jax.tree.map(lambda x: jnp.broadcast_to(x[:1], (n,) + x.shape[1:]), one)


def model_family(config) -> str:
    """The configured family: `config.model.family`, or the toy world when there is no model block."""
    mcfg = config.get("model") if hasattr(config, "get") else None
    return str(mcfg.get("family", TOY)) if mcfg is not None else TOY


def build_model_stack(config, mesh=None, layout=None) -> ModelStack:
    """The stack for `config` (RL, evaluate or analyze config). With `mesh`, the frozen parameters are
    placed by `layout` (a `sharding.Layout`, default: the default rule table; a legacy regex rule
    list also works); without, the toy reference stays on the host (as the evaluate/analyze jobs always
    had it)."""
    layout = sharding.as_layout(layout if layout is not None else ())
    family = model_family(config)
    if family == TOY:
        return toy_stack(load_bundle(config.get("reference") or None), mesh, layout)
    if family not in REAL_FAMILIES:
        raise ConfigError(f"model.family={family!r}: expected one of {(TOY,) + REAL_FAMILIES}")
    return real_stack(config.model, mesh, layout)


# ------------------------------------------------------------------------------------------- toy


def toy_stack(bundle, mesh=None, layout=None) -> ModelStack:
    model = make_velocity_model(bundle.model_cfg)
    text = make_text_encoder(bundle.text_cfg)
    text_params = bundle.params["text"]
    ref, ref_sh = bundle.params["velocity"], None
    if mesh is not None:
        ref_sh = sharding.as_layout(layout if layout is not None else ()).shardings(ref, mesh)
        ref = jax.device_put(ref, ref_sh)
    encode_jit = jax.jit(text.encode)

    def encode(prompts):
        ids, mask = tokenize(text.tokenizer, prompts)
        return encode_jit(text_params, ids, mask)

    return ModelStack(family=TOY, model=model, ref=ref, ref_shardings=ref_sh, decoder_params={},
                      decoder_shardings={}, decode_fn=lambda params, x0: x0, encode_fn=encode,
                      repeat_on_device=False, bundle=bundle, info={"reference": "bundle"})


# ------------------------------------------------------------------------------------------ real


def check_weights_dir(mcfg) -> str:
    """model.weights_dir, or a one-line ConfigError saying what to pass (and how to validate it)."""
    path = str(mcfg.get("weights_dir") or "")
    problem = weights_dir_problem(str(mcfg.get("family")), path)
    if problem:
        raise ConfigError(problem)
    return path


def velocity_config(mcfg, latent: int):
    """The transformer config from WEIGHTS_DIR/transformer/config.json plus the run's overrides."""
    attention = str(mcfg.get("attention") or "auto")
    if attention not in ATTENTION:
        raise ConfigError(f"model.attention={attention!r}: expected one of {', '.join(ATTENTION)}")
    over = dict(family=str(mcfg.family), dtype=str(mcfg.get("dtype", "float32")), remat=bool(mcfg.get("remat", False)),
                scan_blocks=bool(mcfg.get("scan_blocks", False)), attention=attention)
    if mcfg.family == "flux1_dev":
        over.update(sample_size=latent, max_sequence_length=int(mcfg.text.max_sequence_length))
        if mcfg.get("guidance") is not None:
            over["guidance"] = float(mcfg.guidance)
    else:
        over["latent_size"] = latent
    return model_config_from_diffusers(str(mcfg.weights_dir), **over)


def load_transformer(vcfg, dtype=None, shardings=None):
    """The reference transformer's parameters from `vcfg.weights_dir`, strictly (weights.sd3 / weights.flux)."""
    load = load_flux_transformer if vcfg.family == "flux1_dev" else load_sd3_transformer
    return load(str(vcfg.weights_dir), vcfg, dtype=dtype, shardings=shardings)


def real_stack(mcfg, mesh=None, layout=None) -> ModelStack:
    wd = check_weights_dir(mcfg)
    family = str(mcfg.family)
    vae_cfg = vae_config_from_diffusers(os.path.join(wd, "vae"))
    factor = vae_cfg.downsample_factor
    res = int(mcfg.resolution)
    if res % factor:
        raise ConfigError(f"model.resolution={res} is not a multiple of the VAE's downsample factor {factor}")
    vcfg = velocity_config(mcfg, res // factor)
    model = make_velocity_model(vcfg)
    if (mesh is not None and mesh.devices.flat[0].platform == "cpu" and bool(mcfg.get("scan_blocks", False))
            and mesh.shape["fsdp"] * mesh.shape["tensor"] > 1):
        # Seen with jaxlib 0.10.2 on 8 host devices: the collectives of sharded scanned blocks inside the
        # sampler's / train step's loops deadlock ("Termination timeout ... rendezvous"); unrolled blocks run.
        logging.getLogger(__name__).warning(
            "model.scan_blocks with sharded parameters on the CPU backend can deadlock XLA:CPU collectives; "
            "use --config.model.scan_blocks=False (or a data-parallel mesh) on CPU")
    if model.sample_shape[-1] != vae_cfg.latent_channels:
        raise ConfigError(f"{wd}: the transformer works on {model.sample_shape[-1]} latent channels, the VAE has "
                          f"{vae_cfg.latent_channels}")

    param_dtype = dtype_of(mcfg.get("param_dtype"), "model.param_dtype", optional=True)
    layout = sharding.as_layout(layout if layout is not None else ())
    place = (lambda tree: layout.shardings(tree, mesh)) if mesh is not None else None
    abstract = jax.eval_shape(model.init, jax.random.key(0))
    if param_dtype is not None:
        abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, param_dtype), abstract)
    ref_sh = place(abstract) if place else None
    ref = load_transformer(vcfg, dtype=param_dtype, shardings=ref_sh)

    tcfg = mcfg.text
    text_family = "flux" if family == "flux1_dev" else "sd3"
    kw = dict(max_sequence_length=int(tcfg.max_sequence_length),
              dtype=dtype_of(tcfg.dtype, "model.text.dtype", optional=True),
              param_dtype=dtype_of(tcfg.get("param_dtype"), "model.text.param_dtype", optional=True), shardings=place)
    if text_family == "sd3":
        kw.update(with_t5=bool(tcfg.get("with_t5", True)), joint_attention_dim=int(vcfg.joint_attention_dim))
    enc, text_params = load_text_encoders(wd, text_family, **kw)

    vae_dtype = dtype_of(mcfg.vae.get("dtype"), "model.vae.dtype", optional=True)
    vae_sh = None
    if mesh is not None:
        vae_abstract = jax.eval_shape(make_vae(vae_cfg).init, jax.random.key(0))
        vae_sh = sharding.param_shardings(vae_abstract, mesh, ((".*", "replicate"),))
    vae, vae_params = load_vae(wd, vae_cfg, dtype=vae_dtype, shardings=vae_sh)

    def decode_fn(params, x0):
        return vae.decode(params, vae.from_model_latents(x0.astype(jnp.float32)))

    batch = max(1, int(tcfg.get("batch_size", 16)))
    encode_jit = jax.jit(enc.encode)

    def encode(prompts):
        n = len(prompts)
        padded = list(prompts) + [EMPTY_PROMPT] * (-n % batch)  # one compiled shape for every call
        outs = [encode_jit(text_params, {k: jnp.asarray(v) for k, v in enc.tokenize(padded[i:i + batch]).items()})
                for i in range(0, len(padded), batch)]
        return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0)[:n], *outs)

    _check_conditioning(enc, text_params, model, wd)
    info = {"weights_dir": wd, "latent_size": res // factor, "vae_downsample": factor,
            "param_dtype": str(mcfg.get("param_dtype")), "text": enc.identity}
    return ModelStack(family=family, model=model, ref=ref, ref_shardings=ref_sh, decoder_params=vae_params,
                      decoder_shardings=vae_sh, decode_fn=decode_fn, encode_fn=encode, info=info)


def _check_conditioning(enc, text_params, model, wd: str) -> None:
    """The encoders' output widths must be the transformer's (else a shape error deep inside tracing)."""
    ids = {k: jnp.asarray(v) for k, v in enc.tokenize([EMPTY_PROMPT]).items()}
    cond = jax.eval_shape(enc.encode, text_params, ids)
    want = (model.context_shape[1], model.pooled_dim)
    got = (cond.tokens.shape[-1], cond.pooled.shape[-1])
    if got != want:
        raise ConfigError(f"{wd}: the text encoders give token/pooled widths {got}, the transformer takes {want} "
                          "(text encoders of another model family?)")


def trainable_init(ref, lora_cfg, rng):
    """The trainable tree at step 0 (always float32): LoRA adapters (zero `lora_b`: policy == reference)
    or, for full fine-tuning, float32 master copies of the reference weights."""
    if lora_cfg is None:
        return jax.tree.map(lambda x: jnp.copy(x).astype(jnp.float32), ref)
    return lora_init(ref, rng, rank=int(lora_cfg.rank), alpha=float(lora_cfg.alpha), targets=tuple(lora_cfg.targets))
