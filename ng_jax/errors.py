"""One base class for the errors a user can act on, and the one-line form they are reported in.

Every error whose message says everything a user needs (a bad config, prompt file, checkpoint,
weights directory, reward, or a run that cannot go on) derives from `UserError`; the entry point
(`ng_jax.main`) prints any of them as one line and exits with status 1 (2 for config errors),
never with a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error reported to the user in one line, no traceback."""


class TrainingError(UserError, RuntimeError):
    """A run cannot go on (non-finite loss or gradient, ...); the message names where and the last checkpoint."""


def one_line(text) -> str:
    """The first three non-empty lines of `text` joined with ' | ', at most 800 characters."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return (" | ".join(lines[:3]) if lines else "")[:800]
