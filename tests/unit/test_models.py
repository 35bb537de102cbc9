"""Text encoder, tokenizer, MMDiT and LoRA on tiny configs (one compile per function, shared)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ng_jax import sharding
from ng_jax.models.nets import layers
from ng_jax.models.nets.lora import lora_init, lora_merge
from ng_jax.models.nets.text import EMPTY_PROMPT, TextCond, TokenizeError, make_text_encoder, tokenize
from ng_jax.models.velocity import make_velocity_model
from tests.fixtures import tiny_model_cfg, tiny_text_cfg


@pytest.fixture(scope="module")
def text():
    return make_text_encoder(tiny_text_cfg())


@pytest.fixture(scope="module")
def text_params(text):
    return text.init(jax.random.key(0))


@pytest.fixture(scope="module")
def model():
    return make_velocity_model(tiny_model_cfg())


@pytest.fixture(scope="module")
def perturbed(model):
    """Parameters with the zero-initialised (adaLN-Zero, proj_out) weights randomised, so the network is
    not the identity/zero map and every path is exercised."""
    params = model.init(jax.random.key(1))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def apply(model):
    return jax.jit(model.apply)


def test_tokenizer_pads_adds_specials_and_rejects_unknown_words(text):
    ids, mask = tokenize(text.tokenizer, ["a red circle", EMPTY_PROMPT, "Two Blue Squares"])
    assert ids.shape == mask.shape == (3, 16) and ids.dtype == np.int32 and mask.dtype == bool
    tok = text.tokenizer
    assert list(ids[0, :5]) == [tok.bos_token_id, tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("red"),
                                tok.convert_tokens_to_ids("circle"), tok.eos_token_id]
    assert mask[0].sum() == 5 and mask[1].sum() == 2 and mask[2].sum() == 5  # lower-cased, not [UNK]
    assert (ids[~mask] == tok.pad_token_id).all()
    with pytest.raises(TokenizeError, match="dog"):
        tokenize(tok, ["a red dog"])
    with pytest.raises(TokenizeError, match="at most 16"):
        tokenize(tok, [" ".join(["red"] * 20)])


def test_every_grammar_prompt_tokenizes_within_max_length(text):
    from ng_jax.data import prompts as P

    all_prompts = [p for c in P.CATEGORIES for p in P.all_prompts(c)]
    _, mask = tokenize(text.tokenizer, all_prompts)
    assert mask.sum(1).max() <= 16


def test_text_encoder_shapes_and_padding_invariance(text, text_params):
    encode = jax.jit(text.encode)
    ids, mask = tokenize(text.tokenizer, ["a red circle", "a blue square left of a red circle"])
    cond = encode(text_params, ids, mask)
    assert isinstance(cond, TextCond)
    assert cond.tokens.shape == (2, 16, 16) and cond.pooled.shape == (2, 16) and cond.mask.shape == (2, 16)
    # What sits in padded positions must not change the real tokens or the pooled embedding.
    junk = np.where(mask, ids, 7)
    cond2 = encode(text_params, junk, mask)
    np.testing.assert_allclose(np.asarray(cond.pooled), np.asarray(cond2.pooled), atol=1e-6)
    np.testing.assert_allclose(np.asarray(cond.tokens)[mask], np.asarray(cond2.tokens)[mask], atol=1e-6)
    assert not np.allclose(cond.pooled[0], cond.pooled[1])


def test_mmdit_parameter_names_follow_diffusers(model):
    params = model.init(jax.random.key(0))
    flat = {"/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    for name in ("pos_embed/proj/kernel", "time_text_embed/timestep_embedder/linear_1/kernel",
                 "time_text_embed/text_embedder/linear_2/bias", "context_embedder/kernel",
                 "transformer_blocks_0/norm1/linear/kernel", "transformer_blocks_0/attn/to_q/kernel",
                 "transformer_blocks_0/attn/add_k_proj/kernel", "transformer_blocks_0/attn/to_add_out/kernel",
                 "transformer_blocks_0/ff/net_0/proj/kernel", "transformer_blocks_0/ff_context/net_2/kernel",
                 "transformer_blocks_1/norm1_context/linear/kernel", "norm_out/linear/kernel", "proj_out/kernel"):
        assert name in flat, name
    # The last block is context-pre-only: no context output projection, no context MLP.
    assert not any(n.startswith("transformer_blocks_1/attn/to_add_out") for n in flat)
    assert not any(n.startswith("transformer_blocks_1/ff_context") for n in flat)


def test_mmdit_starts_at_zero_and_responds_to_inputs(model, apply, perturbed, text, text_params):
    ids, mask = tokenize(text.tokenizer, ["a red circle", "a blue square"])
    cond = text.encode(text_params, ids, mask)
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    sigma = jnp.array([0.3, 0.3])
    v0 = apply(model.init(jax.random.key(1)), x, sigma, cond)
    assert v0.shape == x.shape and float(jnp.abs(v0).max()) == 0.0  # adaLN-Zero + zero proj_out
    v = apply(perturbed, x, sigma, cond)
    assert float(jnp.abs(v).max()) > 1e-3
    v_sigma = apply(perturbed, x, jnp.array([0.8, 0.8]), cond)
    assert float(jnp.abs(v - v_sigma).max()) > 1e-4
    swapped = jax.tree.map(lambda a: a[::-1], cond)
    v_swap = apply(perturbed, x, sigma, swapped)
    assert float(jnp.abs(v - v_swap).max()) > 1e-4
    # Batch elements are independent: sample 0 alone gives the same velocity.
    v_single = apply(perturbed, x[:1], sigma[:1], jax.tree.map(lambda a: a[:1], cond))
    np.testing.assert_allclose(np.asarray(v_single), np.asarray(v[:1]), atol=1e-5)


def test_mmdit_ignores_padded_text_tokens(apply, perturbed, text, text_params):
    ids, mask = tokenize(text.tokenizer, ["a red circle"])
    cond = text.encode(text_params, ids, mask)
    noisy = cond.replace(tokens=jnp.where(cond.mask[..., None], cond.tokens, 100.0))
    x = jax.random.normal(jax.random.key(4), (1, 8, 8, 3))
    np.testing.assert_allclose(np.asarray(apply(perturbed, x, jnp.array([0.5]), cond)),
                               np.asarray(apply(perturbed, x, jnp.array([0.5]), noisy)), atol=1e-5)


def test_remat_and_bf16_match_float32(perturbed, text, text_params):
    ids, mask = tokenize(text.tokenizer, ["a red circle"])
    cond = text.encode(text_params, ids, mask)
    x = jax.random.normal(jax.random.key(5), (1, 8, 8, 3))
    s = jnp.array([0.5])

    def loss(model, p):
        return jnp.sum(jnp.square(model.apply(p, x, s, cond)))

    base, remat = make_velocity_model(tiny_model_cfg()), make_velocity_model(tiny_model_cfg(remat=True))
    g1, g2 = jax.grad(lambda p: loss(base, p))(perturbed), jax.grad(lambda p: loss(remat, p))(perturbed)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    bf16 = make_velocity_model(tiny_model_cfg(dtype="bfloat16"))
    v32, v16 = base.apply(perturbed, x, s, cond), bf16.apply(perturbed, x, s, cond)
    assert v16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(v32 - v16) / jnp.linalg.norm(v32))
    assert rel < 0.05


def test_bad_model_configs_are_named():
    with pytest.raises(ValueError, match="patch_size"):
        make_velocity_model(tiny_model_cfg(image_size=9))
    with pytest.raises(ValueError, match="family"):
        make_velocity_model(tiny_model_cfg(family="unet"))
    with pytest.raises(ValueError, match="dtype"):
        make_velocity_model(tiny_model_cfg(dtype="float8"))


def test_lora_starts_at_base_and_merges_low_rank_update(model, perturbed):
    targets = ("attn/(to_q|to_v)",)
    lora = lora_init(perturbed, jax.random.key(0), rank=2, alpha=4.0, targets=targets)
    assert set(lora["transformer_blocks_0"]["attn"]) == {"to_q", "to_v"}
    merged = lora_merge(perturbed, lora, alpha=4.0, rank=2)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(perturbed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lora = jax.tree.map(lambda x: x + 0.1, lora)
    merged = lora_merge(perturbed, lora, alpha=4.0, rank=2)
    a, b = lora["transformer_blocks_1"]["attn"]["to_q"]["lora_a"], lora["transformer_blocks_1"]["attn"]["to_q"]["lora_b"]
    want = perturbed["transformer_blocks_1"]["attn"]["to_q"]["kernel"] + 2.0 * a @ b
    np.testing.assert_allclose(np.asarray(merged["transformer_blocks_1"]["attn"]["to_q"]["kernel"]), np.asarray(want),
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(merged["transformer_blocks_1"]["attn"]["to_k"]["kernel"]),
                                  np.asarray(perturbed["transformer_blocks_1"]["attn"]["to_k"]["kernel"]))
    with pytest.raises(ValueError, match="match no Dense"):
        lora_init(perturbed, jax.random.key(0), rank=2, alpha=4.0, targets=("nothing_here",))


def test_lora_on_scanned_kernel_stacks_is_per_layer():
    from ng_jax.models.nets.lora import lora_init, lora_merge

    rng = np.random.default_rng(0)
    base = {"blocks": {"attn": {"to_q": {"kernel": jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32),
                                         "bias": jnp.zeros((3, 5))}}},
            "proj": {"kernel": jnp.ones((5, 2))}}
    ad = lora_init(base, jax.random.key(0), rank=2, alpha=4.0, targets=("attn/to_q",))
    assert ad["blocks"]["attn"]["to_q"]["lora_a"].shape == (3, 4, 2)
    assert ad["blocks"]["attn"]["to_q"]["lora_b"].shape == (3, 2, 5)
    ad["blocks"]["attn"]["to_q"]["lora_b"] = jnp.asarray(rng.standard_normal((3, 2, 5)), jnp.float32)
    merged = lora_merge(base, ad, alpha=4.0, rank=2)
    a, b = ad["blocks"]["attn"]["to_q"]["lora_a"], ad["blocks"]["attn"]["to_q"]["lora_b"]
    for layer in range(3):  # each layer gets its own low-rank update
        np.testing.assert_allclose(merged["blocks"]["attn"]["to_q"]["kernel"][layer],
                                   base["blocks"]["attn"]["to_q"]["kernel"][layer] + 2.0 * a[layer] @ b[layer],
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(merged["proj"]["kernel"], base["proj"]["kernel"])


# ----------------------------------------------------------------------------------------------
# Attention implementations (model.attention)


def _qkv(seed=0, b=2, lq=9, lk=13, h=2, d=8):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32) for n in (lq, lk, lk))
    mask = jnp.asarray(np.arange(lk)[None, :] < np.array([[lk], [lk - 5]]))  # row 1: 5 padded keys
    return q, k, v, mask


@pytest.mark.parametrize("lq", [13, 9], ids=["self", "cross"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_xla_attention_matches_the_reference(lq, masked):
    q, k, v, mask = _qkv(lq=lq)
    mask = mask if masked else None
    ref = layers.attention(q, k, v, mask, "reference")
    xla = jax.jit(lambda q, k, v: layers.attention(q, k, v, mask, "xla"))(q, k, v)
    assert xla.shape == ref.shape == q.shape
    np.testing.assert_allclose(np.asarray(xla), np.asarray(ref), atol=1e-5, rtol=0)
    if masked:  # the padded keys do not matter
        v2 = v.at[1, -5:].set(100.0)
        np.testing.assert_allclose(np.asarray(layers.attention(q, k, v2, mask, "xla"))[1], np.asarray(ref)[1],
                                   atol=1e-5, rtol=0)


def test_auto_attention_on_cpu_is_the_reference_path(perturbed, text, text_params):
    assert jax.default_backend() == "cpu" and layers.resolve_attention("auto") == "reference"
    assert layers.resolve_attention("auto", "tpu") == "splash"
    assert layers.resolve_attention("auto", "gpu", jnp.bfloat16, 64) == "cudnn"
    assert layers.resolve_attention("auto", "gpu", jnp.float32, 64) == "reference"  # cuDNN takes bf16/fp16 only
    q, k, v, mask = _qkv()
    np.testing.assert_array_equal(np.asarray(layers.attention(q, k, v, mask, "auto")),
                                  np.asarray(layers.attention(q, k, v, mask)))
    ids, tmask = tokenize(text.tokenizer, ["a red circle", "two blue squares"])
    cond = text.encode(text_params, ids, tmask)
    x, sigma = jax.random.normal(jax.random.key(3), (2, 8, 8, 3)), jnp.array([0.3, 0.7])
    out = {a: np.asarray(jax.jit(make_velocity_model(tiny_model_cfg(attention=a)).apply)(perturbed, x, sigma, cond))
           for a in ("auto", "reference", "xla")}
    np.testing.assert_array_equal(out["auto"], out["reference"])  # bit-identical on CPU
    np.testing.assert_allclose(out["xla"], out["reference"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("choice, words", [("splash", "needs a TPU"), ("cudnn", "needs an NVIDIA GPU"),
                                           ("flash", "expected one of")])
def test_attention_a_cpu_cannot_run_is_a_one_line_error(choice, words):
    q, k, v, _ = _qkv()
    for call in (lambda: layers.attention(q, k, v, implementation=choice),
                 lambda: make_velocity_model(tiny_model_cfg(attention=choice))):
        with pytest.raises(ValueError) as err:
            call()
        assert len(str(err.value).splitlines()) == 1 and words in str(err.value), str(err.value)


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_splash_kernel_matches_the_reference_in_interpret_mode(masked):
    """The splash path (padding to 128, segment ids for masked keys, q scaling, batch vmap, per-shard under
    the activation rules) through Pallas' interpreter: the kernel itself runs only on TPUs."""
    q, k, v, mask = _qkv(lq=9, lk=13, h=2, d=8)
    mask = mask if masked else None
    ref = np.asarray(layers.attention(q, k, v, mask))
    out = jax.jit(lambda q, k, v: layers._splash_attention(q, k, v, mask, interpret=True))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)
    mesh = sharding.make_mesh((1, 2, 1), jax.devices()[:2])  # batch over fsdp: one example per shard
    with sharding.axis_rules(mesh):
        sharded = jax.jit(lambda q, k, v: layers._splash_attention(q, k, v, mask, interpret=True))(q, k, v)
    np.testing.assert_allclose(np.asarray(sharded), ref, atol=1e-5, rtol=0)


def test_plan_standin_has_attentions_shapes_and_no_logits():
    q, k, v, _ = _qkv(lq=9, lk=13)
    out = layers.attention(q, k, v, implementation=layers.PLAN_STANDIN)
    assert out.shape == q.shape and out.dtype == q.dtype
    text = jax.jit(lambda q, k, v: layers.attention(q, k, v, implementation=layers.PLAN_STANDIN)).lower(
        q, k, v).as_text()
    assert "2x2x9x13" not in text and "2x2x9x13" in jax.jit(layers.attention).lower(q, k, v).as_text()
