"""The persistent compilation cache that ng_jax.main turns on: where it goes, how it is turned off, and that
a second process finds the first one's programs there with the same results."""
import os
import subprocess
import sys

from ng_jax.main import compile_cache_dir

SNIPPET = """
import jax, jax.numpy as jnp
from ng_jax.main import enable_compile_cache
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event) if "cache_hits" in event else None)
print(enable_compile_cache(jax))
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0))
print(repr(f(jnp.arange(12.0).reshape(3, 4) / 7).tolist()))
print(len(hits))
"""


def test_cache_directory_rules():
    assert compile_cache_dir({"HOME": "/h"}) in ("/h/.cache/ng_jax/xla",
                                                  os.path.expanduser("~/.cache/ng_jax/xla"))
    assert compile_cache_dir({"XDG_CACHE_HOME": "/c"}) == "/c/ng_jax/xla"
    assert compile_cache_dir({"NG_JAX_COMPILE_CACHE": "/mine"}) == "/mine"
    assert compile_cache_dir({"NG_JAX_COMPILE_CACHE": "off"}) is None
    both = {"NG_JAX_COMPILE_CACHE": "off", "JAX_COMPILATION_CACHE_DIR": "/jax"}
    assert compile_cache_dir(both) == "/jax"   # JAX's own variable wins


def _run(env):
    out = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_second_process_reuses_the_cache(tmp_path):
    cache = tmp_path / "xla"
    env = {**os.environ, "NG_JAX_COMPILE_CACHE": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    first = _run(env)
    assert first[0] == str(cache) and first[2] == "0"
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "nothing was written to the compilation cache"
    second = _run(env)
    assert second[:2] == first[:2]      # same program, same numbers
    assert int(second[2]) >= 1          # found in the cache, not compiled again


def test_off_leaves_jax_without_a_cache(tmp_path):
    env = {**os.environ, "NG_JAX_COMPILE_CACHE": "off"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    assert _run(env)[0] == "None"
