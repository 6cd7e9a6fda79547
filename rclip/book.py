"""The book pipeline: profiles -> papermill -> results JSON -> jupyter-book.

``run_book("cpu")`` executes every notebook in ``notebooks/`` with the profile's parameters into
``_build/cpu/executed/`` (each notebook writes ``results/<notebook>.json`` there), stages the narrative pages beside
them and builds the HTML into ``_build/cpu/_build/html``. ``publish=True`` writes the executed notebooks and results
into ``book/`` instead (the committed outputs) and builds the root book. Nothing is moved into place until its
notebook has run to the end; a failing notebook stops the run with a message naming the notebook and the cell.

Inside a notebook, :func:`start` resolves the notebook's parameters from its profile (whoever set ``profile``:
``rclip book``, papermill's ``-p profile P``, or an edit of the parameters cell), applies explicit overrides, and
returns a :class:`Run`, which records the resolved parameters, seed, device, library versions, code revision and
wall time next to the results and writes them atomically.
"""
from __future__ import annotations

import ast
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rclip import engine
from rclip.cache import atomic_path, used_artefacts, write_json
from rclip.errors import RClipError
from rclip.profiles import (RUNNER_KEYS, declared_parameters, load_profile, notebook_names, parse_overrides,
                            project_root, resolve, validate_profile)

PUBLISHED_PROFILE = "world"   # the profile whose executed notebooks and results `book/` holds


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def code_revision() -> str | None:
    """The git commit of the project tree (``+dirty`` when tracked files differ from it), or None outside git."""
    root = project_root()
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "rclip", "notebooks",
                                "profiles"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


#: CPU features that decide which float kernels MKL and oneDNN run (bf16 / int8 matrix units, AVX-512, AVX2): two
#: CPUs with one model name (a virtual machine's "Intel(R) Xeon(R) Processor") can differ in them.
KERNEL_FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx_vnni", "avx2", "fma")


def cpu_description() -> dict:
    """The CPU a run computed on: its model name (``/proc/cpuinfo``, else :func:`platform.processor`, else the
    architecture), the instruction set torch's CPU kernels dispatch to (``AVX512``, ``AVX2``, ...) and, where
    ``/proc/cpuinfo`` says, the CPU's family / model / stepping numbers and which of :data:`KERNEL_FLAGS` it has.

    Recorded beside every published result because float kernels differ between CPU models (MKL and oneDNN pick
    per-model code paths, e.g. AMX tiles for bf16 where present), and a training run amplifies their last-bit
    differences: the same code, seed, threads and library versions give bit-identical results on one CPU model,
    not across models — and a virtual machine's model name alone does not tell two such models apart."""
    try:
        info = parse_cpuinfo(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        info = {}
    return {"model": info.pop("model", None) or platform.processor() or platform.machine() or "unknown",
            "capability": torch.backends.cpu.get_cpu_capability(), **info}


def parse_cpuinfo(text: str) -> dict:
    """From ``/proc/cpuinfo`` text, the first processor's ``model`` name, ``cpuid`` ("family F model M stepping
    S") and ``kernel_flags`` (those of :data:`KERNEL_FLAGS` it lists); keys it does not find are left out."""
    fields = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break                      # the first processor's block ends at the first blank line
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    out = {}
    if fields.get("model name"):
        out["model"] = fields["model name"]
    ids = [(k, fields.get(k)) for k in ("cpu family", "model", "stepping")]
    if all(v for _, v in ids):
        out["cpuid"] = " ".join(f"{k.replace('cpu ', '')} {v}" for k, v in ids)
    if "flags" in fields:
        have = set(fields["flags"].split())
        out["kernel_flags"] = [f for f in KERNEL_FLAGS if f in have]
    return out


def published_engine(blob: dict) -> str:
    """The engine a results JSON was computed with (:mod:`rclip.engine`); a JSON without the key predates the fast
    engine, i.e. was computed with what is now the plain one."""
    return (blob.get("engine") or {"mode": "plain"})["mode"]


def _machine_text(blob: dict) -> str:
    cpu = blob.get("cpu")
    what = ", ".join([cpu["model"], cpu["capability"], *([cpu["cpuid"]] if cpu.get("cpuid") else []),
                      *(["flags " + " ".join(cpu["kernel_flags"])] if cpu.get("kernel_flags") else [])]) \
        if isinstance(cpu, dict) else "CPU not recorded"
    return f"{blob.get('revision')}, {blob.get('threads')} threads, {what}, engine {published_engine(blob)}"


class Run:
    """What a notebook records about itself. Made by :func:`start` at the top of a notebook; ``run.save(results)``
    at the end.

    ``results`` must be a JSON-serialisable dict of the notebook's key figures; it is written under the key
    ``results``, apart from the run's metadata (``profile``, ``parameters``, ``seed``, ``device``, ``cpu``,
    ``engine``, ``versions``, ``revision``, ``wall_s``, ``timings``, ``artefacts``, ``inputs``), so two runs with the
    same profile, seed, engine and device (on a CPU, the same CPU model) have identical ``results``: nothing measured
    in seconds belongs in ``results``.
    """

    def __init__(self, notebook: str, profile: str, seed: int = 0, device: str = "auto",
                 results_path: str | None = None, params: dict | None = None, overridden=()):
        from rclip.world_clip import resolve_device

        self.notebook, self.profile, self.seed = notebook, profile, int(seed)
        self.device = resolve_device(device)
        self.results_path = Path(results_path) if results_path else None
        self.params = dict(params or {})
        self.overridden = list(overridden)
        self.timings: dict[str, object] = {}
        self.inputs: dict[str, dict] = {}
        self.t0 = time.time()
        seed_everything(self.seed)

    @property
    def results_dir(self) -> Path | None:
        return self.results_path.parent if self.results_path is not None else None

    def sibling_results(self, notebook: str) -> tuple[dict, str]:
        """Another notebook's results JSON: the one this run's output directory holds (the same book run), else
        the published one in ``book/results``. Returns ``(blob, the path it was read from)``.

        The read is recorded in the saved JSON's ``inputs`` (beside ``results``, like ``timings``): the path and
        the revision that produced it. A path depends on where the book was checked out and run, so it must not
        enter ``results``; what the chapter took from the blob (budgets, ...) belongs there instead."""
        here = self.results_dir / f"{notebook}.json" if self.results_dir is not None else None
        path = here if here is not None and here.is_file() else project_root() / "book" / "results" / f"{notebook}.json"
        if not path.is_file():
            raise RClipError(f"no results of {notebook} beside this run ({here}) nor published ({path}): run "
                             f"`rclip book --profile {self.profile} --only {notebook}` first")
        blob = json.loads(path.read_text(encoding="utf-8"))
        self.inputs[notebook] = {"path": str(path), "revision": blob.get("revision")}
        return blob, str(path)

    def time(self, name: str, value) -> None:
        """Record a measured time (seconds, ms per image, a ratio of two timings ...). Timings go to the JSON's
        ``timings``, beside ``results``: they vary from run to run, and ``results`` must not."""
        self.timings[name] = value

    def save(self, results: dict) -> dict:
        from rclip.world_clip import library_versions

        params = {k: v for k, v in self.params.items() if k != "results_path"}
        blob = {
            "notebook": self.notebook,
            "profile": self.profile,
            "parameters": _jsonable(params, exact=True),       # what was run, as given (lr 5e-5 is not 1e-4)
            "overridden": self.overridden,
            "seed": self.seed,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
            else cpu_description()["model"],
            "cpu": cpu_description(),
            "threads": torch.get_num_threads(),
            "engine": engine.describe(),
            "versions": library_versions(),
            "revision": code_revision(),
            "wall_s": round(time.time() - self.t0, 1),
            "timings": _jsonable(self.timings),
            "artefacts": used_artefacts(),
            "inputs": _jsonable(self.inputs),
            "results": _jsonable(results),
        }
        if self.results_path is not None:
            write_json(self.results_path, blob)
        return blob


def _injected_parameters(namespace: dict) -> dict:
    """The assignments of papermill's injected-parameters cell (source starting ``# Parameters``) in the kernel's
    input history, the latest one; {} when the notebook was not run by papermill."""
    for src in reversed(list(namespace.get("In") or namespace.get("_ih") or [])):
        if isinstance(src, str) and src.lstrip().startswith("# Parameters"):
            out = {}
            for node in ast.parse(src).body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    out[node.targets[0].id] = namespace.get(node.targets[0].id)
            return out
    return {}


def start(notebook: str, namespace: dict) -> Run:
    """Resolve ``notebook``'s parameters in ``namespace`` (the notebook's ``globals()``) and start its :class:`Run`.

    The profile named by ``namespace["profile"]`` supplies every parameter it sets for this notebook; a parameter
    given explicitly — injected by papermill (``-p key value``, also by ``rclip book --set``) or edited in the
    parameters cell (its value differs from the cell's default) — overrides it. An injected name the notebook does
    not declare is an error naming the nearest declared one. The resolved values are written back into
    ``namespace``, so the notebook's cells read them as plain variables. A notebook that declares ``threads``
    gets that many torch CPU threads (0: torch's default).
    """
    engine.mode()                     # an unknown $RCLIP_ENGINE fails here, before any work
    declared = declared_parameters(notebook)
    injected = _injected_parameters(namespace)
    explicit = {k: v for k, v in injected.items() if k not in ("profile",)}
    before = namespace.get("__rclip_resolved__") or {}     # a re-run of this cell: what it set is not an edit,
    kept = set(namespace.get("__rclip_overridden__") or ())  # unless it was an explicit value then
    for key, default in declared.items():
        if key not in namespace or key in explicit or key == "profile":
            continue
        value = namespace[key]
        unchanged_since_start = key in before and value == before[key]
        if (value != default and not unchanged_since_start) or (unchanged_since_start and key in kept):
            explicit[key] = value                                 # edited in the parameters cell
    profile = namespace.get("profile") or declared.get("profile")
    params, overridden = resolve(notebook, profile, explicit)
    namespace.update(params)
    namespace["__rclip_resolved__"] = dict(params)
    namespace["__rclip_overridden__"] = list(overridden)
    if overridden:
        print(f"[rclip] {notebook} at profile {profile!r}, overridden: "
              + ", ".join(f"{k}={params[k]!r}" for k in overridden))
    threads = params.get("threads") or 0
    if not isinstance(threads, int) or threads < 0:
        raise RClipError(f"threads must be an integer >= 0 (0: torch's default); got {threads!r}")
    if threads:
        import torch

        torch.set_num_threads(threads)
    return Run(notebook, profile, params.get("seed", 0), params.get("device", "auto"), params.get("results_path"),
               params=params, overridden=overridden)


def _jsonable(obj, exact: bool = False):
    """Round floats to 4 decimals (``exact``: keep them as they are, for parameters) and turn tensors / numpy values
    into plain Python, recursively. NaN (a figure with no value, e.g. an attack success rate with no correct query
    to attack) is written as null; infinity is refused."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v, exact) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, exact) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist(), exact)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist(), exact)
    if isinstance(obj, np.generic):
        return _jsonable(obj.item(), exact)
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            raise RClipError("a result is infinite; refusing to write it")
        return obj if exact else round(obj, 4)
    return obj


def records(df) -> dict:
    """A table (pandas DataFrame) as ``{row: {column: value}}`` for a results JSON: multi-level labels joined
    with " | ", values rounded, NaN as null."""
    def label(k):
        return " | ".join(map(str, k)) if isinstance(k, tuple) else str(k)

    return {label(i): {label(c): _jsonable(v if not isinstance(v, float) else float(v)) for c, v in row.items()}
            for i, row in df.iterrows()}


def train_summary(log: dict) -> dict:
    """The few figures of a training log a chapter reports in its results: steps and final loss. (Wall times vary
    from run to run and between a fresh and a cached artefact: record them with :meth:`Run.time`, outside
    ``results``.)"""
    records_ = log.get("records") or []
    return {"steps": log.get("last_step"), "final_loss": records_[-1]["loss"] if records_ else None}


def load_results(notebook: str, book_dir: str | Path | None = None) -> dict:
    """The published ``results`` of a notebook (``book/results/<notebook>.json``)."""
    path = Path(book_dir or project_root() / "book") / "results" / f"{notebook}.json"
    if not path.is_file():
        raise RClipError(f"{path} does not exist: run `rclip book --profile {PUBLISHED_PROFILE} --publish --only "
                         f"{notebook}` first")
    return json.loads(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------------------
# Execution and build
# ----------------------------------------------------------------------------------------------------------------

def execute_notebook(name: str, profile: str, dest_dir: Path, progress: bool = True,
                     overrides: dict | None = None) -> Path:
    """Execute ``notebooks/<name>.ipynb`` under ``profile`` into ``dest_dir/<name>.ipynb``.

    Papermill injects only what a user would pass by hand — ``profile``, ``results_path`` and the explicit
    ``overrides`` — and the notebook resolves the rest from its profile (:func:`start`), so ``rclip book`` and
    ``papermill ... -p profile P`` run the same parameters. The notebook is executed into a temporary file and
    moved into place only if every cell ran. Raises :class:`RClipError` naming the notebook and the failing cell
    otherwise.
    """
    import papermill as pm

    src = project_root() / "notebooks" / f"{name}.ipynb"
    if not src.is_file():
        raise RClipError(f"no notebook {src}; notebooks: {', '.join(notebook_names())}")
    resolve(name, profile, overrides)                      # fails now, not inside the kernel, on a bad key
    dest_dir.mkdir(parents=True, exist_ok=True)
    (dest_dir / "results").mkdir(exist_ok=True)
    params = {"profile": profile, **(overrides or {})}
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


def differences(published, rerun, path: str = "") -> list[tuple[str, object, object]]:
    """Every leaf where two results trees differ: ``[(path, published value, re-run value), ...]``."""
    if isinstance(published, dict) and isinstance(rerun, dict):
        out = []
        for key in sorted(set(published) | set(rerun), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in published or key not in rerun:
                out.append((sub, published.get(key, "<absent>"), rerun.get(key, "<absent>")))
            else:
                out.extend(differences(published[key], rerun[key], sub))
        return out
    if isinstance(published, list) and isinstance(rerun, list) and len(published) == len(rerun):
        return [d for i, (a, b) in enumerate(zip(published, rerun)) for d in differences(a, b, f"{path}[{i}]")]
    return [] if published == rerun else [(path, published, rerun)]


def verify_book(profile: str = PUBLISHED_PROFILE, *, only: list[str] | None = None, progress: bool = True,
                scratch: str | Path | None = None) -> int:
    """Re-execute the published chapters into a scratch directory with a fresh, empty cache, each under the engine
    its JSON records (:func:`published_engine`), and report every figure of ``results`` that differs from
    ``book/results/<notebook>.json``. Returns 0 when none does, 1 otherwise."""
    if profile != PUBLISHED_PROFILE:
        raise RClipError(f"--verify compares with book/, which holds profile {PUBLISHED_PROFILE!r}; got {profile!r}")
    root = project_root()
    names = only if only is not None else [n for n in notebook_names()
                                           if (root / "book" / "results" / f"{n}.json").is_file()]
    with tempfile.TemporaryDirectory(prefix="rclip-verify-", dir=scratch) as tmp:
        previous = os.environ.get("RCLIP_CACHE")
        os.environ["RCLIP_CACHE"] = str(Path(tmp) / "cache")       # the kernels inherit it: nothing is reused
        by_engine: dict[str, list[str]] = {}
        for name in names:
            by_engine.setdefault(published_engine(load_results(name)), []).append(name)
        try:
            for mode, group in by_engine.items():
                with engine.use(mode):
                    run_book(profile, only=group, build=False, out=Path(tmp) / "site", progress=progress)
        finally:
            if previous is None:
                os.environ.pop("RCLIP_CACHE", None)
            else:
                os.environ["RCLIP_CACHE"] = previous
        failed = 0
        for name in names:
            published = load_results(name)
            rerun = json.loads((Path(tmp) / "site" / "executed" / "results" / f"{name}.json").read_text("utf-8"))
            diffs = differences(published["results"], rerun["results"])
            print(f"[rclip verify] {name}: {'identical results' if not diffs else f'{len(diffs)} differences'} "
                  f"(published at {_machine_text(published)}; re-run at {_machine_text(rerun)})")
            for where, a, b in diffs:
                print(f"    {where}: published {a!r}, re-run {b!r}")
            if diffs and published.get("cpu") != rerun.get("cpu"):
                print(f"    the two runs did not compute on the same recorded CPU: float kernels differ between CPU "
                      f"models and training amplifies the difference, so re-run on the CPU the published JSON "
                      f"names (key 'cpu') to test reproducibility")
            failed += bool(diffs)
    return 1 if failed else 0


def run_book(profile: str, *, publish: bool = False, only: list[str] | None = None, build: bool = True,
             out: str | Path | None = None, progress: bool = True, overrides: list[str] | None = None) -> int:
    """Execute notebooks under ``profile`` and build the HTML. Returns a process exit code.

    only: notebook names (None: all; an empty list is an error). overrides: ``["NB.key=value", ...]``, applied
    on top of the profile (recorded as overridden in the results)."""
    prof = validate_profile(profile)  # fail fast on an unknown profile or a key no notebook declares
    engine.mode()                     # ... and on an unknown $RCLIP_ENGINE
    if publish and profile != PUBLISHED_PROFILE:
        raise RClipError(f"--publish writes book/, which holds the published profile {PUBLISHED_PROFILE!r}; run "
                         f"profile {profile!r} without --publish (it writes _build/{profile}/)")
    if publish and overrides:
        raise RClipError("--publish runs the published profile as it is; put changed settings in "
                         f"profiles/{PUBLISHED_PROFILE}.yml rather than --set")
    if "inputs" in prof:
        validate_inputs(prof["inputs"])
    root = project_root()
    names = notebook_names()
    if only is not None:
        if not only:
            raise RClipError(f"--only needs at least one notebook name; notebooks: {', '.join(names)}")
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise RClipError(f"unknown notebooks {unknown}; notebooks: {', '.join(names)}")
        names = [n for n in names if n in only]
    sets = parse_overrides(overrides, notebook_names())
    for name in names:
        resolve(name, profile, sets.get(name))
    if publish:
        executed, site = root / "book", root
    else:
        site = Path(out) if out else root / "_build" / profile
        executed = site / "executed"
        try:
            (executed / "results").mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            blocker = next((p for p in (executed / "results", *(executed / "results").parents) if p.is_file()), None)
            raise RClipError(f"cannot write the run into {site}: {blocker or site} is a file, not a directory; give "
                             f"--out a directory path") from None
    os.environ.setdefault("RCLIP_ROOT", str(root))
    skip = prof.get("skip") or {}
    for name in names:
        if name in skip:
            print(f"[rclip book] skipping {name} at profile {profile!r}: {skip[name]}", flush=True)
            continue
        t0 = time.time()
        print(f"[rclip book] executing {name} at profile {profile!r} ...", flush=True)
        execute_notebook(name, profile, executed, progress=progress, overrides=sets.get(name))
        print(f"[rclip book] {name} done in {time.time() - t0:.0f} s", flush=True)
    if build:
        if not publish:
            site.mkdir(parents=True, exist_ok=True)
            _stage(site, executed)
        html = build_html(site)
        print(f"[rclip book] HTML: {html / 'index.html'}")
    return 0
