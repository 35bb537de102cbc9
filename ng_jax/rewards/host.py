"""Rewards on the host: the `Reward` protocol, validated weighted sums, and the jax-side bridge.

A reward model is any callable `reward(images uint8 [B, H, W, 3], prompts) -> float32 [B]` with a
`name`. `WeightedRewards` calls several of them (optionally each in its own thread with a
per-call timeout, with retries), validates every output and returns the weighted total and the
unweighted parts. Anything wrong raises a `RewardError` that names the reward and the problem.

Inside jitted code, `make_reward_fn` scores the rollout where it lies: images are device arrays
(converted to uint8 on device), prompts are strings on the host, so the jitted side passes
integer prompt ids into a `PromptTable` the host keeps. The host call is a `jax.pure_callback`
inside `jax.shard_map`, so every device hands its own shard to its own host process.

Evaluation, which already holds uint8 images and prompt strings, calls
`WeightedRewards.score_host(images, prompts)` directly.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable, Mapping, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from ng_jax.errors import UserError, one_line

__all__ = ["Reward", "RewardError", "WeightedRewards", "PromptTable", "check_reward_output",
           "images_to_uint8", "make_reward_fn", "reset_callback_tokens", "reward_failures", "quiet_reward_error_logs"]

# At most this many offending indices are listed in a non-finite-values message.
_MAX_LISTED = 10


@runtime_checkable
class Reward(Protocol):
    """A reward model: `name`, and `__call__(images, prompts) -> float32 [B]`.

    `images` is a numpy uint8 array [B, H, W, 3] in [0, 255]; `prompts` holds B strings, one per
    image. Implementations must be safe to call from several threads at once (the jax bridge
    scores device shards concurrently), and must not run JAX computations on the devices of the
    run: they are called from inside the rollout's device computation, and on a backend with
    several CPU devices such a call waits forever for the busy devices (the shipped verifier runs
    its detector in numpy for this reason). Use numpy / a framework on its own devices / a
    reward server (`ng_jax.rewards.remote`).
    """

    name: str

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        ...


class RewardError(UserError, RuntimeError):
    """A reward model failed: raised, returned a wrong shape / dtype / non-finite value, or timed out."""


def check_reward_output(name: str, scores, batch: int) -> np.ndarray:
    """Validates a reward's output: castable to float32, shape (batch,), all finite -> float32 [batch]."""
    raw = np.asarray(scores)
    if raw.dtype.kind not in "biuf":
        raise RewardError(f"reward {name!r} returned values of dtype {raw.dtype}; expected real numbers "
                          "castable to float32")
    if raw.shape != (batch,):
        raise RewardError(f"reward {name!r} returned shape {raw.shape}; expected ({batch},), one score per image")
    out = raw.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        listed = ", ".join(str(i) for i in bad[:_MAX_LISTED]) + (", ..." if bad.size > _MAX_LISTED else "")
        raise RewardError(f"reward {name!r} returned {bad.size} non-finite value(s) (NaN/inf, after the cast "
                          f"to float32) at batch indices [{listed}]")
    return out


def _check_host_batch(images, prompts) -> int:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        desc = f"{type(images).__name__} {getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}"
        raise ValueError(f"reward input images must be a numpy uint8 array [B, H, W, 3], got {desc}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images; expected one prompt per image")
    return images.shape[0]


class WeightedRewards:
    """Several rewards and their weights: `score_host(images, prompts) -> (total [B], parts)`.

    Args:
      rewards: name -> Reward. The order of this dict is the order of `names` (and of the
        columns of `make_reward_fn`'s parts).
      weights: name -> weight; must have exactly the same names.
      timeout_s: None or 0: call the rewards one after another in the calling thread, no limit.
        > 0: call every reward in its own daemon thread, concurrently, and give up on a call
        that has not returned after `timeout_s` seconds (its thread is abandoned, not killed).
      retries: how many times a failing call (exception, invalid output or timeout) is repeated
        before its `RewardError` is raised.

    `parts` maps each name to its unweighted float32 [B] scores; `total = sum_i w_i * parts_i`.
    `last_error` holds the most recent failure (also when it was raised on a jax callback
    thread, where jax re-wraps it); `clear_error()` resets it.
    """

    def __init__(self, rewards: Mapping[str, Reward], weights: Mapping[str, float], timeout_s: float | None = None,
                 retries: int = 0):
        if not rewards:
            raise ValueError("WeightedRewards needs at least one reward; got none")
        if set(rewards) != set(weights):
            raise ValueError(f"reward names {sorted(rewards)} and weight names {sorted(weights)} differ; "
                             "expected one weight per reward")
        for name, reward in rewards.items():
            if not callable(reward):
                raise ValueError(f"reward {name!r} is a {type(reward).__name__}, not a callable Reward")
        self.weights = {}
        for name in rewards:
            w = weights[name]
            if isinstance(w, bool) or not isinstance(w, (int, float, np.floating, np.integer)) or not np.isfinite(w):
                raise ValueError(f"weight of reward {name!r} must be a finite number, got {w!r}")
            self.weights[name] = float(w)
        if timeout_s is not None and (isinstance(timeout_s, bool) or not timeout_s >= 0):
            raise ValueError(f"timeout_s must be None, 0 (no limit) or a positive number of seconds, got {timeout_s!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        self.rewards = dict(rewards)
        self.names = tuple(self.rewards)
        self.timeout_s = float(timeout_s) if timeout_s else None
        self.retries = retries
        # prompt -> metadata (e.g. GenEval's tag / include / exclude) from a JSONL prompt file; rewards whose
        # `uses_metadata` is true are called with `metadata=[one dict or None per image]`
        self.metadata: dict[str, dict] = {}
        self.on_device: dict[str, Callable] = {}  # name -> device_fn of the rewards placed on the devices
        self._timing = (0.0, float("inf"), float("-inf"))  # host-callback seconds: busy sum, first start, last end
        self._lock = threading.Lock()
        self.last_error: BaseException | None = None

    # -- errors ----------------------------------------------------------------------------------

    def clear_error(self) -> None:
        with self._lock:
            self.last_error = None

    def _record(self, err: BaseException) -> BaseException:
        with self._lock:
            self.last_error = err
        return err

    # -- one reward --------------------------------------------------------------------------------

    def _call_once(self, name: str, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        reward = self.rewards[name]
        try:
            if getattr(reward, "uses_metadata", False):
                scores = reward(images, prompts, metadata=[self.metadata.get(p) for p in prompts])
            else:
                scores = reward(images, prompts)
        except RewardError:
            raise  # already names the reward and the problem (e.g. a RemoteReward)
        except Exception as err:
            raise RewardError(f"reward {name!r} raised {type(err).__name__}: {err}") from err
        return check_reward_output(name, scores, images.shape[0])

    def _start(self, name: str, images: np.ndarray, prompts: list[str]) -> Callable[[float | None], np.ndarray]:
        """Runs one call in a daemon thread; returns `wait(deadline) -> scores` (raises RewardError)."""
        box: dict = {}

        def target():
            try:
                box["scores"] = self._call_once(name, images, prompts)
            except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
                box["error"] = err

        thread = threading.Thread(target=target, name=f"reward-{name}", daemon=True)
        thread.start()

        def wait(deadline: float | None) -> np.ndarray:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                raise RewardError(f"reward {name!r} timed out after {self.timeout_s:g} s "
                                  f"(batch of {images.shape[0]} images)")
            if "error" in box:
                raise box["error"]
            return box["scores"]

        return wait

    # -- all rewards -------------------------------------------------------------------------------

    def _attempt(self, names: Sequence[str], images, prompts) -> tuple[dict, dict]:
        """One attempt for `names`: (scores by name, RewardError by name)."""
        scores, errors = {}, {}
        if self.timeout_s is None:
            for name in names:
                try:
                    scores[name] = self._call_once(name, images, prompts)
                except RewardError as err:
                    errors[name] = err
            return scores, errors
        deadline = time.monotonic() + self.timeout_s
        waits = {name: self._start(name, images, prompts) for name in names}
        for name, wait in waits.items():
            try:
                scores[name] = wait(deadline)
            except RewardError as err:
                errors[name] = err
        return scores, errors

    # -- placement -------------------------------------------------------------------------------

    def place_on_device(self, name: str) -> None:
        """Score reward `name` on the devices inside the rollout's jit (its `device_fn()`, e.g. the CLIP
        rewards) instead of in the host callback; its text features come from `device_inputs`."""
        reward = self.rewards.get(name)
        if reward is None or not callable(getattr(reward, "device_fn", None)):
            raise ValueError(f"reward {name!r} cannot run on the devices (only rewards with a device_fn: clip_score, "
                             "pickscore, hpsv2); place it on the host")
        self.on_device[name] = reward.device_fn()

    def take_timing(self) -> tuple[float, float]:
        """(seconds spent in host-callback scoring summed over callbacks, seconds from the first callback's start
        to the last one's end) since the last call; resets both."""
        with self._lock:
            busy, first, last = self._timing
            self._timing = (0.0, float("inf"), float("-inf"))
        return busy, max(0.0, last - first) if last >= first else 0.0

    @property
    def host_names(self) -> tuple[str, ...]:
        return tuple(n for n in self.names if n not in self.on_device)

    def device_inputs(self, prompts: Sequence[str]) -> dict:
        """name -> text features [len(prompts), D] of each device-placed reward (host-computed, cached per prompt)."""
        return {name: np.asarray(self.rewards[name].text_features([str(p) for p in prompts]), np.float32)
                for name in self.on_device}

    def score_host(self, images: np.ndarray, prompts: Sequence[str], names: Sequence[str] | None = None
                   ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Scores a host batch: uint8 [B, H, W, 3] images and B prompts -> (total [B], parts by name), over
        every reward (`names`: these only)."""
        _check_host_batch(images, prompts)
        prompts = [str(p) for p in prompts]
        parts: dict[str, np.ndarray] = {}
        names = tuple(self.names if names is None else names)
        pending = list(names)
        errors: dict = {}
        for _ in range(self.retries + 1):
            scores, errors = self._attempt(pending, images, prompts)
            parts.update(scores)
            pending = [n for n in pending if n not in scores]
            if not pending:
                break
        if pending:
            err = errors[pending[0]]
            if self.retries:
                err = RewardError(f"{err} (failed {self.retries + 1} attempts)")
                err.__cause__ = errors[pending[0]].__cause__
            raise self._record(err)
        total = np.zeros((images.shape[0],), np.float32)
        for name in names:
            total += np.float32(self.weights[name]) * parts[name]
        return total, {name: parts[name] for name in names}

    __call__ = score_host

    def score_stacked(self, images: np.ndarray, prompts: Sequence[str], names: Sequence[str] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """`score_host` with the parts stacked as float32 [B, len(names)] (columns in `names` order)."""
        names = tuple(self.names if names is None else names)
        start = time.perf_counter()
        try:
            total, parts = self.score_host(images, prompts, names)
        finally:
            end = time.perf_counter()
            with self._lock:  # callbacks of several devices run in parallel threads
                busy, first, last = self._timing
                self._timing = (busy + end - start, min(first, start), max(last, end))
        if not names:
            return total, np.zeros((images.shape[0], 0), np.float32)
        return total, np.stack([parts[name] for name in names], axis=1).astype(np.float32)


class PromptTable(list):
    """The host's prompt strings; jitted code refers to them by index (int32 prompt ids).

    A plain list works too (`make_reward_fn` reads whatever sequence it is given at call time,
    so the training loop may refill it in place each epoch: `table[:] = prompts`).
    """

    def lookup(self, prompt_ids) -> list[str]:
        return lookup_prompts(self, prompt_ids)


def lookup_prompts(table: Sequence[str], prompt_ids) -> list[str]:
    """`[table[i] for i in prompt_ids]` with a clear error for ids outside the table."""
    ids = np.asarray(prompt_ids).reshape(-1)
    bad = ids[(ids < 0) | (ids >= len(table))]
    if bad.size:
        raise RewardError(f"prompt ids {bad[:_MAX_LISTED].tolist()} are outside the prompt table of "
                          f"{len(table)} prompts; expected ids in [0, {len(table)})")
    return [str(table[int(i)]) for i in ids]


def images_to_uint8(images: jax.Array) -> jax.Array:
    """[-1, 1] float images -> uint8 [0, 255] (round to nearest, clipped); uint8 passes through."""
    if images.dtype == jnp.uint8:
        return images
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"reward images must be float in [-1, 1] or uint8, got dtype {images.dtype}")
    x = (images.astype(jnp.float32) + 1.0) * 127.5
    return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)


def reset_callback_tokens(mesh: Mesh) -> None:
    """Replaces jax's record of a failed host-callback computation on every device of `mesh`.

    jax keeps, per device, the runtime token of the last computation with host callbacks that it
    dispatched through its Python path (the first call of each jitted function), and at
    interpreter exit waits on them: a token from a failed callback re-raises there as two
    "Exception ignored in atexit callback" tracebacks. Later calls of an already-compiled
    function do not replace the token. Running a freshly built trivial callback on every device
    does. Call this after handling a reward failure if the process goes on (or exits quietly).
    """
    axes = tuple(mesh.axis_names)

    def local_identity(x):  # a new closure each call, so jax takes its Python dispatch path
        return jax.pure_callback(lambda a: np.asarray(a), jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    fresh = jax.jit(jax.shard_map(local_identity, mesh=mesh, in_specs=PartitionSpec(axes),
                                  out_specs=PartitionSpec(axes), check_vma=False))
    jax.block_until_ready(fresh(jnp.zeros((mesh.size,), jnp.int32)))


def make_reward_fn(weighted: WeightedRewards, prompt_table: Sequence[str], mesh: Mesh,
                   batch_spec: PartitionSpec) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """`fn(images, prompt_ids) -> (total float32 [B], parts float32 [B, len(weighted.names)])`.

    `images` are [B, H, W, 3], float in [-1, 1] or uint8; `prompt_ids` int [B] index
    `prompt_table` (read at call time, so it may be refilled in place between calls). Both are
    sharded by `batch_spec` over `mesh` (this project: `P(("data", "fsdp"))`), and so are the
    outputs. The function may be called eagerly or traced inside a larger `jax.jit`.

    Why `shard_map`: a `jax.pure_callback` under plain `jit` with a sharded batch runs once, on
    one device, with the whole global array: XLA gathers every shard to that device's host first.
    That does not scale to pods (one host scores everything, the others wait) and serialises the
    scoring. Inside `jax.shard_map` the callback runs once per device on its local shard, on the
    host that owns the device, so every host scores only its own images, in parallel. Devices that
    hold the same batch shard (mesh axes not named in `batch_spec`, e.g. "tensor") each score
    their identical copy. The images are converted to uint8 on device before the callback (a
    quarter of the float32 transfer). Every host must hold the same prompt table.

    `pure_callback` is used because scoring is a pure function of its inputs; jax may drop the
    call if the outputs are unused.

    Errors: an exception raised on the host inside a callback reaches the caller as a jax runtime
    error whose text ends with the original message. The `RewardError` itself is kept in
    `weighted.last_error`; when this function is called eagerly it re-raises that `RewardError`
    (chained) instead of the jax error. Callers that trace it into their own jit should
    `jax.block_until_ready` the result before fetching it (reading a failed sharded result
    directly with `device_get` can abort the process at exit on the CPU backend), check
    `weighted.last_error` when that raises, and call `reset_callback_tokens(mesh)`.
    """
    host_names = weighted.host_names
    n_rewards = len(host_names)

    def host_score(images_u8, prompt_ids):
        images_u8 = np.asarray(images_u8)
        try:
            prompts = lookup_prompts(prompt_table, prompt_ids)
            return weighted.score_stacked(images_u8, prompts, host_names)
        except BaseException as err:  # noqa: BLE001 - recorded for the caller, then re-raised
            weighted._record(err)
            raise

    def local_score(images, prompt_ids):
        b = images.shape[0]
        out_shapes = (jax.ShapeDtypeStruct((b,), jnp.float32), jax.ShapeDtypeStruct((b, n_rewards), jnp.float32))
        return jax.pure_callback(host_score, out_shapes, images, prompt_ids.astype(jnp.int32))

    sharded = jax.shard_map(local_score, mesh=mesh, in_specs=(batch_spec, batch_spec),
                            out_specs=(batch_spec, batch_spec), check_vma=False)

    def score_on_device(images, prompt_ids, device_inputs=None):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"reward images must have shape [B, H, W, 3], got {images.shape}")
        if prompt_ids.shape != images.shape[:1]:
            raise ValueError(f"prompt_ids has shape {prompt_ids.shape}; expected ({images.shape[0]},), one id "
                             "per image")
        if not jnp.issubdtype(prompt_ids.dtype, jnp.integer):
            raise ValueError(f"prompt_ids must be integers, got dtype {prompt_ids.dtype}")
        if not weighted.on_device:
            return sharded(images_to_uint8(images), prompt_ids)
        if n_rewards:
            total, host_parts = sharded(images_to_uint8(images), prompt_ids)
        else:  # every reward on the devices: no host callback at all
            total, host_parts = jnp.zeros(images.shape[:1], jnp.float32), None
        columns = {}
        for name, fn in weighted.on_device.items():  # batch-parallel on the mesh, like the images
            columns[name] = fn(images, jnp.asarray(device_inputs[name])[prompt_ids]).astype(jnp.float32)
            total = total + jnp.float32(weighted.weights[name]) * columns[name]
        for i, name in enumerate(host_names):
            columns[name] = host_parts[:, i]
        return total, jnp.stack([columns[name] for name in weighted.names], axis=1)

    jitted = jax.jit(score_on_device)

    def reward_fn(images, prompt_ids, device_inputs=None):
        """`device_inputs`: `weighted.device_inputs(prompt_table)` when rewards are placed on the devices."""
        images, prompt_ids = jnp.asarray(images), jnp.asarray(prompt_ids)
        if weighted.on_device and device_inputs is None:
            raise ValueError(f"rewards {sorted(weighted.on_device)} run on the devices: pass device_inputs "
                             "(weighted.device_inputs(prompt_table))")
        if isinstance(images, jax.core.Tracer) or isinstance(prompt_ids, jax.core.Tracer):
            return score_on_device(images, prompt_ids, device_inputs)
        weighted.clear_error()
        try:
            return jax.block_until_ready(jitted(images, prompt_ids, device_inputs))
        except Exception as err:
            reset_callback_tokens(mesh)
            stored = weighted.last_error
            if stored is None or stored is err:
                raise
            raise stored  # keeps its own cause (the reward's exception); the jax error is its context

    return reward_fn


@contextlib.contextmanager
def reward_failures(weighted: WeightedRewards, mesh: Mesh, where: str, after: str = ""):
    """Around a computation whose host callbacks score `weighted` (and a `block_until_ready`, so that a
    failing callback surfaces inside): a reward failure becomes ONE `RewardError`
    "`where`: <what the reward did>; `after`", with the callback tokens reset so the next computation
    runs. Any other error is not a reward problem and keeps jax's own message and traceback."""
    weighted.clear_error()
    try:
        yield
    except Exception as err:
        try:
            reset_callback_tokens(mesh)
        except Exception:  # noqa: BLE001 - never mask the error being reported
            pass
        cause = weighted.last_error
        if cause is None and not isinstance(err, RewardError):
            raise
        raise RewardError(f"{where}: {one_line(cause or err)}" + (f"; {after}" if after else "")) from err


class _DropRewardErrorLogs(logging.Filter):
    """jax logs every failed host callback with a full traceback, once per device shard. A RewardError
    already names the reward and the problem and is reported in one line, so those records are
    dropped; any other callback failure (a bug) is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, RewardError)


@contextlib.contextmanager
def quiet_reward_error_logs():
    """Inside: jax's per-shard tracebacks of failed reward callbacks are not logged (see above)."""
    logger, quiet = logging.getLogger("jax._src.callback"), _DropRewardErrorLogs()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
