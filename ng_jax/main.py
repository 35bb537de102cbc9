"""The one entry point.

    python -m ng_jax.main --config=ng_jax/configs/awm_normguard.py [--workdir=DIR] [--config.a.b=value ...]

`config.job` picks what runs: "rl" (post-training, ng_jax.rl.loop), "pretrain" (the reference model,
ng_jax.pretrain), "evaluate" (score a checkpoint on fixed prompts, ng_jax.eval.evaluate), "analyze"
(the paper's analyses, ng_jax.eval.analyze) or "grid" (the reproduction grid and docs/RESULTS.md, ng_jax.eval.grid).
Config problems (missing file, unknown key, wrong type) are reported in one line, exit status 2.

Compiled XLA programs are kept in a persistent cache (`~/.cache/ng_jax/xla`, or `$XDG_CACHE_HOME/ng_jax/xla`),
so a repeated job, and every run of a grid after the first of its kind, skips most compilation. The cached
programs are the ones XLA would compile, so results do not change. `NG_JAX_COMPILE_CACHE=DIR` moves the cache
(a `gs://` path works on TPU VMs), `NG_JAX_COMPILE_CACHE=off` disables it; JAX's own
`JAX_COMPILATION_CACHE_DIR`, when set, takes precedence.
"""

from __future__ import annotations

import importlib
import os
import re
import sys

from ng_jax.config.checks import check_config
from ng_jax.config.methods import CONFIG_DIR
from ng_jax.errors import UserError


class UsageError(UserError):
    """A problem with the command line or the config: reported in one line, no traceback (exit status 2)."""

JOBS = {
    "pretrain": "ng_jax.pretrain",
    "rl": "ng_jax.rl.loop",
    "evaluate": "ng_jax.eval.evaluate",
    "analyze": "ng_jax.eval.analyze",
    "grid": "ng_jax.eval.grid",
}


def resolve_config(arg: str) -> str:
    """`--config=PATH[:ARG]` with PATH made absolute when it is not a file here but a shipped config is:
    `ng_jax/configs/awm.py`, `configs/awm.py`, `awm.py` or `awm` (and `experiments/...`) name ng_jax/configs/ of the
    installed package."""
    m = re.match(r"--config=([^:]+)(.*)$", arg)
    if not m or os.path.isfile(m.group(1)):
        return arg
    name = m.group(1)
    for prefix in ("ng_jax/configs/", "configs/"):
        name = name[len(prefix):] if name.startswith(prefix) else name
    for candidate in (name, name + ".py"):
        path = os.path.join(CONFIG_DIR, candidate)
        if os.path.isfile(path):
            return f"--config={path}{m.group(2)}"
    return arg


def parse_args(argv: list[str], check: bool = True):
    """Parse flags into (config, workdir, distributed). Raises UsageError with a one-line message.
    check=False skips the checks of paths the job would read (ng_jax.plan needs no weights)."""
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file("config", None, "Path to a config .py file.", flag_values=fv,
                                                   sys_argv=list(argv))
    flags.DEFINE_string("workdir", None, "Output directory (default: config.workdir).", flag_values=fv)
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host).",
                      flag_values=fv)

    argv = [argv[0]] + [resolve_config(a) for a in argv[1:]]
    for arg in argv[1:]:
        m = re.match(r"--config=([^:]+)", arg)
        if m and not os.path.isfile(m.group(1)):
            raise UsageError(f"config file not found: {m.group(1)} (nor among the shipped configs in {CONFIG_DIR})")
    if not any(a.startswith("--config=") for a in argv[1:]):
        raise UsageError("missing --config=ng_jax/configs/NAME.py")
    try:
        fv(argv)
        config = config_flag.value
    except flags.UnrecognizedFlagError as err:
        if err.flagname.startswith("config."):
            raise UsageError(f"unknown config key '{err.flagname[len('config.'):]}'") from None
        raise UsageError(f"unknown flag: {err.flagname}") from None
    except flags.IllegalFlagValueError as err:
        raise UsageError(f"bad value: {str(err).splitlines()[0]}") from None
    except AttributeError as err:
        bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        raise UsageError(f"unknown config key {err} in {' '.join(bad)}") from None
    except KeyError as err:
        raise UsageError(f"unknown config key {err}") from None
    except flags.Error as err:
        raise UsageError(str(err).splitlines()[0]) from None
    except (SyntaxError, ImportError, TypeError, ValueError) as err:
        raise UsageError(f"cannot load config: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    if "job" not in config or config.job not in JOBS:
        raise UsageError(f"config.job must be one of {sorted(JOBS)}, got {config.get('job')!r}")
    workdir = fv.workdir or config.get("workdir") or os.path.join("workdirs", config.get("name", config.job))

    try:
        if check:
            check_config(config)
    except ValueError as err:
        raise UsageError(f"invalid config: {err}") from None
    return config, workdir, fv.distributed


def compile_cache_dir(environ=os.environ) -> str | None:
    """The persistent compilation cache's directory for this process, or None when it is disabled."""
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return environ["JAX_COMPILATION_CACHE_DIR"]
    chosen = environ.get("NG_JAX_COMPILE_CACHE", "")
    if chosen.lower() in ("off", "0", "false", "none"):
        return None
    if chosen:
        return chosen
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ng_jax", "xla")


def enable_compile_cache(jax) -> str | None:
    """Point JAX's persistent compilation cache at `compile_cache_dir()` (once per process; programs that
    compile in under half a second are not worth a disk round trip)."""
    directory = compile_cache_dir()
    if directory is None or jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", directory)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return directory


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    try:
        config, workdir, distributed = parse_args(argv)
    except UsageError as err:
        print(f"ng_jax: error: {err}", file=sys.stderr)
        return 2
    import jax

    enable_compile_cache(jax)
    if distributed:
        # On TPU pods / SLURM / GKE the cluster is auto-detected; NG_COORDINATOR, NG_NUM_PROCESSES and
        # NG_PROCESS_ID name it explicitly (launch/local_multiprocess.sh: several processes on one machine).
        if os.environ.get("NG_COORDINATOR"):
            jax.distributed.initialize(coordinator_address=os.environ["NG_COORDINATOR"],
                                       num_processes=int(os.environ["NG_NUM_PROCESSES"]),
                                       process_id=int(os.environ["NG_PROCESS_ID"]))
        else:
            jax.distributed.initialize()
    module = importlib.import_module(JOBS[config.job])
    try:
        return int(module.run(config, workdir) or 0)
    except UsageError as err:
        print(f"ng_jax: error: {err}", file=sys.stderr)
        return 2
    except (UserError, FileNotFoundError) as err:  # the message says everything a user needs
        print(f"ng_jax: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
