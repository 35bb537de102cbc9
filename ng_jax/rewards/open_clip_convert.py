"""Convert an open_clip CLIP checkpoint (HPSv2's HPS_v2[.1]_compressed.pt: an open_clip ViT-H-14 state
dict) into a transformers CLIPModel directory that the CLIP rewards (ng_jax.rewards.clip) read:

    python -m ng_jax.rewards.open_clip_convert HPS_v2_compressed.pt --tokenizer CLIP_H_DIR --out DIR

Every key is mapped and every shape checked; nothing is guessed.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from ng_jax.rewards.clip import CLIP_MEAN, CLIP_STD
from ng_jax.rewards.clip_weights import ClipWeightsError, _torch_load, check_clip_tensors

OPEN_CLIP_VIT_H_14 = {  # open_clip ViT-H-14 (HPSv2 / PickScore backbone) as a transformers CLIPConfig
    "projection_dim": 1024,
    "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                    "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
                    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1, "projection_dim": 1024},
    "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                      "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "hidden_act": "gelu",
                      "layer_norm_eps": 1e-5, "projection_dim": 1024},
}


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
