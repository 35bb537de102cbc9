"""The JSON files of model directories (a bundle's config.json, a diffusers component's config.json)."""

from __future__ import annotations

import json
import os

from ng_jax import storage


def read_json(directory: str, name: str = "config.json", *, error: type[Exception], where: str | None = None,
              hint: str = "") -> dict:
    """DIRECTORY/NAME parsed; a missing file or invalid JSON is one `error` naming `where` (default the
    directory) and the file, plus `hint`."""
    where = where or directory
    path = os.path.join(directory, name)
    if not storage.is_file(path):
        raise error(f"{where}: no {name}{hint}")
    try:
        return json.loads(storage.path(path).read_text())
    except json.JSONDecodeError as err:
        raise error(f"{where}: {name} is not valid JSON ({err})") from None
