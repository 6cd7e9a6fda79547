import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from rclip import book, claims
from rclip.errors import RClipError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke_site(tmp_path_factory):
    """The whole book at profile smoke: every notebook executed, HTML built (what CI checks)."""
    site = tmp_path_factory.mktemp("smoke-site")
    assert book.run_book("smoke", out=site, progress=False) == 0
    return site


@pytest.mark.slow
def test_smoke_book_executes_every_notebook_and_builds_html(smoke_site):
    for name in book.notebook_names():
        nb = nbformat.read(smoke_site / "executed" / f"{name}.ipynb", as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert not errors
        blob = json.loads((smoke_site / "executed" / "results" / f"{name}.json").read_text())
        assert blob["profile"] == "smoke" and blob["notebook"] == name and blob["results"]
        assert {"seed", "device", "versions", "wall_s", "parameters", "revision"} <= set(blob)
        assert isinstance(blob["results"]["claims"], list) and blob["results"]["claims"]
        for record in blob["results"]["claims"]:
            claims.check(record)
    html = smoke_site / "_build" / "html" / "book" / "00_world.html"
    text = html.read_text()
    assert "The world and its CLIP" in text and "reference budget" in text
    assert "<img" in text and "<table" in text
    cola = (smoke_site / "_build" / "html" / "book" / "01_cola.html").read_text()
    assert "projection and optimal transport" in cola and "What reproduces at this scale" in cola
    for name, title in (("02_hot_clip", "HOT-CLIP: hierarchical OT fusion"),
                        ("03_ma2t", "multimodal adversarial training for image-text retrieval"),
                        ("03b_ma2t_mat", "MA²T on MAT: the augmentations at the paper"),
                        ("03c_ma2t_mat_img", "MA²T on MAT_Img: the augmentations at the paper"),
                        ("04_otcclip", "OTCCLIP: optimal transport against poisoned pre-training pairs")):
        page = (smoke_site / "_build" / "html" / "book" / f"{name}.html").read_text()
        assert title in page and "What reproduces at this scale" in page and "<img" in page and "<table" in page


@pytest.mark.slow
def test_same_seed_same_results(smoke_site, tmp_path):
    book.execute_notebook("00_world", "smoke", tmp_path, progress=False)
    a = json.loads((smoke_site / "executed" / "results" / "00_world.json").read_text())
    b = json.loads((tmp_path / "results" / "00_world.json").read_text())
    assert a["results"] == b["results"]


def test_failing_notebook_names_notebook_and_cell(tmp_path, monkeypatch):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "smoke.yml").write_text("description: test\nnotebooks: {}\n")
    (tmp_path / "notebooks").mkdir()
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("y = 2"),
        nbformat.v4.new_code_cell("raise ValueError('broken on purpose')"),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "notebooks" / "99_bad.ipynb")
    monkeypatch.setenv("RCLIP_ROOT", str(tmp_path))
    with pytest.raises(RClipError, match=r"notebook 99_bad failed in cell \d+ .*ValueError: broken on purpose"):
        book.run_book("smoke", build=False, progress=False)
    assert not (tmp_path / "_build" / "smoke" / "executed" / "99_bad.ipynb").exists()  # never moved into place
    assert (tmp_path / "_build" / "smoke" / "executed" / "failed" / "99_bad.ipynb").exists()


def test_paper_profile_fails_fast_without_inputs():
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "rclip.cli", "book", "--profile", "paper"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                                             "HOME": str(ROOT / "_build")})
    assert proc.returncode == 2
    assert "paper profile's inputs are not usable" in proc.stderr and "inputs.datasets" in proc.stderr
    assert "ViT-B-32" in proc.stderr
    assert time.time() - t0 < 30


def test_unknown_profile_and_notebook():
    with pytest.raises(RClipError, match="unknown profile"):
        book.run_book("laptop")
    with pytest.raises(RClipError, match="unknown notebooks"):
        book.run_book("smoke", only=["07_nothing"])


def test_results_write_nan_as_null_and_refuse_infinity(tmp_path):
    run = book.Run("x", "smoke", results_path=str(tmp_path / "r.json"))
    assert run.save({"a": float("nan"), "b": [1.23456789]})["results"] == {"a": None, "b": [1.2346]}
    # parameters are written as they were run (a learning rate of 5e-5 is not rounded to 1e-4)
    run = book.Run("x", "smoke", results_path=str(tmp_path / "r.json"), params={"lr": 5e-5, "eps": [1e-5, 0.123456]})
    run.save({"lr": 5e-5})
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["parameters"] == {"lr": 5e-5, "eps": [1e-5, 0.123456]} and saved["results"] == {"lr": 0.0001}
    with pytest.raises(RClipError, match="infinite"):
        run.save({"a": float("inf")})


def _code_cells(path):
    nb = nbformat.read(path, as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code"
            and "injected-parameters" not in c.metadata.get("tags", [])]


@pytest.mark.parametrize("name", book.notebook_names())
def test_notebooks_orchestrate_only(name):
    """No code cell over 40 lines, and no function or class defined in a notebook: the library computes. The
    parameters cell, which only declares (one parameter per line, each with its comment), may run to 45."""
    import ast

    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        src, limit = cell.source, 45 if "parameters" in cell.metadata.get("tags", []) else 40
        assert len(src.splitlines()) <= limit, f"{name}: a cell of {len(src.splitlines())} lines"
        if limit == 45:
            tree = ast.parse(src)
            assert all(isinstance(node, ast.Assign) for node in tree.body), f"{name}: the parameters cell computes"
        for node in ast.walk(ast.parse(src)):
            assert not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Lambda, ast.AsyncFunctionDef)), \
                f"{name} defines a function at line {node.lineno}: move it into rclip"


@pytest.mark.parametrize("name", book.notebook_names())
def test_published_notebooks_are_executed_from_the_current_sources(name):
    """book/<nb>.ipynb was executed from notebooks/<nb>.ipynb as it is now, at the published profile."""
    published = ROOT / "book" / f"{name}.ipynb"
    assert _code_cells(published) == _code_cells(ROOT / "notebooks" / f"{name}.ipynb")
    blob = json.loads((ROOT / "book" / "results" / f"{name}.json").read_text())
    assert blob["profile"] == book.PUBLISHED_PROFILE
    for record in blob["results"]["claims"]:
        claims.check(record)


@pytest.mark.slow
def test_results_identical_across_processes_hash_seeds_and_fresh_caches(tmp_path):
    """One chapter at smoke, twice, in separate processes with separate empty caches and different
    PYTHONHASHSEED: the `results` are byte for byte the same (chapter 4 trains, poisons and re-matches)."""
    import os

    exe = Path(sys.executable).with_name("papermill")
    blobs = []
    for i, hash_seed in enumerate(("1", "2")):
        out = tmp_path / f"run{i}"
        out.mkdir()
        shutil.copyfile(ROOT / "book" / "results" / "00_world.json", out / "00_world.json")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": hash_seed, "RCLIP_CACHE": str(out / "cache")}
        proc = subprocess.run([str(exe), "04_otcclip.ipynb", str(out / "nb.ipynb"), "-p", "profile", "smoke",
                               "-p", "results_path", str(out / "04_otcclip.json")], cwd=ROOT / "notebooks",
                              capture_output=True, text=True, timeout=900, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        blobs.append(json.dumps(json.loads((out / "04_otcclip.json").read_text())["results"], sort_keys=True))
    assert blobs[0] == blobs[1]


def test_sibling_results_keep_their_location_out_of_results(tmp_path):
    """Where a chapter read chapter 0's results is recorded beside ``results`` (``inputs``), and what enters
    ``results`` is the same wherever the book was checked out or run: a published run and a ``--verify`` re-run in
    a scratch directory must agree."""
    from rclip import chapter

    saved = []
    for place in ("a", "b/c"):
        out = tmp_path / place
        out.mkdir(parents=True)
        (out / "00_world.json").write_text(json.dumps({"revision": "r1", "results": {
            "reference_budgets_255": {"shape": 2.0, "colour": None}}}), encoding="utf-8")
        run = book.Run("01_cola", "smoke", results_path=str(out / "01_cola.json"))
        budgets, source = chapter.reference_budgets(run, ["shape", "colour"])
        assert budgets == {"shape": 2 / 255}
        saved.append(run.save({"reference_source": source}))
        assert saved[-1]["inputs"] == {"00_world": {"path": str(out / "00_world.json"), "revision": "r1"}}
    assert saved[0]["results"] == saved[1]["results"]
    assert str(tmp_path) not in json.dumps(saved[0]["results"])


def test_results_record_the_cpu_and_verify_names_a_cpu_change(tmp_path, monkeypatch, capsys):
    """Float kernels differ between CPU models, so a published JSON names its CPU (model and the instruction set
    torch dispatches to), and ``--verify`` says when its re-run computed on another CPU than the published run."""
    import torch

    blob = book.Run("01_cola", "smoke", results_path=str(tmp_path / "01_cola.json")).save({"x": 1})
    assert blob["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(blob["cpu"]["model"], str) and blob["cpu"]["model"]
    assert blob["device_name"] == blob["cpu"]["model"]

    published = {"revision": "r0", "threads": 2, "cpu": {"model": "Other CPU", "capability": "AVX2"},
                 "results": {"x": 1, "y": 2.0}}

    def fake_run(profile, *, only, build, out, progress):   # the re-run: this machine, one figure moved
        for name in only:
            rerun = {**blob, "results": {"x": 1, "y": 2.5}}
            (Path(out) / "executed" / "results").mkdir(parents=True, exist_ok=True)
            (Path(out) / "executed" / "results" / f"{name}.json").write_text(json.dumps(rerun), "utf-8")
        return 0

    monkeypatch.setattr(book, "run_book", fake_run)
    monkeypatch.setattr(book, "load_results", lambda name: published)
    assert book.verify_book("world", only=["01_cola"], scratch=tmp_path) == 1
    out = capsys.readouterr().out
    assert "1 differences" in out and "y: published 2.0, re-run 2.5" in out
    assert "Other CPU, AVX2" in out and "not compute on the same recorded CPU" in out

    published["cpu"] = blob["cpu"]                            # same CPU: the difference stands without the remark
    assert book.verify_book("world", only=["01_cola"], scratch=tmp_path) == 1
    assert "same recorded CPU" not in capsys.readouterr().out


def test_cpuinfo_names_the_first_processor_its_numbers_and_kernel_flags():
    """Two hosts with one model name can run different kernels (AMX or not): the JSON records the CPU's numbers
    and the kernel-relevant flags of the first processor, and says nothing it did not find."""
    text = ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n"
            "model name\t: Intel(R) Xeon(R) Processor\nstepping\t: 8\n"
            "flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_tile amx_bf16 unrelated\n\n"
            "processor\t: 1\ncpu family\t: 6\nmodel\t\t: 85\nmodel name\t: Another\nstepping\t: 4\n"
            "flags\t\t: avx2\n")
    assert book.parse_cpuinfo(text) == {"model": "Intel(R) Xeon(R) Processor", "cpuid": "family 6 model 143 stepping 8",
                                        "kernel_flags": ["amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2",
                                                         "fma"]}
    assert book.parse_cpuinfo("processor\t: 0\nmodel name\t: X\n") == {"model": "X"}
    assert book.parse_cpuinfo("") == {}
    blob = {"revision": "r", "threads": 2, "cpu": {"model": "X", "capability": "AVX2", "cpuid": "family 6 model 85 "
                                                   "stepping 4", "kernel_flags": ["avx2"]}}
    assert "X, AVX2, family 6 model 85 stepping 4, flags avx2" in book._machine_text(blob)


def test_verify_reruns_each_chapter_under_its_published_engine(tmp_path, monkeypatch, capsys):
    """A results JSON records its engine; ``--verify`` re-runs each chapter under the engine it names (a JSON
    without one predates the fast engine: plain), and its report names both runs' engines."""
    from rclip import engine

    blob = book.Run("01_cola", "smoke", results_path=str(tmp_path / "01_cola.json")).save({"x": 1})
    assert blob["engine"]["mode"] == engine.mode()
    published = {"00_world": {"results": {"x": 1}}, "01_cola": {"engine": {"mode": "fast"}, "results": {"x": 1}}}
    seen = {}

    def fake_run(profile, *, only, build, out, progress):
        for name in only:
            seen[name] = engine.mode()
            rerun = {**blob, "engine": engine.describe(), "results": {"x": 1}}
            (Path(out) / "executed" / "results").mkdir(parents=True, exist_ok=True)
            (Path(out) / "executed" / "results" / f"{name}.json").write_text(json.dumps(rerun), "utf-8")
        return 0

    monkeypatch.setattr(book, "run_book", fake_run)
    monkeypatch.setattr(book, "load_results", lambda name: published[name])
    monkeypatch.setenv(engine.ENV, "fast")
    assert book.verify_book("world", only=["00_world", "01_cola"], scratch=tmp_path) == 0
    assert seen == {"00_world": "plain", "01_cola": "fast"}
    out = capsys.readouterr().out
    assert "engine plain; re-run at" in out and "engine fast; re-run at" in out
    assert engine.mode() == "fast"                              # the setting in force is restored
