"""The book pipeline: profiles -> papermill -> results JSON -> jupyter-book.

``run_book("cpu")`` executes every notebook in ``notebooks/`` with the profile's parameters into
``_build/cpu/book/`` (each notebook writes ``results/<notebook>.json`` there), stages the narrative pages beside
them and builds the HTML into ``_build/cpu/_build/html``. ``publish=True`` writes the executed notebooks and results
into ``book/`` instead (the committed outputs) and builds the root book. Nothing is moved into place until its
notebook has run to the end; a failing notebook stops the run with a message naming the notebook and the cell.

Inside a notebook, :class:`Run` records the profile, seed, device, library versions and wall time next to the
results, and writes them atomically.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rclip.cache import atomic_path, write_json
from rclip.errors import RClipError
from rclip.profiles import load_profile, notebook_parameters, project_root


def notebook_names() -> list[str]:
    """Notebook stems in execution order (their file names sort in chapter order)."""
    return sorted(p.stem for p in (project_root() / "notebooks").glob("*.ipynb"))


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Run:
    """What a notebook records about itself. Use at the top of a notebook, ``run.save(results)`` at the end.

    ``results`` must be a JSON-serialisable dict of the notebook's key figures; it is written under the key
    ``results``, apart from the run's metadata (``profile``, ``seed``, ``device``, ``versions``, ``wall_s``), so two
    runs with the same profile, seed and device have identical ``results``.
    """

    def __init__(self, notebook: str, profile: str, seed: int = 0, device: str = "auto",
                 results_path: str | None = None):
        from rclip.world_clip import resolve_device

        self.notebook, self.profile, self.seed = notebook, profile, int(seed)
        self.device = resolve_device(device)
        self.results_path = Path(results_path) if results_path else None
        self.t0 = time.time()
        seed_everything(self.seed)

    def save(self, results: dict) -> dict:
        from rclip.world_clip import library_versions

        blob = {
            "notebook": self.notebook,
            "profile": self.profile,
            "seed": self.seed,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
            else (platform.processor() or "cpu"),
            "threads": torch.get_num_threads(),
            "versions": library_versions(),
            "wall_s": round(time.time() - self.t0, 1),
            "results": _jsonable(results),
        }
        if self.results_path is not None:
            write_json(self.results_path, blob)
        return blob


def _jsonable(obj):
    """Round floats to 4 decimals and turn tensors/numpy values into plain Python, recursively."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float):
        if obj != obj:
            raise RClipError("a result is NaN; refusing to write it")
        return round(obj, 4)
    return obj


def load_results(notebook: str, book_dir: str | Path | None = None) -> dict:
    """The published ``results`` of a notebook (``book/results/<notebook>.json``)."""
    path = Path(book_dir or project_root() / "book") / "results" / f"{notebook}.json"
    if not path.is_file():
        raise RClipError(f"{path} does not exist: run `rclip book --profile gpu --publish --only {notebook}` first")
    return json.loads(path.read_text(encoding="utf-8"))


def reference_budget(book_dir: str | Path | None = None) -> float:
    """The world's reference budget (L-inf radius in [0, 1] units) fixed by chapter 0."""
    value = load_results("00_world", book_dir)["results"]["reference_eps_255"]  # exact: a multiple of 1/255
    if value is None:
        raise RClipError("chapter 0 found no reference budget in its eps grid; extend eps_grid in its profile")
    return float(value) / 255


# ----------------------------------------------------------------------------------------------------------------
# Execution and build
# ----------------------------------------------------------------------------------------------------------------

def execute_notebook(name: str, profile: str, dest_dir: Path, progress: bool = True) -> Path:
    """Execute ``notebooks/<name>.ipynb`` under ``profile`` into ``dest_dir/<name>.ipynb``.

    The notebook is executed into a temporary file and moved into place only if every cell ran.
    Raises :class:`RClipError` naming the notebook and the failing cell otherwise.
    """
    import papermill as pm

    src = project_root() / "notebooks" / f"{name}.ipynb"
    if not src.is_file():
        raise RClipError(f"no notebook {src}; notebooks: {', '.join(notebook_names())}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    (dest_dir / "results").mkdir(exist_ok=True)
    params = notebook_parameters(profile, name)
    cwd = project_root() / "notebooks"
    # relative to the kernel's working directory, so no local path is written into a published notebook
    params["results_path"] = os.path.relpath((dest_dir / "results" / f"{name}.json").resolve(), cwd)
    failed = dest_dir / "failed" / f"{name}.ipynb"
    with tempfile.TemporaryDirectory(prefix=f"rclip-{name}-") as tmp:
        out = Path(tmp) / f"{name}.ipynb"
        try:
            pm.execute_notebook(str(src), str(out), parameters=params, kernel_name="python3",
                                cwd=str(cwd), progress_bar=progress,
                                request_save_on_cell_execute=False)
        except pm.PapermillExecutionError as exc:
            failed.parent.mkdir(parents=True, exist_ok=True)
            if out.is_file():
                shutil.copyfile(out, failed)
            raise RClipError(
                f"notebook {name} failed in cell {exc.cell_index} (execution count {exc.exec_count}) under "
                f"profile {profile!r}: {exc.ename}: {exc.evalue}. The partly executed notebook is at {failed}."
            ) from None
        _tidy_executed(out, name)
        with atomic_path(dest_dir / f"{name}.ipynb") as final:
            shutil.copyfile(out, final)
    return dest_dir / f"{name}.ipynb"


def _tidy_executed(path: Path, name: str) -> None:
    """Fold papermill's injected-parameters cell (tag ``hide-cell``) and drop local paths from its metadata."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    meta = nb.metadata.get("papermill", {})
    meta["input_path"] = f"notebooks/{name}.ipynb"
    meta["output_path"] = f"{name}.ipynb"
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if "injected-parameters" in tags and "hide-cell" not in tags:
            tags.append("hide-cell")
    nbformat.write(nb, path)


def _stage(site: Path, executed: Path) -> None:
    """Copy the book's sources into ``site`` with the executed notebooks of this run in ``site/book``."""
    root = project_root()
    for f in ("_config.yml", "_toc.yml"):
        shutil.copyfile(root / f, site / f)
    book = site / "book"
    if book.exists():
        shutil.rmtree(book)
    shutil.copytree(root / "book", book, ignore=shutil.ignore_patterns("*.ipynb", "results"))
    for nb in executed.glob("*.ipynb"):
        shutil.copyfile(nb, book / nb.name)
    for name in notebook_names():  # chapters not executed in this run keep their published version
        if not (book / f"{name}.ipynb").exists() and (root / "book" / f"{name}.ipynb").exists():
            shutil.copyfile(root / "book" / f"{name}.ipynb", book / f"{name}.ipynb")


def build_html(source: Path) -> Path:
    """``jupyter-book build source`` (no execution: notebooks are already executed). Returns the HTML dir."""
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(source), "--warningiserror", "--keep-going"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RClipError(f"jupyter-book build failed for {source}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return source / "_build" / "html"


def validate_inputs(inputs: dict) -> None:
    """Check a paper-scale profile's ``inputs`` before anything runs; raise naming every missing one."""
    from rclip import models

    problems = []
    ckpt = inputs.get("checkpoint")
    if ckpt:
        if not Path(ckpt).is_file():
            problems.append(f"checkpoint file {ckpt} does not exist")
    elif inputs.get("model"):
        try:
            models.find_pretrained(inputs["model"], inputs.get("pretrained"))
        except RClipError as exc:
            problems.append(str(exc))
    given = 0
    for name, value in (inputs.get("datasets") or {}).items():
        paths = value.values() if isinstance(value, dict) else [value]
        for path in paths:
            if path is None:
                continue
            given += 1
            if not Path(path).exists():
                problems.append(f"dataset {name}: {path} does not exist")
    if given == 0:
        problems.append("no dataset path is set: fill in inputs.datasets in profiles/paper.yml (roots in "
                        "torchvision's layout, an ImageNet-style folder, or Karpathy JSON + image folder)")
    for section in ("descriptions", "robust_checkpoints"):
        for name, path in (inputs.get(section) or {}).items():
            if path is not None and not Path(path).is_file():
                problems.append(f"{section} {name}: file {path} does not exist")
    if problems:
        raise RClipError("the paper profile's inputs are not usable:\n  - " + "\n  - ".join(problems))


def run_book(profile: str, *, publish: bool = False, only: list[str] | None = None, build: bool = True,
             out: str | Path | None = None, progress: bool = True) -> int:
    """Execute notebooks under ``profile`` and build the HTML. Returns a process exit code."""
    prof = load_profile(profile)  # fail fast on an unknown profile
    if "inputs" in prof:
        validate_inputs(prof["inputs"])
    root = project_root()
    names = notebook_names()
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise RClipError(f"unknown notebooks {unknown}; notebooks: {', '.join(names)}")
        names = [n for n in names if n in only]
    if publish:
        executed, site = root / "book", root
    else:
        site = Path(out) if out else root / "_build" / profile
        executed = site / "executed"
    os.environ.setdefault("RCLIP_ROOT", str(root))
    skip = prof.get("skip") or {}
    for name in names:
        if name in skip:
            print(f"[rclip book] skipping {name} at profile {profile!r}: {skip[name]}", flush=True)
            continue
        t0 = time.time()
        print(f"[rclip book] executing {name} at profile {profile!r} ...", flush=True)
        execute_notebook(name, profile, executed, progress=progress)
        print(f"[rclip book] {name} done in {time.time() - t0:.0f} s", flush=True)
    if build:
        if not publish:
            site.mkdir(parents=True, exist_ok=True)
            _stage(site, executed)
        html = build_html(site)
        print(f"[rclip book] HTML: {html / 'index.html'}")
    return 0
