"""benchmarks/run.py's reporting: the device and commit strings, the targets table and the markdown."""

from __future__ import annotations

import os
import platform
import subprocess

import jax

METHODS = ("nft", "awm", "dpo")
TARGETS = {"train_speedup_vs_torch": 1.5, "rollout_speedup_vs_torch": 2.0, "ng_overhead": 1.03,
           "roofline_fraction": 0.5}


def device_string() -> str:
    """jax's device kind and the CPU model from /proc/cpuinfo (with family/model and AVX-512 if present)."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        cpu = f"{info.get('model name', cpu)} (family {info.get('cpu family', '?')} model {info.get('model', '?')}" + (
            ", AVX-512)" if "avx512f" in info.get("flags", "").split() else ")")
    except OSError:
        pass
    dev = jax.devices()[0]
    return f"{dev.device_kind} ({dev.platform}): {cpu}, {os.cpu_count()} cores"


def git_commit() -> str:
    """`git rev-parse --short HEAD`, with "+uncommitted" when tracked files differ from HEAD."""
    cwd = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=cwd).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], capture_output=True, timeout=10, cwd=cwd).returncode
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+uncommitted" if dirty == 1 else "")


def markdown(results: dict) -> str:
    load = results["load_average"]
    lines = [f"device: {results['device']}; torch threads {results['threads']['torch']}, "
             f"XLA CPU cores {results['threads']['xla']}; model {results['model']['params'] / 1e6:.2f}M params, "
             f"{results['model']['tokens']} tokens; 1-min load average {load['start'][0]:.1f} at start, "
             f"{load['end'][0]:.1f} at end (other jobs share these cores)", "",
             "| train step | ng_jax ms | +NormGuard ms | torch ms | speedup (min) | NormGuard overhead (min; paired) "
             "| NormGuard FLOPs ratio |", "|---|---|---|---|---|---|---|"]
    for m, r in results["train"].items():
        lines.append(f"| {m} (batch {r['batch']}, micro {r['micro_batch']}, T {r['num_timesteps']}) | "
                     f"{r['jax_base']['median_ms']:.0f} | {r['jax_normguard']['median_ms']:.0f} | "
                     f"{r['torch_base']['median_ms']:.0f} | {r['speedup_vs_torch']:.2f}x "
                     f"({r['speedup_vs_torch_min']:.2f}x) | {r['ng_overhead']:.3f} ({r['ng_overhead_min']:.3f}; "
                     f"{r['ng_overhead_paired']:.3f}) | {r['ng_flops_ratio']:.4f} |")
    lines += ["", "| rollout | ng_jax ms | torch ms | speedup (min) | max abs diff |", "|---|---|---|---|---|"]
    for k, r in results["rollout"].items():
        lines.append(f"| {r['steps']} Euler steps, batch {r['batch']}, CFG {r['cfg_scale']:g} | "
                     f"{r['jax']['median_ms']:.0f} | {r['torch']['median_ms']:.0f} | {r['speedup_vs_torch']:.2f}x "
                     f"({r['speedup_vs_torch_min']:.2f}x) | {r['max_abs_diff']:.1e} |")
    lines += ["", "| scaling: NFT step, T=1 | params | step ms (min) | samples/s | GFLOP/step | GFLOP/s | "
              "matmul GFLOP/s | roofline |", "|---|---|---|---|---|---|---|---|"]
    for r in results["scaling"]["rows"]:
        lines.append(f"| batch {r['batch']}, width {r['width']} | {r['params'] / 1e6:.2f}M | {r['step_ms']:.0f} "
                     f"({r['step_min_ms']:.0f}) | {r['samples_per_s']:.0f} | {r['step_gflop']:.2f} | "
                     f"{r['achieved_gflops']:.1f} | {r['matmul_gflops']:.1f} | {r['roofline_fraction']:.0%} |")
    nft, roll = results["train"]["nft"], results["rollout"].get("cfg1", {})
    if "torch_base_1thread" in nft:
        one = nft["torch_base_1thread"]["median_ms"]
        lines += ["", "| second opinion: torch with 1 thread | ng_jax ms | torch 1-thread ms | speedup vs 1 thread |",
                  "|---|---|---|---|",
                  f"| nft train step | {nft['jax_base']['median_ms']:.0f} | {one:.0f} | "
                  f"{one / nft['jax_base']['median_ms']:.2f}x |"]
        if "torch_1thread" in roll:
            one = roll["torch_1thread"]["median_ms"]
            lines.append(f"| rollout, CFG 1 | {roll['jax']['median_ms']:.0f} | {one:.0f} | "
                         f"{one / roll['jax']['median_ms']:.2f}x |")
    opt = results["optimisations"]
    if opt:
        lines += ["", "| optimisation (NFT step, same rounds) | before ms (min) | after ms (min) | speedup (min) |",
                  "|---|---|---|---|"]
        labels = {"dense_2d_matmul": "layers.Dense: one 2-D matmul instead of nn.Dense",
                  "attention_bhld": "attention: [B,H,L,D] batched matmuls, q pre-scaled",
                  "total": "both (HEAD's model code -> now)"}
        for k, label in labels.items():
            d = opt[k]
            lines.append(f"| {label} | {d['before']['median_ms']:.0f} ({d['before']['min_ms']:.0f}) | "
                         f"{d['after']['median_ms']:.0f} ({d['after']['min_ms']:.0f}) | {d['speedup']:.2f}x "
                         f"({d['speedup_min']:.2f}x) |")
    lines += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
    for name, value, goal, met in results["targets"]:
        lines.append(f"| {name} | {value:.3f} | {goal} | {'yes' if met else 'NO'} |")
    return "\n".join(lines)


def targets(results: dict) -> list:
    rows = []
    for m in METHODS:
        v = results["train_speedup_vs_torch"][m]
        rows.append((f"train speedup vs torch ({m})", v, ">= 1.5", v >= TARGETS["train_speedup_vs_torch"]))
    v = results["rollout_speedup_vs_torch"]
    rows.append(("rollout speedup vs torch (worse of CFG / no CFG)", v, ">= 2", v >= 2.0))
    for m in METHODS:
        v = results["ng_overhead"][m]
        rows.append((f"NormGuard overhead ({m})", v, "<= 1.03", v <= TARGETS["ng_overhead"]))
    v = results["roofline_fraction"]
    rows.append(("roofline fraction (largest config)", v, ">= 0.5", v >= TARGETS["roofline_fraction"]))
    return rows
