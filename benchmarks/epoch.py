"""Where an RL epoch's time goes: rollout (sampling + rewards), host rewards, optimizer steps, evaluation.

    .venv/bin/python benchmarks/epoch.py                    # the toy world, 4 timed epochs per scenario
    .venv/bin/python benchmarks/epoch.py --tiny --out /tmp/e.json   # seconds: the tests' smoke run

Scenarios, each one RL run of the main job's AWM config on the shipped reference (32 x 32 images, 8
prompts x 8 samples per epoch), timed from the loop's own per-epoch records (`train/rollout_s`,
`train/reward_host_s`, `train/reward_host_span_s`, `train/train_s`, `train/epoch_s`; `eval/eval_s`):

- `verifier_host`: the shapes world's verifier reward, a host callback (the main job);
- `clip_host`: a CLIP-score reward of a randomly initialised CLIP-B/16-shaped model at 32 px (width 768,
  12 layers, patch 4: 64 image tokens), a host callback (numpy forward, as on TPU VMs without torch);
- `clip_device`: the same reward placed on the devices (`rewards.placement`), jitted in the rollout.

The first epoch (compilation) is dropped; medians over the rest. The CPU model and core count are
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

from benchmarks.report import device_string, git_commit  # noqa: E402
from ng_jax.config.methods import load_config_file  # noqa: E402
from ng_jax.logs import read_metrics  # noqa: E402
from ng_jax.rl import loop  # noqa: E402

PARTS = ("rollout_s", "reward_host_s", "reward_host_span_s", "train_s", "epoch_s")
CLIP_B = dict(hidden=768, layers=12, heads=12, mlp=3072, patch=4, image=32, text_hidden=512, text_layers=12,
              text_heads=8, projection=512)
CLIP_TINY = dict(hidden=32, layers=1, heads=2, mlp=64, patch=8, image=32, text_hidden=32, text_layers=1,
                 text_heads=2, projection=16)


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


def scenario_config(name: str, epochs: int, clip_dir: str, tiny: bool, reference: str = "", prompts: str = ""):
    c = load_config_file("awm.py")
    c.rl.epochs, c.eval.every = epochs, epochs
    c.reference = reference
    if name != "verifier_host":
        c.rewards.weights = mlc.ConfigDict({"clip_score": 1.0})
        c.rewards.update(clip_score_dir=clip_dir, clip_backend="numpy", timeout_s=0.0)
        if name == "clip_device":
            c.rewards.placement = mlc.ConfigDict({"clip_score": "device"})
    c.eval.quality = False
    if tiny:  # semantics only: the tests' prompt file and tiny sizes
        c.data.prompt_file = c.eval.prompt_file = prompts
        c.rl.update(prompts_per_epoch=4, group_size=4, train_batch=16, micro_batch=16, num_timesteps=1)
        c.rl.rollout.num_steps = 2
        c.eval.update(num_prompts=4, samples_per_prompt=2, batch_size=8, num_steps=2)
    return c


def run(epochs: int = 5, tiny: bool = False, out: str | None = None, log=print, reference: str = "",
        prompts: str = "") -> dict:
    results = {"device": device_string(), "commit": git_commit(), "epochs": epochs,
               "load_average": list(os.getloadavg()), "scenarios": {}}
    with tempfile.TemporaryDirectory() as tmp:
        clip_dir = save_random_clip(os.path.join(tmp, "clip"), CLIP_TINY if tiny else CLIP_B)
        for name in ("verifier_host", "clip_host", "clip_device"):
            workdir = os.path.join(tmp, name)
            t0 = time.time()
            loop.run(scenario_config(name, epochs, clip_dir, tiny, reference, prompts), workdir)
            records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
            train = [r for r in records if "train/epoch_s" in r][1:]  # the first epoch compiles
            evals = [r["eval/eval_s"] for r in records if "eval/eval_s" in r]
            row = {p: statistics.median(r[f"train/{p}"] for r in train) for p in PARTS}
            row["reward_fraction"] = row["reward_host_span_s"] / row["epoch_s"]
            row.update(eval_s_final=evals[-1], timed_epochs=len(train), wall_s=time.time() - t0)
            results["scenarios"][name] = row
            log(f"{name}: epoch {row['epoch_s']:.2f} s = rollout {row['rollout_s']:.2f} (host rewards spanning "
                f"{row['reward_host_span_s']:.2f}) + train {row['train_s']:.2f}; final eval {row['eval_s_final']:.1f} s")
    results["load_average_after"] = list(os.getloadavg())
    log(markdown(results))
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    return results


def markdown(results: dict) -> str:
    lines = [f"device: {results['device']}; commit {results['commit']}; median over {results['epochs'] - 1} epochs; "
             f"load average {results['load_average'][0]:.1f} -> {results['load_average_after'][0]:.1f}", "",
             "| scenario | epoch (s) | rollout (s) | host rewards, span (s) | host rewards, busy (s) | optimizer steps (s) "
             "| rewards / epoch | final evaluation (s) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results["scenarios"].items():
        lines.append(f"| {name} | {r['epoch_s']:.2f} | {r['rollout_s']:.2f} | {r['reward_host_span_s']:.2f} | "
                     f"{r['reward_host_s']:.2f} | {r['train_s']:.2f} | {100 * r['reward_fraction']:.0f}% | "
                     f"{r['eval_s_final']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="epochs per scenario (the first is not timed)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke run, numbers meaningless")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "epoch_results.json"))
    args = parser.parse_args(argv)
    run(args.epochs, args.tiny, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
