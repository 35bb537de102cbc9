"""CLIP score, PickScore and HPSv2 rewards (ng_jax.rewards.clip) against direct torch computations.

Tiny random transformers `CLIPModel`s are saved with `save_pretrained` next to a tiny CLIP
tokenizer and a `CLIPImageProcessor` config (tests.fixtures.save_tiny_clip). The reference scores follow each
reward's reference code with torch: transformers' CLIPImageProcessor + CLIPModel features for
CLIP score / PickScore; for HPSv2 an open_clip-style forward (torch `nn.MultiheadAttention` fed the
open_clip `in_proj_weight`s) run directly on the open_clip-named state dict, which the converter
must turn back into the original transformers tensors.
"""
import json
import os
import shutil
import threading

import numpy as np
import pytest

from tests.fixtures import CLIP_IMAGE as IMAGE
from tests.fixtures import save_tiny_clip, tiny_clip_config, write_clip_tokenizer

PROMPTS = ["the red cat", "a dog", "the red dog on a cat", "a photo of the cat " * 12]  # the last is truncated


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("clip_rewards")
    return {"root": root, "quick": str(root / "quick"), "gelu": str(root / "gelu"),
            "models": {"quick": save_tiny_clip(root / "quick", "quick_gelu", 0),
                       "gelu": save_tiny_clip(root / "gelu", "gelu", 1)}}


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    # square, landscape and portrait with odd crop margins, a large one: every resize/crop path
    shapes = [(64, 64), (40, 51), (45, 32), (96, 96)]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def torch_hf_scores(model, directory, images, prompts, scale):
    """The reference: transformers' CLIPImageProcessor + tokenizer + CLIPModel features, scale * cosine."""
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPTokenizer

    proc = CLIPImageProcessor.from_pretrained(directory)
    tok = CLIPTokenizer.from_pretrained(directory)
    pixels = proc(images=[Image.fromarray(x) for x in images], return_tensors="pt")["pixel_values"]
    text = tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        i = model.get_image_features(pixel_values=pixels)
        t = model.get_text_features(**text)
    i, t = i / i.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
    return (scale * (i * t).sum(-1)).numpy()


@pytest.mark.needs_torch
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_clip_score_and_pickscore_match_torch(tiny, images, backend):
    from PIL import Image

    from ng_jax.rewards.clip import ClipScore, PickScore
    from ng_jax.rewards.host import Reward

    batch = np.stack([np.asarray(Image.fromarray(x).resize((64, 64))) for x in images])  # one batch: equal sizes
    for cls, key, scale in ((ClipScore, "quick", 100.0), (PickScore, "gelu", None)):
        reward = cls(tiny[key], backend=backend)
        assert isinstance(reward, Reward) and reward.name in ("clip_score", "pickscore")
        model = tiny["models"][key]
        want_scale = 100.0 if scale else float(model.logit_scale.detach().exp())
        assert abs(reward.scale - want_scale) < 1e-4
        assert abs(float(model.logit_scale.detach().exp()) - 100.0) > 1  # exp(4.3): the two conventions differ here
        got = reward(batch, PROMPTS)
        ref = torch_hf_scores(model, tiny[key], list(batch), PROMPTS, want_scale)
        assert got.dtype == np.float32 and got.shape == (4,) and np.all(np.isfinite(got))
        err = float(np.max(np.abs(got - ref)))
        print(f"{reward.name}[{backend}] max abs error {err:.1e} (scores {np.round(got, 3)})")
        assert err <= 1e-4 * want_scale
        assert np.ptp(got) > 1e-3 * want_scale  # scores depend on the pair


@pytest.mark.needs_torch
def test_preprocessing_matches_transformers_image_processor(tiny, images):
    from PIL import Image
    from transformers import CLIPImageProcessor

    from ng_jax.rewards.clip import preprocess_images

    proc = CLIPImageProcessor.from_pretrained(tiny["quick"])
    wide = CLIPImageProcessor(size={"shortest_edge": 41}, crop_size={"height": IMAGE, "width": IMAGE})
    for x in images:
        ref = proc(images=[Image.fromarray(x)], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        got = preprocess_images(x[None], IMAGE, crop_rounding="floor")[0]
        assert got.shape == (IMAGE, IMAGE, 3)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
        ref = wide(images=[Image.fromarray(x)], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        np.testing.assert_allclose(preprocess_images(x[None], IMAGE, resize=41)[0], ref, rtol=0, atol=1e-5)
    # torchvision's CenterCrop rounds the offset: a 32 x 35 image keeps columns 2..33, not 1..32
    x = np.random.default_rng(1).integers(0, 256, (32, 35, 3), dtype=np.uint8)
    floor, rnd = (preprocess_images(x[None], 32, crop_rounding=r)[0] for r in ("floor", "round"))
    np.testing.assert_array_equal(floor, preprocess_images(x[None, :, 1:33], 32)[0])
    np.testing.assert_array_equal(rnd, preprocess_images(x[None, :, 2:34], 32)[0])


# ------------------------------------------------------------------------------------------ HPSv2


def to_open_clip(model):
    """A transformers CLIPModel's weights under open_clip's names (written here, independently of the converter)."""
    import torch

    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {"token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           "text_projection": sd["text_projection.weight"].T.contiguous(),
           "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
           "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
           "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
           "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
           "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
           "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
           "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
           "visual.proj": sd["visual_projection.weight"].T.contiguous(),
           "logit_scale": sd["logit_scale"]}
    for src, dst in (("text_model", "transformer"), ("vision_model", "visual.transformer")):
        for i in range(2):
            s, d = f"{src}.encoder.layers.{i}.", f"{dst}.resblocks.{i}."
            out[d + "attn.in_proj_weight"] = torch.cat([sd[f"{s}self_attn.{p}_proj.weight"] for p in "qkv"])
            out[d + "attn.in_proj_bias"] = torch.cat([sd[f"{s}self_attn.{p}_proj.bias"] for p in "qkv"])
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{d}{a}.weight"], out[f"{d}{a}.bias"] = sd[f"{s}{b}.weight"], sd[f"{s}{b}.bias"]
    return out


def open_clip_features(sd, pixels, ids, heads=2):
    """open_clip's CLIP.encode_image / encode_text (ViT, pre-LN resblocks with nn.MultiheadAttention and
    nn.GELU, class-token pooling, text pooled at argmax(ids)), then L2-normalised, as open_clip returns them."""
    import torch
    import torch.nn.functional as F

    def transformer(x, prefix, causal):
        n = x.shape[1]
        mask = torch.full((n, n), float("-inf")).triu(1) if causal else None
        i = 0
        while f"{prefix}.{i}.ln_1.weight" in sd:
            p = f"{prefix}.{i}."
            attn = torch.nn.MultiheadAttention(x.shape[-1], heads, batch_first=True)
            attn.load_state_dict({k: sd[p + "attn." + k] for k in
                                  ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")})
            h = F.layer_norm(x, x.shape[-1:], sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
            x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
            h = F.layer_norm(x, x.shape[-1:], sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
            h = F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
            x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
            i += 1
        return x

    with torch.no_grad():
        x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=sd["visual.conv1.weight"].shape[-1])
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1)
        x = x + sd["visual.positional_embedding"]
        x = F.layer_norm(x, x.shape[-1:], sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
        x = transformer(x, "visual.transformer.resblocks", causal=False)
        x = F.layer_norm(x[:, 0], x.shape[-1:], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
        image = x @ sd["visual.proj"]
        t = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
        t = transformer(t, "transformer.resblocks", causal=True)
        t = F.layer_norm(t, t.shape[-1:], sd["ln_final.weight"], sd["ln_final.bias"])
        text = t[torch.arange(t.shape[0]), ids.argmax(-1)] @ sd["text_projection"]
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


@pytest.fixture(scope="module")
def hps(tiny):
    from ng_jax.rewards.open_clip_convert import convert_open_clip_checkpoint

    model = tiny["models"]["gelu"]
    sd = to_open_clip(model)
    path = str(tiny["root"] / "hps_open_clip.pt")
    import torch

    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)  # as HPSv2 training saves it
    config = tiny_clip_config(write_clip_tokenizer(str(tiny["root"] / "tok")), "gelu").to_dict()
    out = convert_open_clip_checkpoint(path, str(tiny["root"] / "hps"), tiny["gelu"],
                                       config={k: config[k] for k in ("text_config", "vision_config",
                                                                      "projection_dim")})
    return {"model": model, "open_clip": sd, "dir": out, "checkpoint": path}


@pytest.mark.needs_torch
def test_open_clip_converter_round_trips(hps, tmp_path, monkeypatch):
    from safetensors.numpy import load_file

    from ng_jax.rewards import open_clip_convert

    converted = load_file(os.path.join(hps["dir"], "model.safetensors"))
    original = {k: v.numpy() for k, v in hps["model"].state_dict().items()}
    assert set(converted) == set(original)
    for k in original:
        np.testing.assert_array_equal(converted[k], original[k], err_msg=k)
    assert {"config.json", "preprocessor_config.json", "vocab.json"} <= set(os.listdir(hps["dir"]))
    # the CLI (with the tiny config standing in for the ViT-H-14 default)
    config = json.loads(open(os.path.join(hps["dir"], "config.json")).read())
    monkeypatch.setattr(open_clip_convert, "OPEN_CLIP_VIT_H_14", {k: config[k] for k in ("text_config", "vision_config",
                                                                            "projection_dim")})
    open_clip_convert.main([hps["checkpoint"], "--tokenizer", hps["dir"], "--out", str(tmp_path / "cli")])
    again = load_file(str(tmp_path / "cli" / "model.safetensors"))
    assert all(np.array_equal(again[k], converted[k]) for k in converted)


@pytest.mark.needs_torch
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_hpsv2_matches_open_clip_computation(tiny, hps, backend):
    import torch

    from ng_jax.rewards.clip import HPSv2, preprocess_images

    reward = HPSv2(hps["dir"], backend=backend)
    assert reward.name == "hpsv2" and reward.scale == 1.0 and reward.crop_rounding == "round"
    batch = np.random.default_rng(2).integers(0, 256, (4, 40, 43, 3), dtype=np.uint8)  # odd crop margin after resize
    got = reward(batch, PROMPTS)
    pixels = torch.from_numpy(preprocess_images(batch, IMAGE, crop_rounding="round").transpose(0, 3, 1, 2).copy())
    ids = torch.tensor(reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=77)["input_ids"])
    img, txt = open_clip_features(hps["open_clip"], pixels, ids)
    ref = (img * txt).sum(-1).numpy()  # HPSv2: diag(image_features @ text_features.T), no x100
    err = float(np.max(np.abs(got - ref)))
    print(f"hpsv2[{backend}] max abs error {err:.1e} (scores {np.round(got, 4)})")
    assert got.dtype == np.float32 and got.shape == (4,) and np.all(np.isfinite(got)) and np.all(np.abs(got) <= 1)
    assert err <= 1e-5


@pytest.mark.needs_torch
def test_mismatched_weights_give_clear_errors(tiny, hps, tmp_path):
    from ng_jax.rewards.clip import ClipScore, ClipWeightsError, HPSv2, PickScore
    from ng_jax.rewards.open_clip_convert import convert_open_clip_checkpoint, open_clip_to_transformers

    with pytest.raises(ClipWeightsError, match="no config.json"):
        ClipScore(str(tmp_path / "nowhere"), backend="numpy")
    with pytest.raises(ClipWeightsError, match="is a file.*converted"):
        HPSv2(hps["checkpoint"], backend="numpy")
    # a text-only CLIP directory
    from transformers import CLIPTextModel

    CLIPTextModel(tiny["models"]["quick"].config.text_config).save_pretrained(tmp_path / "text_only")
    with pytest.raises(ClipWeightsError, match="model_type 'clip_text_model'"):
        PickScore(str(tmp_path / "text_only"), backend="numpy")
    # weights that do not fit their config.json (here: another patch size)
    bad = tmp_path / "bad"
    shutil.copytree(tiny["quick"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vision_config"]["patch_size"] = 4
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ClipWeightsError, match="mis-shaped.*patch_embedding"):
        ClipScore(str(bad), backend="numpy")
    # PickScore's own dir has no tokenizer: say so
    nontok = tmp_path / "notok"
    shutil.copytree(tiny["gelu"], nontok)
    for f in ("vocab.json", "merges.txt", "tokenizer.json"):
        if (nontok / f).exists():
            (nontok / f).unlink()
    with pytest.raises(ClipWeightsError, match="tokenizer_dir"):
        PickScore(str(nontok), backend="numpy")
    assert PickScore(str(nontok), backend="numpy", tokenizer_dir=tiny["gelu"]).name == "pickscore"
    # the converter is strict: an unknown key, a missing key, a wrong config
    import torch

    sd = {k: v.numpy() for k, v in hps["open_clip"].items()}
    config = hps["model"].config
    with pytest.raises(ClipWeightsError, match="unused.*visual.ls_1"):
        open_clip_to_transformers({**sd, "visual.ls_1.gamma": np.ones(32, np.float32)}, config)
    with pytest.raises(ClipWeightsError, match="missing.*ln_final.bias"):
        open_clip_to_transformers({k: v for k, v in sd.items() if k != "ln_final.bias"}, config)
    with pytest.raises(ClipWeightsError, match="missing.*logit_scale"):
        open_clip_to_transformers({k: v for k, v in sd.items() if k != "logit_scale"}, config)
    with pytest.raises(ClipWeightsError):  # the ViT-H-14 default config does not fit the tiny weights
        convert_open_clip_checkpoint({k: torch.as_tensor(v).numpy() for k, v in sd.items()}, str(tmp_path / "h"),
                                     tiny["gelu"])


@pytest.mark.needs_torch
def test_rewards_in_weighted_rewards_and_threads(tiny, images):
    from ng_jax.rewards.clip import ClipScore, PickScore
    from ng_jax.rewards.host import WeightedRewards

    batch = np.stack([x[:32, :32] for x in images])
    clip, pick = ClipScore(tiny["quick"], backend="numpy"), PickScore(tiny["gelu"], backend="numpy")
    weighted = WeightedRewards({"clip_score": clip, "pickscore": pick}, {"clip_score": 0.5, "pickscore": 1.0},
                               timeout_s=60)
    total, parts = weighted.score_host(batch, PROMPTS)
    np.testing.assert_allclose(total, 0.5 * parts["clip_score"] + parts["pickscore"], rtol=1e-6)
    # concurrent calls (the jax bridge scores device shards in parallel) give the same scores
    results = [None] * 4

    def run(i):
        results[i] = clip(batch, PROMPTS[i:] + PROMPTS[:i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        np.testing.assert_allclose(results[i], clip(batch, PROMPTS[i:] + PROMPTS[:i]), rtol=0, atol=1e-5)
    # text features are cached per prompt: a second call does not tokenise again
    assert set(clip._text_cache) == set(PROMPTS)
    before = clip(batch, PROMPTS)
    clip.tokenizer = None
    np.testing.assert_allclose(clip(batch[::-1], PROMPTS[::-1])[::-1], before, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="one prompt per image"):
        clip(batch, PROMPTS[:2])
    with pytest.raises(ValueError, match="uint8"):
        clip(batch.astype(np.float32), PROMPTS)


@pytest.mark.needs_torch
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_clip_reward_in_per_shard_callbacks(tiny, backend):
    """The RL path: scored inside the per-device callbacks of an outer jit on the 8-device CPU mesh
    (a reward running JAX there would deadlock; the timeout turns a hang into an error)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from ng_jax.rewards.clip import ClipScore
    from ng_jax.rewards.host import PromptTable, WeightedRewards, images_to_uint8, make_reward_fn

    mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    spec = P(("data", "fsdp"))
    clip = ClipScore(tiny["quick"], backend=backend)
    fn = make_reward_fn(WeightedRewards({"clip_score": clip}, {"clip_score": 1.0}, timeout_s=60),
                        PromptTable(PROMPTS), mesh, spec)
    ids = np.arange(16, dtype=np.int32) % len(PROMPTS)
    images = np.random.default_rng(3).uniform(-1, 1, (16, IMAGE, IMAGE, 3)).astype(np.float32)
    sh = NamedSharding(mesh, spec)
    total, parts = jax.jit(lambda x, i: fn(x, i))(jax.device_put(images, sh), jax.device_put(ids, sh))
    u8 = np.asarray(images_to_uint8(jax.numpy.asarray(images)))  # what the bridge hands the host
    np.testing.assert_allclose(np.asarray(total), clip(u8, [PROMPTS[i] for i in ids]), rtol=0, atol=1e-3)
    assert np.asarray(parts).shape == (16, 1)


def test_clip_rewards_by_name_from_the_rl_config(tiny, images):
    """`rewards.weights.clip_score` in an RL config builds the reward from `rewards.clip_score_dir`."""
    from ng_jax.config import methods
    from ng_jax.rewards.registry import build_rewards
    from ng_jax.rewards.clip import ClipScore

    cfg = methods.rl_config("awm").rewards
    cfg.weights = {"clip_score": 1.0}
    with pytest.raises(ValueError, match="rewards.clip_score_dir"):
        build_rewards(cfg)
    cfg.clip_score_dir = tiny["quick"]
    cfg.clip_backend = "numpy"
    weighted = build_rewards(cfg)
    images = np.stack([images[0], images[3][:64, :64]])  # one batch, one size
    prompts = ["a red circle"] * len(images)
    total, parts = weighted.score_host(images, prompts)
    np.testing.assert_allclose(total, ClipScore(cfg.clip_score_dir, backend="numpy")(images, prompts), rtol=1e-6)


@pytest.mark.needs_torch
@pytest.mark.parametrize("act, cls", [("quick", "ClipScore"), ("gelu", "PickScore"), ("quick", "HPSv2")])
@pytest.mark.parametrize("hw", [(IMAGE, IMAGE), (2 * IMAGE + 5, 2 * IMAGE + 5)])
def test_the_device_path_equals_the_host_path(tiny, act, cls, hw):
    """`device_fn`: the image tower jitted on the devices, on float samples in [-1, 1], scores as the host path
    scores the same samples after their conversion to uint8 (to 1e-4), at the model's size and larger (Pillow's
    bicubic downscale and the centre crop, reproduced on the devices)."""
    import jax
    import jax.numpy as jnp

    from ng_jax.rewards import clip
    from ng_jax.sampling import to_uint8

    reward = getattr(clip, cls)(tiny[act], backend="numpy")
    x = jax.random.uniform(jax.random.key(0), (4, *hw, 3), minval=-1.1, maxval=1.1)
    host = reward(np.asarray(to_uint8(x)), PROMPTS)
    device = jax.jit(reward.device_fn())(x, jnp.asarray(reward.text_features(PROMPTS)))
    np.testing.assert_allclose(np.asarray(device), host, rtol=1e-4, atol=1e-4 * reward.scale)
    assert np.ptp(host) > 1e-3 * reward.scale  # distinct images and prompts, distinct scores


@pytest.mark.needs_torch
@pytest.mark.slow
def test_rewards_placed_on_the_devices_train_as_the_host_path(tiny, tiny_reference, tmp_path, monkeypatch):
    """rewards.placement.clip_score=device: the CLIP score runs jitted on the 8-device mesh inside the rollout,
    beside a host-callback reward; the run's per-epoch rewards and parts equal the all-host run's (same seed,
    so the same prompts, noise and images as long as the rewards agree)."""
    import ml_collections as mlc

    from ng_jax.logs import read_metrics
    from ng_jax.rewards.registry import build_rewards
    from ng_jax.rl import loop
    from tests.fixtures import tiny_rl_config

    from ng_jax.rewards.clip import ClipSimilarityReward

    scored = []  # images the host path embeds (rollouts and evaluations on the host; evaluations only on device)
    host_features = ClipSimilarityReward.image_features
    monkeypatch.setattr(ClipSimilarityReward, "image_features",
                        lambda self, images: scored.append(len(images)) or host_features(self, images))
    runs, counts = {}, {}
    for place in ("host", "device"):
        scored.clear()
        c = tiny_rl_config(tiny_reference.bundle, tiny_reference.prompts, epochs=2, quality=False,
                           rewards={"clip_score": 1.0, "jpeg_compressibility": 0.01})
        c.rewards.update(clip_score_dir=tiny["quick"], clip_backend="numpy")
        c.rewards.placement = mlc.ConfigDict({"clip_score": place})
        assert loop.run(c, str(tmp_path / place)) == 0
        runs[place] = [m for m in read_metrics(str(tmp_path / place / "metrics.jsonl")) if "train/reward" in m]
        counts[place] = sum(scored)
    assert len(runs["device"]) == 2
    assert counts["host"] - counts["device"] == 2 * 16  # the two epochs' 16 rollouts left the host path
    for h, d in zip(runs["host"], runs["device"]):
        for key in ("train/reward", "train/reward/clip_score", "train/reward/jpeg_compressibility", "train/loss"):
            assert d[key] == pytest.approx(h[key], rel=1e-4, abs=1e-5), key
    c.rewards.placement = mlc.ConfigDict({"jpeg_compressibility": "device"})
    with pytest.raises(Exception, match="cannot run on the devices"):
        build_rewards(c.rewards)
