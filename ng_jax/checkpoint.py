"""A thin orbax wrapper: save a state pytree plus JSON metadata, restore into target shardings.

A checkpoint that cannot be read, or whose tree/shapes differ from what the run expects, raises
`CheckpointError` naming the directory and the mismatch: a run never silently starts from scratch
when it was asked to resume.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import threading
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ng_jax import storage
from ng_jax.errors import UserError, one_line
from ng_jax.sharding import any_process


class CheckpointError(UserError, RuntimeError):
    pass


def _abstract(tree):
    """ShapeDtypeStructs carrying each leaf's sharding (the restore target)."""
    def one(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.tree.map(one, tree)


def _describe_mismatch(expected, found: dict[str, tuple]) -> str:
    """List paths that are missing, unexpected or of another shape, comparing with saved metadata."""
    want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
    missing = sorted(set(want) - set(found))
    extra = sorted(set(found) - set(want))
    shapes = sorted(k for k in set(want) & set(found) if tuple(found[k]) != want[k])
    parts = []
    if missing:
        parts.append(f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
    if extra:
        parts.append(f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
    if shapes:
        parts.append("shape " + ", ".join(f"{k}: saved {found[k]} vs expected {want[k]}" for k in shapes[:5]))
    return "; ".join(parts)


class Checkpointer:
    """Step-numbered checkpoints of `{"state": pytree, "meta": json}` in `directory` (a local path or a bucket,
    gs://...: orbax writes a step to a temporary name and renames it when complete on a local disk; in a
    bucket it writes the step in place and marks it complete last, with commit_success.txt)."""

    def __init__(self, directory: str, *, max_to_keep: int = 3):
        self.directory = storage.canonical(directory)
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            )
        except Exception as err:  # e.g. the path is a file, or unreadable
            raise CheckpointError(f"cannot open checkpoint directory {self.directory}: {type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:300] if str(err) else ''}") from err

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def resume_step(self) -> int | None:
        """The step to resume from, or None when the directory is empty (a fresh run).

        A directory that holds something but no complete checkpoint (an interrupted first save,
        foreign files) raises CheckpointError rather than letting the run start over silently.
        """
        step = self.latest_step()
        if step is not None:
            return step
        entries = [e for e in storage.listdir(self.directory) if not e.startswith(".")]
        if entries:
            listed = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise CheckpointError(f"{self.directory} holds no complete checkpoint but is not empty ({listed}); "
                                  "remove it to start a fresh run")
        return None

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, meta: dict[str, Any] | None = None, *, force: bool = True) -> None:
        self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave(meta or {})),
            force=force,
        )

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def _restore_step(self, target_state, step: int):
        return self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(target_state)),
                                          meta=ocp.args.JsonRestore()))

    def newest_intact_step(self, target_state, below: int) -> int | None:
        """The newest step before `below` that restores into `target_state` (each one is read to know)."""
        for step in sorted((s for s in self.all_steps() if s < below), reverse=True):
            try:
                self._restore_step(target_state, step)
                return step
            except Exception:  # noqa: BLE001 - not intact either; try the one before
                continue
        return None

    def restore(self, target_state, step: int | None = None):
        """Restore into the structure, shapes, dtypes and shardings of `target_state`: the latest step, or
        `step` (`ckpt.restore_step`; the steps after it are moved aside to `<directory>.abandoned/`, so that
        the run continues from it and nothing is lost).

        Returns `(state, meta, step)`. Raises CheckpointError if no checkpoint exists, if `step` is not one,
        or if the checkpoint is corrupt or does not match the target; a corrupt one's error names the
        newest intact earlier step and how to resume from it.
        """
        self.wait()
        latest = self.latest_step()
        if step is not None and step not in self.all_steps():
            raise CheckpointError(f"ckpt.restore_step={step}: no such checkpoint in {self.directory} "
                                  f"(saved steps: {self.all_steps() or 'none'})")
        step = latest if step is None else int(step)
        if step is None:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        try:
            restored = self._restore_step(target_state, step)
        except Exception as err:  # orbax raises many types; all mean "cannot use this checkpoint"
            detail = ""
            try:
                found = self._saved_shapes(step)
                detail = _describe_mismatch(target_state, found) if found else ""  # nothing listed: corrupt
            except Exception:  # metadata unreadable too: the checkpoint is corrupt
                pass
            msg = f"cannot restore checkpoint step {step} from {self.directory}: "
            msg += detail if detail else f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            if not detail:  # corrupt, not mismatched: say which earlier checkpoint still works
                intact = self.newest_intact_step(target_state, step)
                msg += (f"; the newest intact checkpoint is step {intact}: resume from it with "
                        f"--config.ckpt.restore_step={intact}" if intact is not None else
                        "; no earlier checkpoint is intact either (remove the directory to start afresh)")
            raise CheckpointError(msg) from err
        self._check_shapes(target_state, restored.state, step)
        if latest is not None and step < latest:
            self._abandon_after(step)
        return restored.state, dict(restored.meta), step

    def _abandon_after(self, step: int) -> None:
        """Move the checkpoints after `step` to `<directory>.abandoned/` (process 0), so that training on from
        `step` saves its own; they are kept, not deleted."""
        later = [s for s in self.all_steps() if s > step]
        if jax.process_index() == 0:
            aside = self.directory.rstrip("/") + ".abandoned"
            storage.makedirs(aside)
            for s in later:
                storage.move(os.path.join(self.directory, str(s)), os.path.join(aside, str(s)))
            print(f"resuming from checkpoint step {step}: the later steps {later} were moved to {aside}")
        self._manager.reload()

    def _saved_shapes(self, step: int) -> dict[str, tuple]:
        meta = self._manager.item_metadata(step)
        tree = meta["state"] if isinstance(meta, dict) or hasattr(meta, "__getitem__") else meta.state
        out = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            shape = getattr(leaf, "shape", None)
            if shape is not None:
                out[jax.tree_util.keystr(path)] = tuple(shape)
        return out

    def _check_shapes(self, target, restored, step):
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(target)[0], jax.tree.leaves(restored)):
            if tuple(np.shape(a)) != tuple(np.shape(b)):
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory}: {jax.tree_util.keystr(path)} has shape "
                    f"{np.shape(b)}, expected {np.shape(a)}")

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def export_params(directory: str, params, note: dict) -> str:
    """Save a parameter tree with orbax in `directory/params` (every process must call this; it waits for
    the write) and, from process 0, `note` as `directory/<basename>.json` saying what the tree is and how
    to use it. Restore with `orbax.checkpoint.StandardCheckpointer().restore(directory/params)`."""
    directory = storage.canonical(directory)
    with ocp.StandardCheckpointer() as saver:
        saver.save(os.path.join(directory, "params"), params, force=True)
        saver.wait_until_finished()
    if jax.process_index() == 0:
        storage.write_text(os.path.join(directory, os.path.basename(directory) + ".json"), json.dumps(note, indent=2))
    return directory


class Preemption:
    """SIGTERM -> stop at the next step boundary on EVERY host, with a checkpoint.

    `should_stop()` is a collective (`sharding.any_process`): every process calls it at the same
    step boundary, so a SIGTERM that reaches one host of a pod stops them all at the same step
    (a host that stopped alone would leave the others waiting in the next collective). On one
    process it costs nothing. Use as a context manager; the previous handler is restored on exit.
    Handlers can only be installed from the main thread; elsewhere SIGTERM keeps its default.
    """

    def __init__(self):
        self.requested = False
        self._prev = None

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGTERM, self._set)
        return self

    def _set(self, *_):
        self.requested = True

    def should_stop(self) -> bool:
        return any_process(self.requested)

    def __exit__(self, *exc) -> None:
        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)
            self._prev = None


def load_params_file(path: str | pathlib.Path, template, what: str, tool: str):
    """Restore a parameter pytree from a msgpack file, checking every leaf shape against `template`; a missing,
    corrupt or mismatched file is a one-line error naming the command that trains it. The shipped
    networks' weights (verifier, preference reward, judge features) all load through here."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights not found at {path}; train them with `python -m {tool} --out {path.parent}`")
    try:
        params = flax.serialization.from_bytes(template, path.read_bytes())
    except Exception as err:  # msgpack / structure errors come in many types
        raise ValueError(f"{what} weights at {path} are corrupt or do not match the network "
                         f"({type(err).__name__}: {one_line(err)[:200]}); retrain with `python -m {tool}`") from None
    want = jax.tree.map(lambda x: tuple(x.shape), template)
    got = jax.tree.map(lambda x: tuple(np.shape(x)), params)
    if want != got:
        raise ValueError(f"{what} weights at {path} have parameter shapes that do not match the network "
                         f"(world vocabulary changed?); retrain with `python -m {tool}`")
    return jax.tree.map(jnp.asarray, params)
