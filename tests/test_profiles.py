"""Profiles and parameter resolution: validation before anything runs, shared settings written once, and one
resolution for `rclip book` and papermill alike."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rclip import book, profiles
from rclip.errors import RClipError

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ["smoke", "cpu", "world", "gpu", "paper"]


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_validates(name):
    prof = profiles.validate_profile(name)
    assert prof["description"]


@pytest.mark.parametrize("name", PROFILES)
def test_shared_finetune_schedule_is_one_setting(name):
    """Chapters 1 and 2 fine-tune TeCoA / FARE with the same schedule, so they share one cache."""
    from rclip.chapter import finetune_settings

    a = profiles.resolve("01_cola", name)[0]
    b = profiles.resolve("02_hot_clip", name)[0]
    assert finetune_settings(a) == finetune_settings(b)


def _copy_tree(tmp_path):
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks")
    return tmp_path


def test_misspelled_key_fails_fast_naming_it(tmp_path, monkeypatch):
    root = _copy_tree(tmp_path)
    text = (root / "profiles" / "cpu.yml").read_text().replace("    n_eval: 40\n", "    n_evl: 40\n", 1)
    (root / "profiles" / "cpu.yml").write_text(text)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "rclip.cli", "book", "--profile", "cpu", "--no-build"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "RCLIP_ROOT": str(root), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "n_evl" in proc.stderr and "did you mean 'n_eval'" in proc.stderr
    assert time.time() - t0 < 15      # before any work (a chapter takes minutes); 3.7 s idle, >5 s on a busy host


def test_misplaced_keys_fail(tmp_path, monkeypatch):
    root = _copy_tree(tmp_path)
    monkeypatch.setenv("RCLIP_ROOT", str(root))
    path = root / "profiles" / "cpu.yml"
    base = path.read_text()
    for bad, expect in ((base.replace("  01_cola:\n", "  01_colla:\n", 1), "names no notebook; did you mean '01_cola'"),
                        (base.replace("shared:", "sharde:", 1), "unknown top-level key 'sharde'"),
                        (base.replace("  finetune:", "  fine_tune:", 1), "shared.fine_tune is declared by no"),
                        (base + "  00_world:\n    results_path: x\n", "not a parameter"),
                        ("notebooks: [1, 2\n", "not valid YAML")):
        path.write_text(bad)
        with pytest.raises(RClipError, match=expect):
            profiles.validate_profile("cpu")


def test_resolution_precedence_and_overrides():
    params, over = profiles.resolve("00_world", "smoke", {"n_test": 12})
    declared = profiles.declared_parameters("00_world")
    assert set(params) == set(declared)
    assert params["n_test"] == 12 and over == ["n_test"]                   # explicit beats the profile
    assert params["model"] == "rclip-tiny"                                  # the profile beats the default
    assert profiles.resolve("00_world", "cpu")[0]["model"] == declared["model"]   # the default where unset
    with pytest.raises(RClipError, match="did you mean 'n_test'"):
        profiles.resolve("00_world", "smoke", {"n_tset": 5})
    assert profiles.parse_overrides(["01_cola.n_eval=500", "00_world.eps_grid=[1, 2]"], profiles.notebook_names()) \
        == {"01_cola": {"n_eval": 500}, "00_world": {"eps_grid": [1, 2]}}
    for bad, expect in (("01_cola.n_evl=5", "did you mean 'n_eval'"), ("01_cola=5", "NOTEBOOK.KEY=VALUE"),
                        ("01_colla.n_eval=5", "did you mean '01_cola'")):
        with pytest.raises(RClipError, match=expect):
            profiles.parse_overrides([bad], profiles.notebook_names())


def test_start_resolves_the_profile_and_detects_edits(tmp_path):
    ns = dict(profiles.declared_parameters("00_world"))
    ns.update(profile="smoke", results_path=str(tmp_path / "r.json"), n_attack=3)     # n_attack edited in the cell
    run = book.start("00_world", ns)
    assert ns["model"] == "rclip-tiny" and ns["n_test"] == 40 and ns["n_attack"] == 3
    assert run.overridden == ["n_attack"] and run.profile == "smoke"
    book.start("00_world", ns)                                        # re-running the cell changes nothing
    assert ns["n_test"] == 40 and ns["n_attack"] == 3
    ns = dict(profiles.declared_parameters("00_world"))
    ns.update(profile="smoke", In=["x = 1", "# Parameters\nprofile = \"smoke\"\nn_tset = 5\n"], n_tset=5)
    with pytest.raises(RClipError, match="did you mean 'n_test'"):
        book.start("00_world", ns)
    blob = run.save({"x": float("nan")})
    assert blob["results"] == {"x": None} and blob["parameters"]["model"] == "rclip-tiny"
    assert json.loads((tmp_path / "r.json").read_text())["overridden"] == ["n_attack"]


def test_start_sets_the_declared_threads_and_refuses_a_bad_count(tmp_path):
    before = torch.get_num_threads()
    try:
        ns = dict(profiles.declared_parameters("04_otcclip"))
        ns.update(profile="smoke", results_path=str(tmp_path / "r.json"))
        book.start("04_otcclip", ns)
        assert ns["threads"] == 1 and torch.get_num_threads() == 1       # smoke's 04_otcclip sets threads: 1
        ns = dict(profiles.declared_parameters("02_hot_clip"))
        ns.update(profile="smoke", threads=-2)
        with pytest.raises(RClipError, match="threads must be an integer >= 0"):
            book.start("02_hot_clip", ns)
    finally:
        torch.set_num_threads(before)


def _papermill(args, cwd, timeout=300):
    exe = Path(sys.executable).with_name("papermill")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
def test_papermill_as_a_user_calls_it(tmp_path):
    """`papermill notebooks/00_world.ipynb OUT -p profile smoke -p results_path R` runs smoke (its model, resolution
    and sizes) in smoke time; a misspelled parameter fails naming the declared one."""
    results = tmp_path / "00_world.json"
    t0 = time.time()
    proc = _papermill(["notebooks/00_world.ipynb", str(tmp_path / "out.ipynb"), "-p", "profile", "smoke",
                       "-p", "results_path", str(results), "-p", "n_attack", "8"], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.time() - t0 < 240         # smoke time (about 20 s on an idle machine); cpu sizes take many minutes
    blob = json.loads(results.read_text())
    assert blob["profile"] == "smoke" and blob["parameters"]["model"] == "rclip-tiny"
    assert blob["parameters"]["resolution"] == 32 and blob["parameters"]["n_test"] == 40
    assert blob["parameters"]["n_attack"] == 8 and blob["overridden"] == ["n_attack"]
    assert blob["results"]["resolution"] == 32
    bad = _papermill(["notebooks/00_world.ipynb", str(tmp_path / "bad.ipynb"), "-p", "profile", "smoke",
                      "-p", "n_tset", "5"], cwd=ROOT)
    assert bad.returncode != 0 and "did you mean 'n_test'" in bad.stdout + bad.stderr


@pytest.mark.slow
def test_rclip_book_and_papermill_give_identical_results(tmp_path):
    out = tmp_path / "site"
    assert book.run_book("smoke", only=["00_world"], build=False, out=out, progress=False,
                         overrides=["00_world.n_attack=8"]) == 0
    via_book = json.loads((out / "executed" / "results" / "00_world.json").read_text())
    results = tmp_path / "pm.json"
    proc = _papermill(["00_world.ipynb", str(tmp_path / "pm.ipynb"), "-p", "profile", "smoke", "-p", "results_path",
                       str(results), "-p", "n_attack", "8"], cwd=ROOT / "notebooks")
    assert proc.returncode == 0, proc.stderr[-2000:]
    via_pm = json.loads(results.read_text())
    assert via_pm["results"] == via_book["results"]
    assert via_pm["parameters"] == via_book["parameters"] and via_pm["overridden"] == via_book["overridden"]


def test_publish_is_the_published_profile_only():
    with pytest.raises(RClipError, match="published profile 'world'"):
        book.run_book("cpu", publish=True)
    with pytest.raises(RClipError, match="at least one notebook"):
        book.run_book("smoke", only=[])
