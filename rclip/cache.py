"""The artefact cache: one directory (``RCLIP_CACHE``), keys from parameters, atomic writes.

A file is first written under a temporary name in the same directory and then renamed into place (``os.replace``
is atomic on POSIX), so an interrupted write never leaves a half-written file under the final name.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Training-loop fields that never change the weights a run produces: left out of every cache key.
BOOKKEEPING = ("log_every", "ckpt_every", "eval_every", "num_workers", "max_minutes")


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


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """A hash of the ``rclip`` package's Python sources: part of every cache key, so an artefact made by other
    code is never read back as this code's."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def cache_key(params) -> dict | list | object:
    """The one cache-key rule: every field that changes the weights and nothing else. Dataclasses become dicts,
    sets sorted lists, tuples lists; the bookkeeping fields of training loops (:data:`BOOKKEEPING`) are dropped
    wherever they appear."""
    import dataclasses

    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        params = dataclasses.asdict(params)
    if isinstance(params, dict):
        return {str(k): cache_key(v) for k, v in params.items() if k not in BOOKKEEPING}
    if isinstance(params, (set, frozenset)):
        return sorted(cache_key(v) for v in params)
    if isinstance(params, (list, tuple)):
        return [cache_key(v) for v in params]
    return params


def artefact_path(kind: str, params: dict, suffix: str = "", root: str | Path | None = None) -> Path:
    """``<cache>/<kind>/<key><suffix>``: where an artefact made from ``params`` by this code lives (the key is
    :func:`cache_key` of ``params`` plus :func:`code_hash` and the engine in force, :func:`rclip.engine.mode`:
    the fast engine trains in bf16 on the CPU, the plain one in fp32). ``root`` replaces ``$RCLIP_CACHE``."""
    from rclip import engine

    d = (Path(root) if root is not None else cache_root()) / kind
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{key_of({'params': cache_key(params), 'code': code_hash(), 'engine': engine.mode()})}{suffix}"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())     # as ordinary tools write files (mkstemp's 0600 hides them from others)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


_USED: dict[str, str] = {}


def note_used(kind: str, path: Path, sha256: str) -> None:
    """Record that this process read (or wrote) the cached artefact ``path`` with checksum ``sha256``."""
    _USED[f"{kind}/{Path(path).name}"] = sha256


def used_artefacts() -> dict[str, str]:
    """``{kind/file: sha256}`` of every cached artefact this process used (recorded with a notebook's results)."""
    return dict(sorted(_USED.items()))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically (sorted keys, indented)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def entries(root: str | Path | None = None) -> list[dict]:
    """Every artefact in the cache: ``{"kind", "path", "bytes", "complete"}``; a trained model is complete when
    its log (written last) is beside it. Leftover partial files (``*.part``) and run directories are listed too."""
    root = Path(root) if root is not None else cache_root()
    out = []
    for kind in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(kind.iterdir()):
            if path.name.endswith(".log.json") or path.name.endswith(".extra.pt"):
                continue
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() \
                else path.stat().st_size
            status = ("partial" if path.name.endswith(".part") else "checkpoints" if path.is_dir()
                      else "complete" if path.suffix != ".safetensors"
                      or path.with_suffix(".log.json").is_file() else "incomplete")
            out.append({"kind": kind.name, "path": path, "bytes": size, "status": status})
    return out


def verify_entries(root: str | Path | None = None) -> list[tuple[Path, str]]:
    """Check every trained artefact against the checksum its log recorded; returns ``[(path, problem), ...]``."""
    from rclip.errors import RClipError
    from rclip.train import verify_artefact

    bad = []
    for e in entries(root):
        if e["status"] == "complete" and e["path"].suffix == ".safetensors":
            try:
                verify_artefact(e["path"], e["path"].with_suffix(".log.json"), e["path"].with_suffix(".extra.pt"))
            except RClipError as exc:
                bad.append((e["path"], str(exc)))
    return bad
