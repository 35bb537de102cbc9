"""Where an RL epoch's time goes: rollout (sampling + rewards), host rewards, optimizer steps, evaluation.

    .venv/bin/python benchmarks/epoch.py                    # the toy world, 4 timed epochs per scenario
    .venv/bin/python benchmarks/epoch.py --tiny --out /tmp/e.json   # seconds: the tests' smoke run
    .venv/bin/python benchmarks/epoch.py --scale sd35m --cache /tmp/ng_sd35m   # SD3.5-Medium-shaped, see below

Scenarios, each one RL run of the main job's AWM config on the shipped reference (32 x 32 images, 8
prompts x 8 samples per epoch), timed from the loop's own per-epoch records (`train/rollout_s`,
`train/reward_host_s`, `train/reward_host_span_s`, `train/train_s`, `train/epoch_s`; `eval/eval_s`):

- `verifier_host`: the shapes world's verifier reward, a host callback (the main job);
- `clip_host`: a CLIP-score reward of a randomly initialised CLIP-B/16-shaped model at 32 px (width 768,
  12 layers, patch 4: 64 image tokens), a host callback (numpy forward, as on TPU VMs without torch);
- `clip_device`: the same reward placed on the devices (`rewards.placement`), jitted in the rollout.

`--scale sd35m` runs `clip_host` and `clip_device` on an SD3.5-Medium-shaped random-weight directory
instead, built once into `--cache DIR` (else a temporary directory) with diffusers / transformers: the
transformer at the released widths (24 heads x 64, joint_attention_dim 4096, pooled 2048, qk RMS-norm,
MMDiT-X dual attention) but only its first 2 of 24 blocks; the SD3 VAE at its released config; CLIP-L
(768), CLIP-bigG (1280) and T5 (d_model 4096, d_ff 10240, 64 heads) with 1 layer each and toy tokenizers.
The run is the shipped `sd35m_awm_normguard.py` (LoRA rank 32 / alpha 64, AWM's 6 timesteps, 2 optimizer
steps per epoch, T5 length 256, bf16 frozen base) at 256 px, 2 prompts x 2 samples per epoch, 10 rollout
steps (shipped: 14), evaluations of 2 images in 10 steps, computing in float32 (XLA:CPU's bf16 matmuls are
about half as fast). The reward is a CLIP-B/16-shaped CLIP score (12 layers, width 768, patch 16) at the
generator's resolution, 256 px rather than CLIP's 224 (the measurement was made when the device placement
could not yet resize; `ng_jax.rewards.clip.device_pixels` now resizes as Pillow does).

Device-placed rewards run fused inside the rollout's jit, so the loop cannot time them apart: their
`reward_device_s` is the same reward function jitted alone on one epoch's images (median of 3 calls
after a warm-up). `reward_fraction` = (host reward span + device reward seconds) / epoch seconds.

The first epoch (compilation) is dropped; each scenario reports the parts of its median epoch (by epoch
seconds), with every timed epoch's parts in the JSON (`per_epoch`). The CPU model and core count are
recorded with the results (`benchmarks.report.device_string`). Docs: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):  # `python benchmarks/epoch.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections as mlc  # noqa: E402

from benchmarks.accelerator import SD35M, kept_blocks  # noqa: E402
from benchmarks.report import device_string, git_commit  # noqa: E402
from ng_jax.config.methods import load_config_file  # noqa: E402
from ng_jax.logs import read_metrics  # noqa: E402
from ng_jax.rl import loop  # noqa: E402

PARTS = ("rollout_s", "reward_host_s", "reward_host_span_s", "train_s", "epoch_s")
SCENARIOS = {"toy": ("verifier_host", "clip_host", "clip_device"), "sd35m": ("clip_host", "clip_device")}
CLIP_B = dict(hidden=768, layers=12, heads=12, mlp=3072, patch=4, image=32, text_hidden=512, text_layers=12,
              text_heads=8, projection=512)
CLIP_TINY = dict(hidden=32, layers=1, heads=2, mlp=64, patch=8, image=32, text_hidden=32, text_layers=1,
                 text_heads=2, projection=16)
# The SD3.5-Medium-shaped scenarios: blocks kept, resolution, prompts x samples per epoch, rollout steps,
# evaluation prompts x samples (2 x 4 per epoch took 5.5 min an epoch on 2 shared cores; 2 x 2 halves it)
SD35M_RUN = dict(layers=2, resolution=256, prompts=2, samples=2, steps=10, eval_prompts=1, eval_samples=2)
SD3_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)  # over VAE_CONFIGS["sd3"]
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_heads=64)  # 1 layer
SD35M_PROMPTS = ("a red cat", "the blue dog", "a photo of a cat", "a dog on the red cat")  # the toy T5 words


def save_random_clip(directory: str, dims: dict) -> str:
    """A randomly initialised transformers CLIPModel with a byte-level toy tokenizer (torch: the test extra)."""
    from transformers import CLIPConfig, CLIPModel

    from tests.fixtures import write_clip_tokenizer

    vocab = write_clip_tokenizer(directory)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=dims["text_hidden"], intermediate_size=4 * dims["text_hidden"],
                         num_hidden_layers=dims["text_layers"], num_attention_heads=dims["text_heads"],
                         max_position_embeddings=77, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
                         bos_token_id=vocab - 2),
        vision_config=dict(hidden_size=dims["hidden"], intermediate_size=dims["mlp"], num_hidden_layers=dims["layers"],
                           num_attention_heads=dims["heads"], image_size=dims["image"], patch_size=dims["patch"]),
        projection_dim=dims["projection"])
    CLIPModel(config).eval().save_pretrained(directory)
    return directory


def sd35m_dirs(root: str) -> dict:
    return {"root": root, "weights": os.path.join(root, "weights"), "clip": os.path.join(root, "clip"),
            "prompts": os.path.join(root, "prompts.txt")}


def build_sd35m(dirs: dict, tiny: bool, resolution: int, log=print) -> None:
    """The SD3.5-Medium-shaped diffusers directory (tiny: the tests' tiny SD3.5 one), the CLIP reward at
    `resolution` and a prompt file, built once (ROOT/built.json marks a finished build of these settings)."""
    from tests.fixtures import VAE_CONFIGS, save_sd35_diffusers, write_prompt_file

    spec = {"tiny": tiny, "layers": SD35M_RUN["layers"], "clip_image": resolution, "t5": T5_XXL, "vae": SD3_VAE}
    marker = os.path.join(dirs["root"], "built.json")
    if os.path.isfile(marker) and json.load(open(marker)) == json.loads(json.dumps(spec)):
        log(f"sd35m: reusing the weights in {dirs['root']}")
        return
    t0 = time.time()
    os.makedirs(dirs["root"], exist_ok=True)
    if tiny:
        save_sd35_diffusers(dirs["weights"])
    else:
        save_sd35_diffusers(dirs["weights"], dims=kept_blocks(SD35M, SD35M_RUN["layers"]), noise=0.0,
                            vae=dict(VAE_CONFIGS["sd3"], **SD3_VAE), clip_widths=(768, 1280), clip_layers=1, t5=T5_XXL)
    save_random_clip(dirs["clip"], dict(CLIP_TINY if tiny else dict(CLIP_B, patch=16), image=resolution))
    write_prompt_file(dirs["root"], SD35M_PROMPTS)
    with open(marker, "w") as f:
        json.dump(spec, f)
    log(f"sd35m: built the weights in {dirs['root']} ({time.time() - t0:.0f} s)")


def use_clip_reward(c, name: str, clip_dir: str):
    """The scenario's reward: the CLIP score (numpy forward) on the host or, for clip_device, on the devices."""
    c.rewards.weights = mlc.ConfigDict({"clip_score": 1.0})
    c.rewards.update(clip_score_dir=clip_dir, clip_backend="numpy", timeout_s=0.0)
    if name == "clip_device":
        c.rewards.placement = mlc.ConfigDict({"clip_score": "device"})


def scenario_config(name: str, epochs: int, clip_dir: str, tiny: bool, reference: str = "", prompts: str = ""):
    c = load_config_file("awm.py")
    c.rl.epochs, c.eval.every = epochs, epochs
    c.reference = reference
    if name != "verifier_host":
        use_clip_reward(c, name, clip_dir)
    c.eval.quality = False
    if tiny:  # semantics only: the tests' prompt file and tiny sizes
        c.data.prompt_file = c.eval.prompt_file = prompts
        c.rl.update(prompts_per_epoch=4, group_size=4, train_batch=16, micro_batch=16, num_timesteps=1)
        c.rl.rollout.num_steps = 2
        c.eval.update(num_prompts=4, samples_per_prompt=2, batch_size=8, num_steps=2)
    return c


def sd35m_config(name: str, epochs: int, dirs: dict, tiny: bool):
    """The shipped sd35m_awm_normguard.py, shrunk as the real-model tests shrink it (`tiny_real_config`:
    float32 compute over the bf16 frozen base, unrolled blocks without remat) and, at full size, set back
    to the shipped LoRA, AWM timesteps, T5 length and frozen text encoders at SD35M_RUN's sizes."""
    from tests.fixtures import tiny_real_config

    shipped = load_config_file("sd35m_awm_normguard.py")
    c = tiny_real_config(load_config_file("sd35m_awm_normguard.py"), dirs["weights"], dirs, epochs=epochs)
    if not tiny:
        r, n = SD35M_RUN, SD35M_RUN["prompts"] * SD35M_RUN["samples"]
        c.model.resolution = r["resolution"]
        c.model.text.update(max_sequence_length=shipped.model.text.max_sequence_length,
                            param_dtype=shipped.model.text.param_dtype)
        c.lora.update(rank=shipped.lora.rank, alpha=shipped.lora.alpha)
        # 2 optimizer steps per epoch, as shipped (576 samples in micro-batches of 32 per step there)
        c.rl.update(prompts_per_epoch=r["prompts"], group_size=r["samples"], train_batch=n // 2, micro_batch=n // 2,
                    num_timesteps=shipped.rl.num_timesteps)
        c.rl.rollout.update(num_steps=r["steps"], batch_size=n)
        c.eval.update(num_prompts=r["eval_prompts"], samples_per_prompt=r["eval_samples"],
                      batch_size=r["eval_prompts"] * r["eval_samples"], num_steps=r["steps"])
    use_clip_reward(c, name, dirs["clip"])
    return c


def describe(c, tiny: bool) -> dict:
    """What an sd35m run measures, for the results and the table's header."""
    return {"layers": "tiny (3 blocks, width 16)" if tiny else f"{SD35M_RUN['layers']} of {SD35M['num_layers']}",
            "width": 16 if tiny else SD35M["num_attention_heads"] * SD35M["attention_head_dim"],
            "resolution": c.model.resolution, "t5_tokens": c.model.text.max_sequence_length,
            "samples_per_epoch": f"{c.rl.prompts_per_epoch} prompts x {c.rl.group_size}",
            "rollout_steps": c.rl.rollout.num_steps, "awm_timesteps": c.rl.num_timesteps,
            "optimizer_steps": c.rl.prompts_per_epoch * c.rl.group_size // c.rl.train_batch,
            "lora": f"rank {c.lora.rank}, alpha {c.lora.alpha:g}",
            "dtype": f"frozen base {c.model.param_dtype}, compute {c.model.dtype}",
            "text_encoders": "tiny" if tiny else "CLIP-L 768, bigG 1280, T5 4096 (d_ff 10240, 64 heads): 1 layer each",
            "vae": "tiny" if tiny else "SD3 (128/256/512/512, 2 layers per block, 16 channels)",
            "reward": "tiny CLIP" if tiny else f"CLIP-B/16-shaped (12 layers, width 768) at {c.model.resolution} px"}


def device_reward_s(c, repeats: int = 3) -> float:
    """Seconds of the device-placed rewards on one epoch's images (random, at the CLIP input size), jitted
    alone: inside the rollout they are fused with sampling and decoding."""
    import jax
    import numpy as np

    from ng_jax.rewards.registry import build_rewards

    weighted = build_rewards(c.rewards)
    n = c.rl.prompts_per_epoch * c.rl.group_size
    size = max(r.image_size for name, r in weighted.rewards.items() if name in weighted.on_device)
    images = np.random.default_rng(0).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
    feats = weighted.device_inputs(["a red cat"] * n)
    fn = jax.jit(lambda im, f: sum(g(im, f[k]) for k, g in weighted.on_device.items()))
    fn(images, feats).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(images, feats).block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def breakdown(records: list) -> dict:
    """A run's metrics.jsonl records -> the parts of its median epoch (by epoch seconds; the lower middle of
    an even count) after the compiling first one, which add up to that epoch as medians per part need not,
    with every timed epoch's parts (`per_epoch`) and the final evaluation's seconds."""
    train = [{p: r[f"train/{p}"] for p in PARTS} for r in records if "train/epoch_s" in r][1:]
    median = sorted(train, key=lambda r: r["epoch_s"])[(len(train) - 1) // 2]
    evals = [r["eval/eval_s"] for r in records if "eval/eval_s" in r]
    return {**median, "eval_s_final": evals[-1], "timed_epochs": len(train), "per_epoch": train}


def run(epochs: int = 5, tiny: bool = False, out: str | None = None, log=print, reference: str = "",
        prompts: str = "", scale: str = "toy", cache: str | None = None) -> dict:
    results = {"device": device_string(), "commit": git_commit(), "scale": scale, "epochs": epochs,
               "load_average": list(os.getloadavg()), "scenarios": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if scale == "sd35m":
            dirs = sd35m_dirs(os.path.join(cache or tmp, "sd35m_tiny" if tiny else "sd35m"))
            make = lambda name: sd35m_config(name, epochs, dirs, tiny)  # noqa: E731
            results["shape"] = describe(make("clip_host"), tiny)
            build_sd35m(dirs, tiny, results["shape"]["resolution"], log)
            log("sd35m: " + "; ".join(f"{k}={v}" for k, v in results["shape"].items()))
        else:
            clip_dir = save_random_clip(os.path.join(tmp, "clip"), CLIP_TINY if tiny else CLIP_B)
            make = lambda name: scenario_config(name, epochs, clip_dir, tiny, reference, prompts)  # noqa: E731
        for name in SCENARIOS[scale]:
            workdir, config = os.path.join(tmp, name), make(name)
            t0 = time.time()
            loop.run(config, workdir)
            row = breakdown(read_metrics(os.path.join(workdir, "metrics.jsonl")))
            row["wall_s"] = time.time() - t0
            row["reward_device_s"] = device_reward_s(config) if config.rewards.get("placement") else 0.0
            row["reward_fraction"] = (row["reward_host_span_s"] + row["reward_device_s"]) / row["epoch_s"]
            results["scenarios"][name] = row
            log(f"{name}: epoch {row['epoch_s']:.2f} s = rollout {row['rollout_s']:.2f} (host rewards spanning "
                f"{row['reward_host_span_s']:.2f}, device rewards {row['reward_device_s']:.2f} alone) + train "
                f"{row['train_s']:.2f}; final eval {row['eval_s_final']:.1f} s")
    results["load_average_after"] = list(os.getloadavg())
    log(markdown(results))
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    return results


def markdown(results: dict) -> str:
    shape = results.get("shape")
    lines = [f"device: {results['device']}; commit {results['commit']}; the median of {results['epochs'] - 1} epochs; "
             f"load average {results['load_average'][0]:.1f} -> {results['load_average_after'][0]:.1f}"]
    if shape:
        lines.append("SD3.5-Medium-shaped: " + "; ".join(f"{k}={v}" for k, v in shape.items()))
    lines += ["", "| scenario | epoch (s) | rollout (s) | host rewards, span (s) | host rewards, busy (s) "
              "| device rewards, alone (s) | optimizer steps (s) | rewards / epoch | final evaluation (s) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["scenarios"].items():
        lines.append(f"| {name} | {r['epoch_s']:.2f} | {r['rollout_s']:.2f} | {r['reward_host_span_s']:.2f} | "
                     f"{r['reward_host_s']:.2f} | {r.get('reward_device_s', 0.0):.2f} | {r['train_s']:.2f} | "
                     f"{100 * r['reward_fraction']:.0f}% | {r['eval_s_final']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCENARIOS), default="toy",
                        help="toy: the shapes world; sd35m: an SD3.5-Medium-shaped model (2 of 24 blocks, 256 px)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per scenario, the first not timed (default: 5 toy, 4 sd35m)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke run, numbers meaningless")
    parser.add_argument("--cache", default=None, help="sd35m: build the random weights here once (default: a temp dir)")
    parser.add_argument("--out", default=None, help="default: benchmarks/epoch_results.json (toy), "
                                                    "benchmarks/epoch_results_sd35m.json (sd35m)")
    args = parser.parse_args(argv)
    name = "epoch_results.json" if args.scale == "toy" else f"epoch_results_{args.scale}.json"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    epochs = args.epochs or (5 if args.scale == "toy" else 4)
    run(epochs, args.tiny, out, scale=args.scale, cache=args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
