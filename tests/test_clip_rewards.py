"""Holds no tests: the name under which tests/test_real_model_rl.py imports `save_tiny_clip` (as a
top-level module). The CLIP reward tests are in tests/parity/test_clip_rewards.py; the builder is in
tests/fixtures.py. Delete this file once test_real_model_rl.py imports from tests.fixtures."""

from tests.fixtures import save_tiny_clip  # noqa: F401
