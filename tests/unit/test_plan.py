"""The ahead-of-time memory plan (ng_jax.plan) on a tiny SD3.5-style transformer, 8 fake CPU devices."""
import json

import pytest

from ng_jax import plan

CONFIG = "ng_jax/configs/sd35m_awm_normguard.py"
# A tiny SD3.5 (qk-norm, two dual-attention blocks, scanned) as its transformer/config.json.
TINY = {"_class_name": "SD3Transformer2DModel", "patch_size": 2, "attention_head_dim": 8, "num_attention_heads": 2,
        "joint_attention_dim": 32, "caption_projection_dim": 16, "pooled_projection_dim": 32, "sample_size": 16,
        "in_channels": 16, "out_channels": 16, "num_layers": 5, "pos_embed_max_size": 12, "qk_norm": "rms_norm",
        "dual_attention_layers": [0, 1]}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_sd35")
    (root / "transformer").mkdir()
    (root / "transformer" / "config.json").write_text(json.dumps(TINY))
    return str(root)


def run(tiny_dir, capsys, *args):
    argv = ["ng_jax.plan", f"--config={CONFIG}", f"--config.model.weights_dir={tiny_dir}",
            "--config.model.resolution=64", "--config.model.text.max_sequence_length=8",
            "--config.rl.train_batch=32", "--per_device_batch=1", "--json", *args]  # 1 micro-batch of 8
    assert plan.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_compiled_step_memory_matches_the_shardings_and_decides_the_fit(tiny_dir, capsys):
    r = run(tiny_dir, capsys, "--chips=8", "--hbm_gib=1")
    assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and r["micro_batch"] == r["train_batch"] == 8
    x, sh = r["xla"], r["bytes_from_shardings"]
    # XLA's argument bytes per device are the state + reference + batch shards the shardings give.
    assert abs(x["argument"] - sh["total"]) <= 0.03 * sh["total"]
    assert x["alias"] > 0.9 * (sh["trainable"] + sh["ema"] + sh["opt_state"])  # the donated state
    assert x["peak"] == x["argument"] + x["temp"] + x["output"] - x["alias"] and r["fits"] is True
    below, above = 0.5 * x["peak"] / plan.GIB, 2.0 * x["peak"] / plan.GIB
    assert not plan.fits(x["peak"], below) and plan.fits(x["peak"], above)
    assert "DOES NOT FIT" in plan.report(r, below) and "FITS: peak" in plan.report(r, above)
    assert r["compile_s"] > 0 and r["lora_rank"] == 32


def test_fsdp_splits_what_data_parallelism_replicates(tiny_dir, capsys):
    fsdp = run(tiny_dir, capsys, "--chips=8", "--no_compile", "--full")
    dp = run(tiny_dir, capsys, "--chips=8", "--no_compile", "--full", "--config.mesh.shape=(8,1,1)")
    assert fsdp["lora_rank"] == 0 and dp["mesh"]["data"] == 8
    for part in ("trainable", "opt_state", "reference"):
        ratio = dp["bytes_from_shardings"][part] / fsdp["bytes_from_shardings"][part]
        assert 7.0 < ratio <= 8.0, (part, ratio)  # ~1/8 per device; only small norm scales stay whole
    assert dp["replicated_fraction"]["trainable"] == 1.0 and fsdp["replicated_fraction"]["trainable"] < 0.05


def test_topologies_and_bad_inputs(tiny_dir, capsys):
    assert plan.parse_topology("v5p-512") == (256, 95.0)
    assert plan.parse_topology("v5litepod-64") == (64, 16.0)
    assert plan.parse_topology("v4-128") == (64, 32.0) and plan.parse_topology("v6e-256") == (256, 32.0)
    assert plan.parse_topology("h100x8") == (8, 80.0)
    for args, message in ((["--topology=v9-8"], "unknown topology 'v9-8'"),
                          (["--chips=8", "--config.mesh.shape=(3,-1,1)"], "does not divide 8 devices"),
                          (["--chips=16"], "already initialised with 8 CPU devices"),
                          (["--chips=8", "--topology=v5p-16", "--attention=cudnn"], "needs an NVIDIA GPU"),
                          (["--chips=8", "--topology=h100x8", "--attention=splash"], "needs a TPU"),
                          (["--chips=8", "--attention=flash"], "expected one of"),
                          ([], "give --topology")):
        assert plan.main(["ng_jax.plan", f"--config={CONFIG}", f"--config.model.weights_dir={tiny_dir}", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_fused_attention_drops_the_logits_from_the_plan(tiny_dir, capsys):
    ref = run(tiny_dir, capsys, "--chips=8", "--topology=v5p-16", "--attention=reference")
    fused = run(tiny_dir, capsys, "--chips=8", "--topology=v5p-16")  # auto on a TPU topology: splash
    gpu = run(tiny_dir, capsys, "--chips=8", "--topology=h100x8", "--no_compile")
    assert ref["attention"]["runs_as"] == "reference" and not ref["attention"]["fused"]
    assert fused["attention"] == dict(fused["attention"], choice="auto", runs_as="splash", fused=True,
                                      compiled_as="plan_standin")
    assert gpu["attention"]["runs_as"] == "cudnn"  # the config computes in bf16
    # 64 px -> 8x8 latents -> 4x4 patches = 16 image tokens, + 77 CLIP + 8 T5 tokens; 1 row x 2 heads, float32.
    assert ref["attention"]["tokens"] == 101 and ref["attention"]["logits_per_call"] == 1 * 2 * 101 * 101 * 4
    assert fused["xla"]["temp"] < ref["xla"]["temp"] and fused["xla"]["argument"] == ref["xla"]["argument"]
    assert "fused: no [B, heads, Lq, Lk] logits" in plan.report(fused, 95.0)
