"""Shared test setup: 8 fake CPU devices for sharding tests, deterministic host RNG, and the tiny
pretrained reference bundle (built once per test session, shared by the xdist workers)."""
import os

# Must be set before jax is imported anywhere in the test session.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
# XLA's C++ warnings (e.g. SPMD rematerialisation notes on tiny sharded test shapes) flood the log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Jobs started by tests compile afresh (no persistent compilation cache in ~/.cache; see ng_jax.main).
os.environ.setdefault("NG_JAX_COMPILE_CACHE", "off")

import dataclasses  # noqa: E402

import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402


@pytest.fixture
def np_rng():
    import numpy as np

    return np.random.default_rng(0)


@dataclasses.dataclass(frozen=True)
class TinyReference:
    bundle: str   # the bundle directory (read only: copy it to change it)
    prompts: str  # a prompt file of tests.fixtures.PROMPTS


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory) -> TinyReference:
    """tests.fixtures.build_tiny_bundle, pretrained once per test session: under xdist in the session's
    shared temporary directory, the first worker that needs it builds it while the others wait."""
    from tests.fixtures import build_tiny_bundle, write_prompt_file

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # one directory per session, shared by its workers
    root = root / "tiny_reference"
    with FileLock(str(root) + ".lock"):
        if not (root / "bundle" / "params.msgpack").is_file():
            root.mkdir(exist_ok=True)
            write_prompt_file(str(root))
            os.replace(build_tiny_bundle(str(root / "bundle.partial")), root / "bundle")
    return TinyReference(bundle=str(root / "bundle"), prompts=str(root / "prompts.txt"))


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A GCS emulator for the test module (tests/gcs.py: gs://{tests.gcs.BUCKET}/...), its environment set in
    this process; yields a gcsfs filesystem on it. Skips the test without gcsfs or the emulator."""
    from tests.gcs import MISSING, emulator

    if MISSING:
        pytest.skip(MISSING)
    with emulator(tmp_path_factory.mktemp("gcs")) as fs:
        yield fs
