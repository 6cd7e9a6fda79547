"""Profiles: named sets of papermill parameters, one YAML file per profile in ``profiles/``.

A profile holds every number that differs between scales and budgets::

    description: one line on what the profile is for
    device: auto            # auto | cpu | cuda
    seed: 0
    world_clip: {...}       # settings of `rclip world-clip train` (gpu and smoke only)
    notebooks:
      00_world: {n_test: 500, ...}   # papermill parameters of each notebook
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from rclip.errors import RClipError


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


def load_profile(name: str) -> dict:
    """The parsed profile ``name`` (e.g. ``"cpu"``)."""
    path = profile_dir() / f"{name}.yml"
    if not path.is_file():
        raise RClipError(f"unknown profile {name!r}: {path} does not exist. Profiles: {', '.join(list_profiles())}")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    data.setdefault("notebooks", {})
    data["name"] = name
    return data


def notebook_parameters(profile: str, notebook: str) -> dict:
    """Papermill parameters of ``notebook`` under ``profile`` (profile-wide device and seed included)."""
    prof = load_profile(profile)
    params = {"profile": profile, "device": prof.get("device", "auto"), "seed": prof.get("seed", 0)}
    if "inputs" in prof:  # paper scale: every notebook gets the profile's inputs (model, datasets, ...)
        params["inputs"] = prof["inputs"]
    params.update(prof["notebooks"].get(notebook) or {})
    return params
