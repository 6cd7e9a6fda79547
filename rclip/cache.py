"""The artefact cache: one directory (``RCLIP_CACHE``), keys from parameters, atomic writes.

A file is first written under a temporary name in the same directory and then renamed into place (``os.replace``
is atomic on POSIX), so an interrupted write never leaves a half-written file under the final name.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """``$RCLIP_CACHE``, else the user cache directory (``$XDG_CACHE_HOME/rclip`` or ``~/.cache/rclip``)."""
    env = os.environ.get("RCLIP_CACHE")
    if env:
        root = Path(env)
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rclip"
    root.mkdir(parents=True, exist_ok=True)
    return root


def key_of(params: dict) -> str:
    """A short stable hash of JSON-serialisable parameters (sorted keys), for cache file names."""
    blob = json.dumps(params, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def artefact_path(kind: str, params: dict, suffix: str = "") -> Path:
    """``<cache>/<kind>/<key><suffix>``: where an artefact made from ``params`` lives."""
    d = cache_root() / kind
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{key_of(params)}{suffix}"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically (sorted keys, indented)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
