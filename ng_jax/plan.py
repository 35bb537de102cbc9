"""Ahead-of-time memory plan: compile a run's full-size train step for a target mesh, before any launch.

    python -m ng_jax.plan --config=ng_jax/configs/sd35m_awm_normguard.py --topology=v5p-512
    python -m ng_jax.plan --config=ng_jax/configs/flux1dev_awm_normguard.py --chips=64 --hbm_gib=95 --full --json
    python -m ng_jax.plan --config=ng_jax/configs/flux1dev_awm_normguard.py --topology=v5p-128 \
        --config.mesh.shape='(1,-1,4)' --config.lora.rank=0
    python -m ng_jax.plan --config=ng_jax/configs/sd35m_awm_normguard.py --topology=v5p-128 --attention=reference

It builds the run's velocity model at full size from its transformer config (`model.weights_dir`'s
transformer/config.json when there is one, else the built-in copy of the released config.json of
SD3.5-Medium / SD3-Medium / FLUX.1-dev: no weights are read), the state and reference shardings of
the run (`ng_jax.sharding`: `mesh.logical_rules`, `mesh.ref_logical_rules`), and lowers and compiles
THE train step of the RL loop (`ng_jax.rl.step.jit_train_step`: same StepSpec, LoRA / full fine-tuning,
remat, scanned blocks, donation) against `jax.ShapeDtypeStruct`s on `--chips` fake CPU devices. It
prints the mesh, the per-device bytes of parameters / optimizer state / reference / batch computed
from the shardings (independent of XLA), XLA's per-device memory analysis (arguments, outputs,
aliases, temporaries; peak ~ arguments + temporaries + outputs - aliases), whether that fits the
HBM of one chip, and the compile time.

Attention (`model.attention`, or `--attention`) is resolved for the topology's kind (`auto`: splash
on TPU, cuDNN on GPU, a fused kernel with `--chips` alone). The reference and "xla" paths materialise
the [B, heads, Lq, Lk] float32 logits of every call; fused kernels do not, and since XLA:CPU cannot
compile them the step is lowered with `layers.PLAN_STANDIN` (a fused kernel's footprint: same inputs
and output, no Lq x Lk buffer). The report gives one reference-path call's logits per device.

The micro-batch is set per device (`--per_device_batch`; default: the config's `rl.micro_batch` over
the 8 devices the shipped configs are sized for), and `rl.train_batch` keeps the config's number of
accumulated micro-batches, so per-device sizes do not change with the chip count.

Caveat: XLA:CPU's memory analysis approximates what the TPU / GPU compilers will do (other fusion,
layouts, scheduling and rematerialisation); treat the numbers as an estimate and keep headroom.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time

from ng_jax.errors import UserError

GIB = 1024 ** 3
# name -> (chips per accelerator-name count, HBM GiB per chip): v5p-N and v4-N count TensorCores (2 per chip).
TPUS = {"v5p": (2, 95.0), "v4": (2, 32.0), "v5litepod": (1, 16.0), "v5e": (1, 16.0), "v6e": (1, 32.0)}
GPUS = {"h100": 80.0, "a100": 80.0, "h200": 141.0}
CONFIG_DEVICES = 8   # the shipped real-model configs size rl.micro_batch for 8 devices
VAE_DOWNSAMPLE = 8   # SD3 / SD3.5 / FLUX VAEs: latent side = pixels / 8
CLIP_TOKENS = 77     # SD3 prompt layout: [CLIP-L + bigG (77 tokens); T5 (max_sequence_length)]

# transformer/config.json of the released checkpoints (stabilityai/stable-diffusion-3.5-medium,
# stabilityai/stable-diffusion-3-medium-diffusers, black-forest-labs/FLUX.1-dev).
PRESETS = {
    "sd35": {"_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "caption_projection_dim": 1536,
             "dual_attention_layers": list(range(13)), "in_channels": 16, "joint_attention_dim": 4096,
             "num_attention_heads": 24, "num_layers": 24, "out_channels": 16, "patch_size": 2,
             "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "qk_norm": "rms_norm", "sample_size": 128},
    "sd3": {"_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "caption_projection_dim": 1536,
            "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24,
            "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
            "sample_size": 128},
    "flux1_dev": {"_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
                  "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096,
                  "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38, "patch_size": 1,
                  "pooled_projection_dim": 768},
}


class PlanError(UserError, ValueError):
    """A bad plan request (topology, chips, mesh): reported in one line."""


def topology_target(name: str | None) -> str | None:
    """"tpu" or "gpu" for a topology name (what `auto` attention resolves against), None without one."""
    if not name:
        return None
    return "gpu" if re.fullmatch(r"(h100|a100|h200)x\d+", name) else "tpu"


def parse_topology(name: str) -> tuple[int, float]:
    """(chips, HBM GiB per chip) of `v5p-512`, `v5litepod-64`, `v4-128`, `v6e-256`, `h100x8`, ..."""
    m = re.fullmatch(r"(v5p|v4|v5litepod|v5e|v6e)-(\d+)", name)
    if m:
        per, hbm = TPUS[m.group(1)]
        n = int(m.group(2))
        if n % per:
            raise PlanError(f"topology {name}: {m.group(1)}-N counts TensorCores, N must be a multiple of {per}")
        return n // per, hbm
    m = re.fullmatch(r"(h100|a100|h200)x(\d+)", name)
    if m:
        return int(m.group(2)), GPUS[m.group(1)]
    raise PlanError(f"unknown topology {name!r}: expected v5p-N, v4-N, v5litepod-N, v5e-N, v6e-N or "
                    f"{{h100,a100,h200}}xN")


def ensure_devices(n: int) -> None:
    """Give this process `n` fake CPU devices (XLA_FLAGS must be set before jax is imported and initialises
    its backend). Where jax is already imported (a test, a notebook) its devices must do."""
    if "jax" not in sys.modules:
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax  # deferred, as every jax import here: after the XLA_FLAGS above

    have = len(jax.devices("cpu"))
    if have < n:
        raise PlanError(f"jax was already initialised with {have} CPU devices and the plan needs {n}: run "
                        "`python -m ng_jax.plan` in a fresh process")


def fits(peak_bytes: float, hbm_gib: float) -> bool:
    return peak_bytes <= hbm_gib * GIB


def _weights_dir(mcfg, tmp: str) -> str:
    """`model.weights_dir` when it holds transformer/config.json, else a directory with the preset's."""
    wd = str(mcfg.get("weights_dir") or "")
    if wd and os.path.isfile(os.path.join(wd, "transformer", "config.json")):
        return wd
    family = str(mcfg.family)
    if family not in PRESETS:
        raise PlanError(f"model.family={family!r}: the plan needs a real-model config ({sorted(PRESETS)})")
    os.makedirs(os.path.join(tmp, "transformer"))
    with open(os.path.join(tmp, "transformer", "config.json"), "w") as f:
        json.dump(PRESETS[family], f)
    return tmp


def _device_bytes(tree, shardings) -> int:
    # Deferred: jax may load only after ensure_devices has set the device count.
    import jax
    import numpy as np

    return int(sum(math.prod(sh.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
                   for x, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))))


def plan_attention(mcfg, target: str | None) -> dict:
    """How `model.attention` runs on `target` ("tpu" | "gpu" | None): {"choice", "runs_as", "fused",
    "compiled_as"} (compiled_as: what the CPU compile of the plan lowers)."""
    # Deferred: these import jax, which may load only after ensure_devices has set the device count.
    from ng_jax.models.dtypes import dtype_of
    from ng_jax.models.nets.layers import PLAN_STANDIN, resolve_attention

    choice = str(mcfg.get("attention") or "auto")
    if choice == PLAN_STANDIN:
        raise PlanError(f"model.attention={choice!r} is the plan's own stand-in, not a choice")
    if choice == "auto" and target is None:
        runs_as = "fused"  # splash (TPU) or cuDNN (GPU): every accelerator target has a fused kernel
    else:
        backend = target or ("gpu" if choice == "cudnn" else "tpu")  # no topology: the choice's own platform
        try:
            runs_as = resolve_attention(choice, backend, dtype=dtype_of(mcfg.get("dtype", "float32"), "model.dtype"))
        except ValueError as err:
            raise PlanError(str(err)) from None
    fused = runs_as in ("fused", "cudnn", "splash")
    return {"choice": choice, "runs_as": runs_as, "fused": fused, "compiled_as": PLAN_STANDIN if fused else runs_as}


def plan(config, chips: int, *, per_device_batch: int | None = None, compile: bool = True,
         target: str | None = None) -> dict:
    """The plan as a dict (see module doc). `config` is a real-model RL config; it is modified (batch sizes).
    `target` ("tpu" | "gpu" | None: unknown) is what `model.attention="auto"` resolves against."""
    # Deferred: jax may load only after ensure_devices has set the device count.
    import jax
    import jax.numpy as jnp

    from ng_jax import sharding
    from ng_jax.models.dtypes import dtype_of
    from ng_jax.models.nets.text import TextCond
    from ng_jax.models.stack import velocity_config
    from ng_jax.models.velocity import make_velocity_model
    from ng_jax.rl.rollout import sampler_sigmas
    from ng_jax.rl.step import TrainBatch, jit_train_step, make_init_state
    from ng_jax.state import count_params, make_optimizer

    if "model" not in config:
        raise PlanError("the plan needs a real-model config (a `model` block: ng_jax/configs/sd35m_*.py, flux1dev_*.py)")
    try:
        mesh = sharding.make_mesh(config.mesh.shape, jax.devices("cpu")[:chips])
    except ValueError as err:
        raise PlanError(f"--chips={chips}: {err}") from None
    layout, ref_layout = sharding.layouts(config.mesh)
    rl, mcfg = config.rl, config.model
    accum = max(1, int(rl.train_batch) // int(rl.micro_batch))
    pdb = int(per_device_batch or max(1, int(rl.micro_batch) // CONFIG_DEVICES))
    rl.micro_batch = pdb * sharding.batch_size_multiple(mesh)
    rl.train_batch = rl.micro_batch * accum
    attention = plan_attention(mcfg, target)
    with tempfile.TemporaryDirectory() as tmp:
        mcfg.weights_dir = _weights_dir(mcfg, tmp)
        vcfg = velocity_config(mcfg, int(mcfg.resolution) // VAE_DOWNSAMPLE)
        vcfg.attention = attention["compiled_as"]
        model = make_velocity_model(vcfg)

    ref_dtype = dtype_of(mcfg.get("param_dtype"), "model.param_dtype", optional=True)
    ref = jax.eval_shape(model.init, jax.random.key(0))
    if ref_dtype is not None:
        ref = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, ref_dtype), ref)
    lora_cfg = config.lora if config.lora.rank else None
    optimizer = make_optimizer(config.optim)
    state = jax.eval_shape(make_init_state(config, optimizer, lora_cfg), ref)
    state_sh, ref_sh = layout.shardings(state, mesh), ref_layout.shardings(ref, mesh)

    n, flux = int(rl.train_batch), mcfg.family == "flux1_dev"
    length = int(mcfg.text.max_sequence_length) + (0 if flux else CLIP_TOKENS)
    text_dtype = dtype_of(mcfg.text.get("dtype"), "model.text.dtype", optional=True) or jnp.float32
    x0 = jax.ShapeDtypeStruct((n,) + tuple(model.sample_shape), jnp.float32)
    cond = TextCond(tokens=jax.ShapeDtypeStruct((n, length, model.context_shape[1]), text_dtype),
                    pooled=jax.ShapeDtypeStruct((n, model.pooled_dim), text_dtype),
                    mask=jax.ShapeDtypeStruct((n, length), jnp.bool_))
    batch = TrainBatch(x0=x0, cond=cond, advantages=jax.ShapeDtypeStruct((n,), jnp.float32),
                       x0_l=x0 if rl.method == "dpo" else None)
    batch_sh = jax.tree.map(lambda _: sharding.batch_sharding(mesh), batch)

    per_device = {"trainable": _device_bytes(state.params, state_sh.params), "ema": _device_bytes(state.ema, state_sh.ema),
                  "opt_state": _device_bytes(state.opt_state, state_sh.opt_state), "reference": _device_bytes(ref, ref_sh),
                  "batch": _device_bytes(batch, batch_sh)}
    per_device["total"] = sum(per_device.values())  # (not counted: the step counter and RNG key, 12 bytes)
    # One joint attention call per device: rows (DPO: winners + losers), heads here (over `tensor`), Lq = Lk.
    heads, tensor = int(vcfg.num_attention_heads), int(mesh.shape["tensor"])
    patch = 2 if flux else int(vcfg.patch_size)  # FLUX packs 2x2 latent patches
    seq = math.prod(model.sample_shape[:2]) // patch ** 2 + length
    rows = pdb * (2 if rl.method == "dpo" else 1)
    heads_here = heads // tensor if heads % tensor == 0 else heads
    attention.update(tokens=seq, logits_per_call=rows * heads_here * seq * seq * 4)
    out = {"config": config.get("name"), "family": str(mcfg.family), "method": str(rl.method),
           "lora_rank": int(config.lora.rank), "chips": chips, "mesh": dict(mesh.shape),
           "logical_rules": [list(r) for r in layout.logical_rules],
           "per_device_batch": pdb, "micro_batch": int(rl.micro_batch), "train_batch": n,
           "resolution": int(mcfg.resolution), "params": {"trainable": count_params(state.params),
                                                          "reference": count_params(ref)},
           "replicated_fraction": {"trainable": sharding.replicated_fraction(state.params, state_sh.params),
                                   "reference": sharding.replicated_fraction(ref, ref_sh)},
           "max_replicated_fraction": float(config.mesh.get("max_replicated_fraction", 1.0)),
           "bytes_from_shardings": per_device, "attention": attention}
    if not compile:
        return out

    def shaped(tree, shardings):
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)

    step = jit_train_step(config, model.apply, optimizer, lora_cfg, jax.device_get(sampler_sigmas(rl.rollout)),
                          mesh, state_sh, ref_sh)
    t0 = time.perf_counter()
    lowered = step.lower(shaped(state, state_sh), shaped(ref, ref_sh), shaped(batch, batch_sh))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    xla = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "alias", "temp", "generated_code")}
    xla["peak"] = xla["argument"] + xla["temp"] + xla["output"] - xla["alias"]
    out.update(xla=xla, lower_s=round(t1 - t0, 1), compile_s=round(t2 - t1, 1))
    return out


def _gib(b: float) -> str:
    return f"{b / GIB:8.2f} GiB" if b >= GIB / 10 else f"{b / 2 ** 20:8.2f} MiB"


def report(r: dict, hbm_gib: float | None) -> str:
    m = r["mesh"]
    lines = [f"plan: {r['config']} ({r['family']}, {r['method']}, "
             f"{'LoRA r' + str(r['lora_rank']) if r['lora_rank'] else 'full fine-tuning'}, {r['resolution']} px) "
             f"on {r['chips']} chips",
             f"mesh: data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']}; micro-batch {r['micro_batch']} "
             f"({r['per_device_batch']} per device), train batch {r['train_batch']}",
             f"parameters: trainable {r['params']['trainable'] / 1e6:.1f}M, reference {r['params']['reference'] / 1e6:.1f}M;"
             f" replicated: trainable {100 * r['replicated_fraction']['trainable']:.2f}%, reference "
             f"{100 * r['replicated_fraction']['reference']:.2f}% (limit {100 * r['max_replicated_fraction']:.0f}%)",
             "per device, from the shardings:"]
    lines += [f"  {k:<12}{_gib(v)}" for k, v in r["bytes_from_shardings"].items()]
    a = r["attention"]
    lines.append(f"attention: model.attention={a['choice']} runs as {a['runs_as']} on this target; "
                 + ("fused: no [B, heads, Lq, Lk] logits (compiled on CPU as a stand-in with its footprint)"
                    if a["fused"] else "materialises the [B, heads, Lq, Lk] float32 logits of each call")
                 + f"; one call's logits per device ({a['tokens']} tokens): {_gib(a['logits_per_call']).strip()}")
    if "xla" in r:
        x = r["xla"]
        lines += ["per device, XLA:CPU memory analysis (an estimate of the TPU/GPU compilers'):"]
        lines += [f"  {k:<12}{_gib(x[k])}" for k in ("argument", "output", "alias", "temp")]
        lines += [f"  {'peak':<12}{_gib(x['peak'])}  (argument + temp + output - alias)",
                  f"compile: lower {r['lower_s']} s, compile {r['compile_s']} s"]
        if hbm_gib:
            ok = fits(x["peak"], hbm_gib)
            lines.append(f"{'FITS' if ok else 'DOES NOT FIT'}: peak {x['peak'] / GIB:.2f} GiB vs {hbm_gib:g} GiB HBM "
                         f"per chip ({100 * x['peak'] / (hbm_gib * GIB):.0f}%)")
    if max(r["replicated_fraction"].values()) > r["max_replicated_fraction"] and r["chips"] > 1:
        lines.append("warning: the run would stop at start-up: too many parameter bytes replicated "
                     "(mesh.max_replicated_fraction)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m ng_jax.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--topology", help="v5p-N, v4-N, v5litepod-N, v5e-N, v6e-N, h100xN, a100xN, h200xN")
    ap.add_argument("--chips", type=int, help="devices (overrides the topology's)")
    ap.add_argument("--hbm_gib", type=float, help="HBM per chip in GiB (overrides the topology's)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--lora", action="store_true", help="LoRA (the config's rank, 32 if it has none)")
    mode.add_argument("--full", action="store_true", help="full fine-tuning (lora.rank=0)")
    ap.add_argument("--per_device_batch", type=int, help="micro-batch samples per data x fsdp device")
    ap.add_argument("--attention", help="model.attention: auto (default: the config's), xla, cudnn, splash, reference")
    ap.add_argument("--no_compile", action="store_true", help="only the bytes from the shardings")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    args, rest = ap.parse_known_args(argv[1:])
    try:
        chips, hbm = parse_topology(args.topology) if args.topology else (None, None)
        chips = args.chips or chips
        hbm = args.hbm_gib or hbm
        if not chips or chips < 1:
            raise PlanError("give --topology=v5p-512 (or similar) or --chips=N")
        ensure_devices(chips)  # before the config loads: it may touch jax (and so fix the device count)
        from ng_jax.main import UsageError, parse_args  # deferred: after ensure_devices (above)

        try:
            config, _, _ = parse_args([argv[0]] + rest, check=False)
        except UsageError as err:
            raise PlanError(str(err)) from None
        if args.full:
            config.lora.rank = 0
        elif args.lora and not config.lora.rank:
            config.lora.rank = 32
        if args.attention and "model" in config:
            config.model.attention = args.attention
        result = plan(config, chips, per_device_batch=args.per_device_batch, compile=not args.no_compile,
                      target=topology_target(args.topology))
    except PlanError as err:
        print(f"ng_jax.plan: error: {err}", file=sys.stderr)
        return 2
    result["hbm_gib"] = hbm
    if hbm and "xla" in result:
        result["fits"] = fits(result["xla"]["peak"], hbm)
    print(json.dumps(result) if args.json else report(result, hbm))
    return 0


if __name__ == "__main__":
    sys.exit(main())
