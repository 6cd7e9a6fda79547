"""Profiles: named sets of papermill parameters, one YAML file per profile in ``profiles/``, and the one function
that turns a profile (plus explicit overrides) into a notebook's parameters.

A profile holds every number that differs between scales and budgets::

    description: one line on what the profile is for
    device: auto            # auto | cpu | cuda      (every notebook that declares `device`)
    seed: 0                 #                         (every notebook that declares `seed`)
    inputs: {...}           # paper scale only       (every notebook that declares `inputs`)
    shared:                 # settings several chapters share, written once (e.g. the TeCoA / FARE schedule):
      finetune: {...}       #   given to every notebook whose parameters cell declares the key
    world_clip: {...}       # settings of `rclip world-clip train` (gpu and smoke only)
    skip: {00_world: why}   # notebooks a profile does not run
    notebooks:
      00_world: {n_test: 500, ...}   # parameters of each notebook

A notebook's parameters are, in increasing precedence: the defaults of its ``parameters`` cell, the profile's
profile-wide keys, its ``shared`` keys, its section under ``notebooks``, and parameters given explicitly (papermill's
``-p key value``, ``rclip book --set NB.key=value``, or an edit of the parameters cell). :func:`resolve` computes
this; :func:`validate_profile` refuses a key no notebook declares, naming the nearest valid one.
"""
from __future__ import annotations

import ast
import difflib
import functools
import json
import os
from pathlib import Path

import yaml

from rclip.errors import RClipError

PROFILE_KEYS = ("description", "device", "seed", "inputs", "shared", "world_clip", "skip", "notebooks")
PROFILE_WIDE = ("device", "seed", "inputs")
RUNNER_KEYS = ("profile", "results_path")     # set by whoever runs the notebook, never by a profile


def project_root() -> Path:
    """The repository root: ``$RCLIP_ROOT``, else the directory above the package, else the working directory."""
    env = os.environ.get("RCLIP_ROOT")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent
    if (here / "profiles").is_dir():
        return here
    return Path.cwd()


def profile_dir() -> Path:
    return project_root() / "profiles"


def list_profiles() -> list[str]:
    return sorted(p.stem for p in profile_dir().glob("*.yml"))


def _nearest(word: str, options) -> str:
    near = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.0)
    return f"; did you mean {near[0]!r}?" if near else ""


def load_profile(name: str) -> dict:
    """The parsed profile ``name`` (e.g. ``"cpu"``); raises naming the file when it is missing or malformed."""
    path = profile_dir() / f"{name}.yml"
    if not path.is_file():
        raise RClipError(f"unknown profile {name!r}: {path} does not exist. Profiles: {', '.join(list_profiles())}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise RClipError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RClipError(f"{path} must be a mapping of profile keys ({', '.join(PROFILE_KEYS)})")
    for section in ("notebooks", "shared", "skip"):
        if data.get(section) is None:
            data[section] = {}
        if not isinstance(data[section], dict):
            raise RClipError(f"{path}: `{section}` must be a mapping")
    data["name"] = name
    data["path"] = str(path)
    return data


def notebook_path(notebook: str) -> Path:
    return project_root() / "notebooks" / f"{notebook}.ipynb"


def notebook_names() -> list[str]:
    """Notebook stems in execution order (their file names sort in chapter order)."""
    return sorted(p.stem for p in (project_root() / "notebooks").glob("*.ipynb"))


def _parameters_source(path: Path) -> str:
    nb = json.loads(path.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            src = cell["source"]
            return "".join(src) if isinstance(src, list) else src
    raise RClipError(f"{path} has no cell tagged `parameters`")


@functools.lru_cache(maxsize=64)
def _declared_cached(path: str, mtime: float) -> tuple[tuple[str, object], ...]:
    src = _parameters_source(Path(path))
    out = []
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                raise RClipError(f"{path}: parameter {node.targets[0].id} must have a literal default "
                                 f"(a number, string, list, dict, None)") from None
            out.append((node.targets[0].id, value))
    return tuple(out)


def declared_parameters(notebook: str) -> dict:
    """``{name: default}`` of the notebook's ``parameters`` cell (its literal assignments, in order)."""
    path = notebook_path(notebook)
    if not path.is_file():
        raise RClipError(f"no notebook {path}{_nearest(notebook, notebook_names())} Notebooks: "
                         f"{', '.join(notebook_names())}")
    return {k: _copy(v) for k, v in _declared_cached(str(path), path.stat().st_mtime)}


def _copy(value):
    return json.loads(json.dumps(value)) if isinstance(value, (list, dict)) else value


def validate_profile(name: str) -> dict:
    """Load profile ``name`` and check every key against the notebooks' parameters cells; returns the profile.

    Fails, naming the key and the nearest valid one, on: an unknown top-level key, a notebook section or skip entry
    that names no notebook, a notebook key its parameters cell does not declare (or that only a runner sets), a
    ``shared`` key that no notebook declares."""
    prof = load_profile(name)
    where = prof["path"]
    for key in prof:
        if key not in (*PROFILE_KEYS, "name", "path"):
            raise RClipError(f"{where}: unknown top-level key {key!r}{_nearest(key, PROFILE_KEYS)}")
    names = notebook_names()
    declared = {nb: declared_parameters(nb) for nb in names}
    for section in ("notebooks", "skip"):
        for nb in prof[section]:
            if nb not in declared:
                raise RClipError(f"{where}: {section}.{nb} names no notebook{_nearest(nb, names)}")
    for nb, params in prof["notebooks"].items():
        if params is None:
            continue
        if not isinstance(params, dict):
            raise RClipError(f"{where}: notebooks.{nb} must be a mapping of parameters")
        for key in params:
            if key in RUNNER_KEYS or key not in declared[nb]:
                options = [k for k in declared[nb] if k not in RUNNER_KEYS]
                raise RClipError(f"{where}: notebooks.{nb}.{key} is not a parameter of notebooks/{nb}.ipynb"
                                 f"{_nearest(key, options)}")
    every = set().union(*(set(d) for d in declared.values())) if declared else set()
    for key in prof["shared"]:
        if key in RUNNER_KEYS or key not in every:
            raise RClipError(f"{where}: shared.{key} is declared by no notebook{_nearest(key, every)}")
    return prof


def resolve(notebook: str, profile: str, explicit: dict | None = None) -> tuple[dict, list[str]]:
    """The parameters of ``notebook`` under ``profile`` with ``explicit`` overrides.

    Returns ``(parameters, overridden)``: every declared parameter with its resolved value, and the names given
    explicitly. An explicit name the notebook does not declare is an error naming the nearest declared one."""
    declared = declared_parameters(notebook)
    explicit = dict(explicit or {})
    for key in explicit:
        if key not in declared:
            raise RClipError(f"{key!r} is not a parameter of notebooks/{notebook}.ipynb{_nearest(key, declared)}")
    prof = validate_profile(profile)
    params = dict(declared)
    for key in PROFILE_WIDE:
        if key in prof and key in declared:
            params[key] = _copy(prof[key])
    params.update({k: _copy(v) for k, v in prof["shared"].items() if k in declared})
    params.update({k: _copy(v) for k, v in (prof["notebooks"].get(notebook) or {}).items()})
    params["profile"] = profile
    params.update(explicit)
    overridden = [k for k in explicit if k not in RUNNER_KEYS]
    return params, overridden


def notebook_parameters(profile: str, notebook: str) -> dict:
    """The resolved parameters of ``notebook`` under ``profile`` (no overrides)."""
    return resolve(notebook, profile)[0]


def parse_overrides(items: list[str] | None, notebooks: list[str]) -> dict[str, dict]:
    """``["01_cola.n_eval=500", ...]`` -> ``{"01_cola": {"n_eval": 500}}`` (values parsed as YAML)."""
    out: dict[str, dict] = {}
    for item in items or []:
        target, sep, raw = item.partition("=")
        nb, dot, key = target.partition(".")
        if not sep or not dot or not key:
            raise RClipError(f"--set {item!r}: write NOTEBOOK.KEY=VALUE, e.g. 01_cola.n_eval=500")
        if nb not in notebooks:
            raise RClipError(f"--set {item!r}: no notebook {nb!r}{_nearest(nb, notebooks)}")
        declared = declared_parameters(nb)
        if key not in declared or key in RUNNER_KEYS:
            raise RClipError(f"--set {item!r}: {key!r} is not a parameter of {nb}{_nearest(key, declared)}")
        out.setdefault(nb, {})[key] = yaml.safe_load(raw)
    return out
