"""A local GCS emulator for the tests that put workdirs in a bucket (gcp-storage-emulator, in memory, on
loopback; tests/gcs_emulator.py adds the generation header its downloads lack). The `gcs` fixture
(tests/conftest.py) starts one per test module.

The emulator serves both clients a run uses: gcsfs (etils.epath) and google-cloud-storage (TensorBoard's
events) through STORAGE_EMULATOR_HOST, and tensorstore (orbax's checkpoint arrays) through
TENSORSTORE_GCS_HTTP_URL, with a test token for its credentials.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time

from tests.fixtures import REPO

BUCKET = "ngjax-test"  # the emulator's bucket: tests write under gs://ngjax-test/<their own prefix>
# Why the emulator tests cannot run here, or None. Nothing imported: gcsfs reads its settings (set by
# `emulator`) when first imported.
MISSING = (None if importlib.util.find_spec("gcp_storage_emulator") and importlib.util.find_spec("gcsfs") else
           "needs gcsfs (requirements.txt) and gcp-storage-emulator (requirements-test.txt)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def emulator(log_dir):
    """The emulator's environment (set in this process, inherited by the jobs it starts); yields a gcsfs
    filesystem on it. The emulator is stopped, and the environment restored, on exit."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "STORAGE_EMULATOR_HOST": url,          # gcsfs and google-cloud-storage
        "TENSORSTORE_GCS_HTTP_URL": url,       # tensorstore (orbax)
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: no credentials lookup
        # gcsfs asks the storage-control gRPC API for the bucket's layout, which the emulator does not serve
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    # Its output goes to a file: it prints a traceback for every connection a client drops early, and an
    # unread pipe would fill up and stop it.
    log_path = os.path.join(log_dir, "emulator.log")
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "tests.gcs_emulator", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--default-bucket", BUCKET, "--in-memory", "-q"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(log_path) as f:
                    raise RuntimeError(f"the GCS emulator did not start: {f.read()[-2000:]}")
            time.sleep(0.2)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            import gcsfs

            yield gcsfs.GCSFileSystem()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
