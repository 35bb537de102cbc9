"""Logical axis names and the rule table (ng_jax.sharding) on tiny real-model trees, 8 CPU devices."""
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ng_jax import sharding

from ng_jax.config import blocks, methods
from ng_jax.models.nets.lora import lora_init
from ng_jax.models.velocity import make_velocity_model

SD35 = dict(family="sd35", patch_size=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
            caption_projection_dim=16, pooled_projection_dim=32, sample_size=16, in_channels=16, out_channels=16,
            num_layers=5, pos_embed_max_size=12, qk_norm="rms_norm", dual_attention_layers=(0, 1))
FLUX = dict(family="flux1_dev", patch_size=1, in_channels=16, out_channels=None, num_layers=2, num_single_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
            guidance_embeds=True, axes_dims_rope=(4, 6, 6), sample_size=(4, 6), max_sequence_length=5)


def sd35_tree(scan=True):
    cfg = ml_collections.ConfigDict(dict(SD35, scan_blocks=scan))
    return jax.eval_shape(lambda: make_velocity_model(cfg).init(jax.random.key(0)))


def flux_tree(scan=True):
    return jax.eval_shape(lambda: make_velocity_model(dict(FLUX, scan_blocks=scan)).init(jax.random.key(0)))


def named(tree):
    return {sharding.path_str(p): a for p, a in
            jax.tree_util.tree_flatten_with_path(sharding.tree_axes(tree), is_leaf=lambda x: x is None
                                                 or isinstance(x, tuple))[0]}


def hf_text_trees():
    from ng_jax.models.nets.hf_text import patch_flax_t5_clip
    from transformers import CLIPTextConfig, FlaxCLIPTextModelWithProjection, FlaxT5EncoderModel, T5Config

    clip = FlaxCLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                          num_attention_heads=2, projection_dim=32, vocab_size=99),
                                           _do_init=False)
    patch_flax_t5_clip()  # jnp.clip lost a_min / a_max (as ng_jax.models.nets.hf_text does before loading T5)
    t5 = FlaxT5EncoderModel(T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, vocab_size=99),
                            _do_init=False)
    from flax.core import unfreeze

    return [unfreeze(jax.eval_shape(lambda m=m: m.init_weights(jax.random.PRNGKey(0), (1, 1)))) for m in (clip, t5)]


def test_every_model_parameter_has_logical_axes():
    from ng_jax.models.nets.text import make_text_encoder

    lora = jax.eval_shape(lambda base: lora_init(base, jax.random.key(1), rank=4, alpha=8.0,
                                                 targets=methods.SD3_LORA_TARGETS), sd35_tree())
    toy = make_velocity_model(blocks.toy_model_config())
    toy_text = make_text_encoder(blocks.toy_text_config())
    trees = {"sd35_scan": sd35_tree(True), "sd35": sd35_tree(False), "flux_scan": flux_tree(True),
             "flux": flux_tree(False), "lora": lora, "toy": jax.eval_shape(toy.init, jax.random.key(0)),
             "toy_text": jax.eval_shape(toy_text.init, jax.random.key(0))}
    trees.update(zip(("clip", "t5"), hf_text_trees()))
    for what, tree in trees.items():
        axes = named(tree)
        missing = [k for k, a in axes.items() if a is None]
        assert not missing, f"{what}: unnamed parameters {missing}"
    s, f, lo = named(trees["sd35_scan"]), named(trees["flux_scan"]), named(lora)
    run = "transformer_blocks_0_to_1/block/"
    assert s[run + "attn/to_q/kernel"] == ("layers", "embed", "heads")
    assert s[run + "attn/to_out_0/kernel"] == ("layers", "heads", "embed")
    assert s[run + "attn/to_out_0/bias"] == ("layers", "embed")
    assert s[run + "attn2/norm_q/weight"] == ("layers", "kv")
    assert s[run + "ff/net_0/proj/kernel"] == ("layers", "embed", "mlp")
    assert s[run + "ff/net_2/kernel"] == ("layers", "mlp", "embed")
    assert s[run + "norm1/linear/kernel"] == ("layers", "embed", "mod")
    assert s["transformer_blocks_4/attn/to_q/kernel"] == ("embed", "heads")  # the unscanned last block
    assert s["pos_embed/proj/kernel"] == (None, None, "channels", "embed")
    assert s["context_embedder/kernel"] == ("channels", "embed")
    assert s["proj_out/kernel"] == ("embed", "channels")
    assert f["single_transformer_blocks/proj_out/kernel"] == ("layers", "mlp", "embed")
    assert f["single_transformer_blocks/proj_mlp/kernel"] == ("layers", "embed", "mlp")
    assert f["transformer_blocks/attn/add_q_proj/kernel"] == ("layers", "embed", "heads")
    assert lo[run + "attn/to_q/lora_a"] == ("layers", "embed", "lora")
    assert lo[run + "attn/to_add_out/lora_b"] == ("layers", "lora", "embed")
    clip, t5 = (named(t) for t in hf_text_trees())
    assert clip["text_model/embeddings/token_embedding/embedding"] == ("vocab", "embed")
    assert clip["text_model/encoder/layers/0/mlp/fc2/kernel"] == ("mlp", "embed")
    assert t5["encoder/block/0/layer/0/SelfAttention/o/kernel"] == ("heads", "embed")
    assert t5["encoder/block/0/layer/1/DenseReluDense/wi/kernel"] == ("embed", "mlp")


def test_rule_table_decides_the_specs():
    mesh = sharding.make_mesh((1, 4, 2))
    tree = sd35_tree()
    q = "transformer_blocks_0_to_1/block/attn/to_q/kernel"   # [layers 2, embed 16, heads 16]
    ff2 = "transformer_blocks_0_to_1/block/ff/net_2/kernel"  # [layers 2, mlp 64, embed 16]
    default = sharding.Layout()
    assert default.spec(q, (2, 16, 16), mesh) == P(None, "fsdp", "tensor")
    assert default.spec(ff2, (2, 64, 16), mesh) == P(None, "tensor", "fsdp")
    swapped = sharding.Layout((("heads", "fsdp"), ("embed", "tensor")))
    assert swapped.spec(q, (2, 16, 16), mesh) == P(None, "tensor", "fsdp")
    assert swapped.spec(ff2, (2, 64, 16), mesh) == P(None, None, "tensor")  # "mlp" has no rule here
    two_axes = sharding.Layout((("embed", ("fsdp", "tensor")),))
    assert two_axes.spec(q, (2, 16, 16), mesh) == P(None, ("fsdp", "tensor"), None)
    # The whole tree on an FSDP mesh: the shardings are NamedShardings of the table's specs.
    sh = default.shardings(tree, sharding.make_mesh((1, 8, 1)))
    assert sh["transformer_blocks_0_to_1"]["block"]["attn"]["to_q"]["kernel"].spec == P(None, "fsdp", None)
    assert sharding.replicated_fraction(tree, sh) < 0.05
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        sharding.Layout((("embed", "model"),)).spec(q, (2, 16, 16), mesh)


def test_non_divisible_dimension_falls_back_and_says_so(caplog):
    mesh = sharding.make_mesh((1, 8, 1))
    caplog.set_level(logging.DEBUG, logger="ng_jax.sharding")
    layout = sharding.Layout()
    # embed 12 is not divisible by 8: the heads dimension (fallback rule ("heads", "fsdp")) takes fsdp.
    assert layout.spec("attn/to_q/kernel", (12, 16), mesh) == P(None, "fsdp")
    assert "not divisible by mesh ('fsdp',) = 8" in caplog.text
    # Nothing divisible: replicated.
    assert layout.spec("attn/to_q/kernel", (12, 6), mesh) == P(None, None)
    assert layout.spec("some/unknown/thing", (16, 16), mesh) == P()
    assert "no logical axes for some/unknown/thing" in caplog.text


def test_reference_table_can_differ_and_overrides_still_apply():
    c = blocks.mesh_config()
    policy, ref = sharding.layouts(c)
    assert policy == ref
    c.ref_logical_rules = (("embed", ("fsdp", "tensor")), ("mlp", "fsdp"))
    policy, ref = sharding.layouts(c)
    mesh = sharding.make_mesh((1, 4, 2))
    path = "transformer_blocks_0_to_1/block/ff/net_0/proj/kernel"
    assert policy.spec(path, (2, 16, 64), mesh) == P(None, "fsdp", "tensor")
    assert ref.spec(path, (2, 16, 64), mesh) == P(None, ("fsdp", "tensor"), None)
    c.rules = (("ff/net_0", "replicate"),)   # the legacy regex rules: overrides, checked first
    policy, ref = sharding.layouts(c)
    assert policy.spec(path, (2, 16, 64), mesh) == ref.spec(path, (2, 16, 64), mesh) == P()
    assert sharding.as_layout([(".*", "fsdp")]).spec(path, (2, 16, 64), mesh) == P(None, None, "fsdp")


def test_replication_check_trips_when_the_table_replicates_everything():
    mesh = sharding.make_mesh((1, 8, 1))
    tree = flux_tree()
    ok = sharding.Layout().shardings(tree, mesh)
    assert sharding.check_replication(tree, ok, 0.1) < 0.1
    nothing = sharding.Layout((("batch", ("data", "fsdp")),)).shardings(tree, mesh)
    with pytest.raises(ValueError, match="replicated on every device"):
        sharding.check_replication(tree, nothing, 0.1)


def test_activation_constraints_only_inside_a_rules_context():
    x = jnp.ones((8, 4, 16))
    assert sharding.constrain(x, ("batch", "seq", "embed")) is x
    mesh = sharding.make_mesh((2, 2, 2))

    def f(x):
        return sharding.constrain(x * 2, ("batch", "seq", "heads"))

    y = jax.jit(sharding.with_rules(f, mesh))(x)
    assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")
    np.testing.assert_array_equal(np.asarray(y), 2.0)
    # An unshardable batch (3 rows on 4 batch devices): no constraint at all.
    z = jax.jit(sharding.with_rules(f, mesh))(jnp.ones((3, 4, 16)))
    assert len(z.sharding.device_set) == 1
