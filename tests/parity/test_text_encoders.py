"""SD3 / FLUX text encoders (ng_jax.models.nets.hf_text; loading: ng_jax.models.weights.hf_text) against
transformers + diffusers PyTorch.

Tiny random CLIP / T5 encoders are saved with `save_pretrained` (T5 sharded, as T5-XXL is) next to
tiny tokenizers written here (a byte-level CLIP BPE vocabulary with a few merges; a WordLevel
T5TokenizerFast), in the diffusers directory layout. The reference prompt embeddings come from
diffusers' own `StableDiffusion3Pipeline.encode_prompt` / `FluxPipeline.encode_prompt`, built
with only the tiny text encoders and tokenizers.
"""
import os
import shutil

import numpy as np
import pytest

from tests.fixtures import clip_text_config as clip_config
from tests.fixtures import write_clip_tokenizer, write_t5_tokenizer

TOL = 1e-4
MERGES = [("t", "h"), ("th", "e</w>"), ("r", "e"), ("re", "d</w>"), ("c", "a"), ("ca", "t</w>"), ("d", "o"),
          ("do", "g</w>"), ("o", "n</w>")]
# The last prompt is truncated by every tokenizer (92 CLIP tokens > 77, 50 T5 words > T5_LEN).
PROMPTS = ["the red cat on a dog", "a photo of a blue dog", "", "the red cat on a blue photo of a dog " * 5]
T5_LEN = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Saved tiny SD3 and FLUX directories and the torch reference models."""
    torch = pytest.importorskip("torch")
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf_text")
    sd3, flux = root / "sd3", root / "flux"
    v = write_clip_tokenizer(sd3 / "tokenizer", merges=MERGES)
    write_clip_tokenizer(sd3 / "tokenizer_2", merges=MERGES, pad_token="!")  # as SD3's bigG tokenizer
    v5 = write_t5_tokenizer(sd3 / "tokenizer_3")
    shutil.copytree(sd3 / "tokenizer", flux / "tokenizer")
    shutil.copytree(sd3 / "tokenizer_3", flux / "tokenizer_2")
    # CLIP-L pools at the first EOS id; the bigG stand-in keeps the legacy eos_token_id=2 (argmax pooling).
    models = {"clip_l": CLIPTextModelWithProjection(clip_config(v, 32, v - 1)),
              "clip_g": CLIPTextModelWithProjection(clip_config(v, 48, 2)),
              "t5": T5EncoderModel(T5Config(d_model=96, d_kv=8, d_ff=64, num_layers=2, num_heads=2, vocab_size=v5,
                                            feed_forward_proj="gated-gelu")),
              "flux_clip": CLIPTextModel(clip_config(v, 32, v - 1))}
    for m in models.values():
        m.eval()
    models["clip_l"].save_pretrained(sd3 / "text_encoder")
    models["clip_g"].save_pretrained(sd3 / "text_encoder_2")
    models["t5"].save_pretrained(sd3 / "text_encoder_3", max_shard_size="50KB")
    models["t5"].save_pretrained(flux / "text_encoder_2", max_shard_size="50KB")
    models["flux_clip"].save_pretrained(flux / "text_encoder")
    assert any(n.endswith(".index.json") for n in os.listdir(sd3 / "text_encoder_3")), "T5 should be sharded"
    return {"root": root, "sd3": str(sd3), "flux": str(flux), "torch": models}


@pytest.fixture(scope="module")
def sd3(tiny):
    from ng_jax.models.weights.hf_text import load_text_encoders

    return load_text_encoders(tiny["sd3"], "sd3", max_sequence_length=T5_LEN)


@pytest.fixture(scope="module")
def flux(tiny):
    from ng_jax.models.weights.hf_text import load_text_encoders

    return load_text_encoders(tiny["flux"], "flux", max_sequence_length=T5_LEN)


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.needs_torch
def test_each_encoder_matches_torch(tiny, sd3, flux):
    """Every hidden state and the pooled outputs of CLIP-L, bigG, T5 and FLUX's CLIP-L, per token."""
    import torch

    enc, params = sd3
    fenc, fparams = flux
    ids = enc.tokenize(PROMPTS)
    rng = np.random.default_rng(0)
    ids["clip_l"] = np.concatenate([ids["clip_l"], rng.integers(0, 523, (2, 77), dtype=np.int32)])
    errs = {}
    for role in ("clip_l", "clip_g"):
        x = ids["clip_l"] if role == "clip_l" else ids["clip_g"]
        out = enc.models[role](x, params=params[role], output_hidden_states=True)
        with torch.no_grad():
            ref = tiny["torch"][role](torch.from_numpy(x).long(), output_hidden_states=True)
        assert len(out.hidden_states) == len(ref.hidden_states) == 3
        for i, (h, r) in enumerate(zip(out.hidden_states, ref.hidden_states)):
            errs[f"{role}/hidden{i}"] = _max_err(h, r.numpy())
        errs[f"{role}/text_embeds"] = _max_err(out.text_embeds, ref.text_embeds.numpy())
    out = enc.models["t5"](ids["t5"], params=params["t5"])
    with torch.no_grad():
        ref = tiny["torch"]["t5"](torch.from_numpy(ids["t5"]).long())
    errs["t5/last_hidden"] = _max_err(out.last_hidden_state, ref.last_hidden_state.numpy())
    fx = fenc.tokenize(PROMPTS)["clip_l"]
    out = fenc.models["clip_l"](fx, params=fparams["clip_l"])
    with torch.no_grad():
        ref = tiny["torch"]["flux_clip"](torch.from_numpy(fx).long())
    errs["flux_clip/pooler"] = _max_err(out.pooler_output, ref.pooler_output.numpy())
    errs["flux_clip/last_hidden"] = _max_err(out.last_hidden_state, ref.last_hidden_state.numpy())
    print("max abs errors:", {k: f"{v:.1e}" for k, v in errs.items()})
    assert max(errs.values()) <= TOL, errs
    # the pooled outputs really differ per prompt (pooling is not stuck on one position)
    assert _max_err(out.pooler_output[0], out.pooler_output[1]) > 1e-3


@pytest.mark.needs_torch
def test_sd3_layout_matches_diffusers_pipeline(tiny, sd3):
    import torch
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    enc, params = sd3
    d = tiny["sd3"]
    pipe = StableDiffusion3Pipeline(
        transformer=None, scheduler=None, vae=None,
        text_encoder=tiny["torch"]["clip_l"], tokenizer=CLIPTokenizer.from_pretrained(f"{d}/tokenizer"),
        text_encoder_2=tiny["torch"]["clip_g"], tokenizer_2=CLIPTokenizer.from_pretrained(f"{d}/tokenizer_2"),
        text_encoder_3=tiny["torch"]["t5"], tokenizer_3=T5TokenizerFast.from_pretrained(f"{d}/tokenizer_3"))
    with torch.no_grad():
        ref_tokens, _, ref_pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device=torch.device("cpu"),
                                                          do_classifier_free_guidance=False,
                                                          max_sequence_length=T5_LEN)
    assert len(pipe.tokenizer(PROMPTS[-1]).input_ids) > 77 and len(pipe.tokenizer_3(PROMPTS[-1]).input_ids) > T5_LEN
    cond = enc.encode_prompts(params, PROMPTS)
    assert cond.tokens.shape == (len(PROMPTS), 77 + T5_LEN, 96) == tuple(ref_tokens.shape)
    assert cond.pooled.shape == (len(PROMPTS), 32 + 48) == tuple(ref_pooled.shape)
    assert cond.mask.dtype == bool and bool(np.all(cond.mask))
    err_t, err_p = _max_err(cond.tokens, ref_tokens.numpy()), _max_err(cond.pooled, ref_pooled.numpy())
    print(f"SD3 layout max abs error: tokens {err_t:.1e}, pooled {err_p:.1e}")
    assert err_t <= TOL and err_p <= TOL
    assert np.all(np.asarray(cond.tokens)[:, :77, 80:] == 0)  # CLIP part zero-padded from 32 + 48 to 96


@pytest.mark.needs_torch
def test_sd3_without_t5_uses_zeros(tiny):
    from ng_jax.models.weights.hf_text import load_text_encoders

    enc, params = load_text_encoders(tiny["sd3"], "sd3", max_sequence_length=8, with_t5=False, joint_attention_dim=96)
    assert set(params) == {"clip_l", "clip_g"}
    cond = enc.encode_prompts(params, PROMPTS[:2])
    assert cond.tokens.shape == (2, 77 + 8, 96)
    assert np.all(np.asarray(cond.tokens)[:, 77:] == 0) and np.any(np.asarray(cond.tokens)[:, :77] != 0)


@pytest.mark.needs_torch
def test_flux_layout_matches_diffusers_pipeline(tiny, flux):
    import torch
    from diffusers import FluxPipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    enc, params = flux
    d = tiny["flux"]
    pipe = FluxPipeline(scheduler=None, vae=None, transformer=None,
                        text_encoder=tiny["torch"]["flux_clip"],
                        tokenizer=CLIPTokenizer.from_pretrained(f"{d}/tokenizer"),
                        text_encoder_2=tiny["torch"]["t5"],
                        tokenizer_2=T5TokenizerFast.from_pretrained(f"{d}/tokenizer_2"))
    with torch.no_grad():
        ref_tokens, ref_pooled, _ = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"), max_sequence_length=T5_LEN)
    cond = enc.encode_prompts(params, PROMPTS)
    assert cond.tokens.shape == (len(PROMPTS), T5_LEN, 96) and cond.pooled.shape == (len(PROMPTS), 32)
    assert bool(np.all(cond.mask))
    err_t, err_p = _max_err(cond.tokens, ref_tokens.numpy()), _max_err(cond.pooled, ref_pooled.numpy())
    print(f"FLUX layout max abs error: tokens {err_t:.1e}, pooled {err_p:.1e}")
    assert err_t <= TOL and err_p <= TOL


@pytest.mark.needs_torch
def test_loading_is_strict_with_clear_errors(tiny, tmp_path):
    from ng_jax.models.weights.hf_text import load_text_encoders
    from ng_jax.models.weights.safetensors import WeightsError

    # FLUX's CLIP-L has no text_projection, which SD3 needs
    with pytest.raises(WeightsError, match="text_projection"):
        load_text_encoders(tiny["flux"], "sd3")
    broken = tmp_path / "broken"
    shutil.copytree(tiny["sd3"], broken)
    shutil.rmtree(broken / "text_encoder_2")
    shutil.copytree(broken / "text_encoder_3", broken / "text_encoder_2")  # a T5 where bigG belongs
    with pytest.raises(WeightsError, match="model_type 't5'.*clip_text_model"):
        load_text_encoders(str(broken), "sd3")
    with pytest.raises(WeightsError, match="not found"):
        load_text_encoders(str(tmp_path / "nowhere"), "flux")
    with pytest.raises(ValueError, match="family"):
        load_text_encoders(tiny["sd3"], "sdxl")


@pytest.mark.needs_torch
def test_prompt_embedding_cache(tiny, sd3, tmp_path):
    import functools

    from ng_jax.models.text_cache import PromptEmbeddingCache

    enc, params = sd3
    calls = []

    def encode(prompts):
        calls.append(list(prompts))
        return enc.encode_prompts(params, prompts)

    cache = PromptEmbeddingCache(encode, enc.identity, directory=str(tmp_path), batch_size=2)
    first = cache.get(PROMPTS[:3] + [PROMPTS[0]])
    assert calls == [PROMPTS[:2], PROMPTS[2:3]]  # unique prompts, in batches of 2
    assert (cache.hits, cache.misses) == (0, 4)
    again = cache.get([PROMPTS[1], PROMPTS[0]])
    assert len(calls) == 2 and (cache.hits, cache.misses) == (2, 4)
    np.testing.assert_array_equal(again.tokens, first.tokens[[1, 0]])
    fresh = enc.encode_prompts(params, PROMPTS[:3])  # another batch size: equal up to XLA's fp reassociation
    np.testing.assert_allclose(first.tokens[:3], np.asarray(fresh.tokens), rtol=0, atol=1e-5)
    np.testing.assert_allclose(first.pooled[:3], np.asarray(fresh.pooled), rtol=0, atol=1e-5)
    assert first.mask.dtype == bool and first.mask.all()

    # a second cache with the same identity reads the file: no encoder call at all
    files = [f for f in os.listdir(tmp_path) if f.endswith(".npz")]
    assert len(files) == 1
    reloaded = PromptEmbeddingCache(lambda p: pytest.fail(f"encoded {p} despite the cache"), enc.identity,
                                    directory=str(tmp_path))
    got = reloaded.get(PROMPTS[:3])
    assert (reloaded.hits, reloaded.misses) == (3, 0)
    np.testing.assert_array_equal(got.tokens, first.tokens[:3])
    np.testing.assert_array_equal(got.pooled, first.pooled[:3])

    # another encoder identity (here: another max_sequence_length) misses
    other = PromptEmbeddingCache(functools.partial(enc.encode_prompts, params), enc.identity + "|other",
                                 directory=str(tmp_path))
    other.get(PROMPTS[:1])
    assert (other.hits, other.misses) == (0, 1)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".npz")]) == 2


def test_cache_keeps_bfloat16(tmp_path):
    import jax.numpy as jnp

    from ng_jax.models.text_cache import PromptEmbeddingCache
    from ng_jax.models.nets.text import TextCond

    def encode(prompts):
        n = len(prompts)
        x = np.arange(n * 6, dtype=np.float32).reshape(n, 3, 2) / 7
        return TextCond(tokens=jnp.asarray(x, jnp.bfloat16), pooled=jnp.ones((n, 4), jnp.bfloat16),
                        mask=jnp.ones((n, 3), bool))

    a = PromptEmbeddingCache(encode, "toy", directory=str(tmp_path)).get(["x", "y"])
    b = PromptEmbeddingCache(encode, "toy", directory=str(tmp_path)).get(["y", "x"])
    assert b.tokens.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(b.tokens, np.float32), np.asarray(a.tokens, np.float32)[::-1])


@pytest.mark.needs_torch
def test_precision_variants_and_bfloat16(tiny, flux, tmp_path):
    """A diffusers-style dir with model.safetensors + model.fp16.safetensors side by side; bf16 encoders."""
    import jax
    import jax.numpy as jnp

    from ng_jax.models.weights.hf_text import load_text_encoders
    from ng_jax.models.weights.safetensors import WeightsError

    d = tmp_path / "flux"
    shutil.copytree(tiny["flux"], d)
    half = tmp_path / "half"
    tiny["torch"]["flux_clip"].half().save_pretrained(half)
    tiny["torch"]["flux_clip"].float()
    shutil.copy(half / "model.safetensors", d / "text_encoder" / "model.fp16.safetensors")
    enc32, params32 = flux
    want = enc32.encode_prompts(params32, PROMPTS[:2])

    enc, params = load_text_encoders(str(d), "flux", max_sequence_length=T5_LEN)  # model.safetensors by default
    got = enc.encode_prompts(params, PROMPTS[:2])
    np.testing.assert_array_equal(np.asarray(got.pooled), np.asarray(want.pooled))

    enc16, params16 = load_text_encoders(str(d), "flux", max_sequence_length=T5_LEN, variant="fp16",
                                         dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert enc16.identity != enc32.identity
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params16))
    got = enc16.encode_prompts(params16, PROMPTS[:2])
    assert got.tokens.dtype == jnp.bfloat16 and got.pooled.dtype == jnp.bfloat16
    for a, b in ((got.tokens, want.tokens), (got.pooled, want.pooled)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.all(np.isfinite(a)) and _max_err(a, b) <= 0.05 * float(np.max(np.abs(b)))
    with pytest.raises(WeightsError, match="model.bf16.safetensors"):
        load_text_encoders(str(d), "flux", variant="bf16")
