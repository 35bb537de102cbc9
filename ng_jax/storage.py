"""Where a job's files live: a local directory or a cloud bucket (`gs://bucket/path`), through `etils.epath`.

Every file a job reads from or writes to its workdir goes through `path()` (an `epath.Path`) or the
helpers below; orbax is given the path string itself (`canonical`), and reaches a bucket through
tensorstore. Local paths behave as they always did. A bucket differs in three ways, hidden here:

- no directories: there is nothing to create (`makedirs` checks that the bucket can be reached instead);
- no append: `append_text` rewrites the object (metrics.jsonl is small);
- no atomic rename: a whole-object write is already all-or-nothing, so files are written in place rather
  than through a temporary name; `move` of a directory copies it, then deletes the original.

A bucket needs gcsfs (a runtime requirement) and credentials as Google's client libraries find them (a
TPU VM's service account, or `gcloud auth application-default login`). TensorBoard's writer (tensorboardX)
writes gs:// itself, through google-cloud-storage.
"""

from __future__ import annotations

import json
import logging
import os
import uuid

from etils import epath

from ng_jax.errors import UserError, one_line


class StorageError(UserError, OSError):
    """A workdir that cannot be used: a bucket that does not exist or cannot be reached, gcsfs missing."""


def is_remote(p) -> bool:
    """Is `p` a URI (gs://, s3://, ...) rather than a local path?"""
    return "://" in os.fspath(p)


def path(p) -> epath.Path:
    return epath.Path(p)


def is_file(p, *names) -> bool:
    """Is `p` (joined with `names`, as os.path.join) an existing file, locally or in a bucket?"""
    return path(os.path.join(p, *names) if names else p).is_file()


def canonical(p) -> str:
    """The string orbax, messages and run ids get: an absolute path locally, the URI as given for a bucket."""
    s = os.fspath(p)
    return s.rstrip("/") if is_remote(s) else os.path.abspath(s)


_CHECKED: set[str] = set()


def makedirs(p) -> None:
    """Create a local directory (and its parents); for a bucket, check once per bucket that it can be reached
    (StorageError, one line, otherwise)."""
    if not is_remote(p):
        os.makedirs(p, exist_ok=True)
        return
    s = os.fspath(p)
    scheme, rest = s.split("://", 1)
    bucket = f"{scheme}://{rest.split('/', 1)[0]}"
    if bucket in _CHECKED:
        return
    quiet = logging.getLogger("gcsfs")  # its retries log tracebacks; the error below says what failed
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        found = epath.Path(bucket).exists()
    except ImportError as err:
        raise StorageError(f"{s}: a {scheme}:// workdir needs gcsfs (pip install gcsfs==2026.10.1): "
                           f"{one_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - network, credentials: many types
        raise StorageError(f"{s}: cannot reach {bucket} ({type(err).__name__}: {one_line(err)[:300]})") from None
    finally:
        quiet.setLevel(level)
    if not found:
        raise StorageError(f"{s}: bucket {bucket} does not exist or these credentials cannot read it")
    _CHECKED.add(bucket)


def write_bytes(p, data: bytes) -> None:
    """Write a whole file: locally through a temporary name and a rename (a reader sees all of it or nothing,
    and a kill leaves the previous version), in a bucket in place (one object upload is all-or-nothing)."""
    if is_remote(p):
        epath.Path(p).write_bytes(data)
        return
    s = os.fspath(p)
    os.makedirs(os.path.dirname(os.path.abspath(s)), exist_ok=True)
    tmp = f"{s}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, s)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(p, text: str) -> None:
    write_bytes(p, text.encode("utf-8"))


def append_text(p, text: str) -> None:
    """Append to a file (in a bucket: read the object and write it back with `text` at the end)."""
    if not is_remote(p):
        with open(p, "a") as f:
            f.write(text)
        return
    target = epath.Path(p)
    old = target.read_text() if target.exists() else ""
    target.write_text(old + text)


def read_text(p) -> str | None:
    """A file's text, or None when there is no such file."""
    target = epath.Path(p)
    return target.read_text() if target.is_file() else None


def read_json(p):
    """A JSON file parsed, or None when there is no such file."""
    text = read_text(p)
    return None if text is None else json.loads(text)


def listdir(p) -> list[str]:
    """The names in a directory (none when it does not exist: a bucket has no empty directories)."""
    target = epath.Path(p)
    if not target.exists():
        return []
    return sorted(child.name for child in target.iterdir())


def move(src, dst) -> None:
    """Move a file or directory `src` to `dst` (which must not exist): os.replace locally, copy then delete
    in a bucket."""
    if not is_remote(src):
        os.replace(src, dst)
        return
    from etils.epath import backend

    fs = backend.fsspec_backend.fs(src)  # the filesystem (and listing cache) that epath and orbax read through
    fs.copy(os.fspath(src), os.fspath(dst), recursive=True)  # server-side copies
    fs.rm(os.fspath(src), recursive=True)
