"""The paper-scale path end to end on stand-ins: a CIFAR-10 test split in torchvision's layout, a tiny CLIP saved as
a checkpoint, a CuPL-format descriptions JSON and a "robust" checkpoint, run through chapter 1 with papermill."""
import json
import os
from pathlib import Path

import pytest
import torch

from rclip import book, data, models
from rclip.errors import RClipError
from rclip.methods.cola import COLAConfig, cola_classifier
from rclip.profiles import notebook_parameters

from conftest import CIFAR10_NAMES

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def inputs(tmp_path, make_cifar10, tiny):
    make_cifar10(tmp_path / "cifar", n=20)
    ckpt = tmp_path / "tiny.safetensors"
    models.save(tiny, ckpt)
    desc = tmp_path / "cifar10.json"
    desc.write_text(json.dumps({c: [f"a {c} seen from the side.", f"a small {c}.", f"a {c} in the open.",
                                    f"the shape of a {c}."] for c in CIFAR10_NAMES}))
    return {"model": "rclip-tiny", "checkpoint": str(ckpt), "datasets": {"cifar10": str(tmp_path / "cifar")},
            "descriptions": {"cifar10": str(desc)}, "robust_checkpoints": {"fare": str(ckpt), "tecoa": None}}


def test_paper_tasks_carry_descriptions_and_cola_falls_back_to_templates(inputs):
    bundle = data.paper_model(inputs)
    tasks = data.paper_tasks(inputs, bundle.preprocess, n=10)
    assert list(tasks) == ["cifar10"] and len(tasks["cifar10"]) == 10 and tasks["cifar10"].scale == "paper"
    x, _ = tasks["cifar10"].tensors()
    assert x.shape[1:] == (3, bundle.image_size, bundle.image_size)
    with_desc = cola_classifier(bundle, tasks["cifar10"], COLAConfig(n_views=1))
    assert with_desc.texts.shape[:2] == (10, 1 + 4)                       # the prompt + 4 descriptions
    plain = data.paper_tasks({**inputs, "descriptions": {}}, bundle.preprocess, n=10)["cifar10"]
    fallback = cola_classifier(bundle, plain, COLAConfig(n_views=1))
    assert fallback.texts.shape[:2] == (10, 1 + len(plain.templates))     # the prompt + each template
    robust = data.robust_models(inputs)
    assert list(robust) == ["fare"]
    assert torch.equal(robust["fare"].model.visual.conv1.weight, bundle.model.visual.conv1.weight)


def test_paper_inputs_errors_name_the_fix(inputs, tmp_path):
    with pytest.raises(RClipError, match="needs the profile's inputs"):
        data.paper_tasks(None, lambda im: im)
    with pytest.raises(RClipError, match="no zero-shot classification set has a root"):
        data.paper_tasks({**inputs, "datasets": {"cifar10": None}}, lambda im: im)
    with pytest.raises(RClipError, match=r"\['stl10'\] were asked for but have no root"):
        data.paper_tasks(inputs, lambda im: im, names=["stl10"])
    with pytest.raises(RClipError, match="unknown sets"):
        data.paper_tasks({**inputs, "descriptions": {"cifar11": "x.json"}}, lambda im: im)
    with pytest.raises(RClipError, match="inputs.model is not set"):
        data.paper_model({"datasets": {}})
    bad = {**inputs, "descriptions": {"cifar10": str(tmp_path / "missing.json")},
           "robust_checkpoints": {"fare": str(tmp_path / "missing.pt")}}
    with pytest.raises(RClipError) as err:
        book.validate_inputs(bad)
    assert "descriptions cifar10" in str(err.value) and "robust_checkpoints fare" in str(err.value)


def test_profile_hands_its_inputs_to_every_notebook():
    params = notebook_parameters("paper", "01_cola")
    assert params["scale"] == "paper" and params["inputs"]["model"] == "ViT-B-32"
    assert notebook_parameters("smoke", "01_cola")["inputs"] is None      # the world profiles give none


@pytest.mark.slow
def test_chapter1_runs_at_paper_scale_on_stand_ins(inputs, tmp_path):
    import papermill as pm

    results = tmp_path / "01_cola.json"
    params = {"profile": "smoke", "scale": "paper", "inputs": inputs, "tasks": None, "ablation_task": None,
              "n_eval": 10, "results_path": str(results)}      # what a user passes; the rest comes from smoke
    os.environ.setdefault("RCLIP_ROOT", str(ROOT))
    pm.execute_notebook(str(ROOT / "notebooks" / "01_cola.ipynb"), str(tmp_path / "out.ipynb"), parameters=params,
                        kernel_name="python3", cwd=str(ROOT / "notebooks"), progress_bar=False)
    blob = json.loads(results.read_text())
    res = blob["results"]
    assert set(blob["overridden"]) == {"scale", "inputs", "tasks", "ablation_task", "n_eval"}
    assert res["scale"] == "paper" and res["tasks"] == ["cifar10"] and res["n_eval"] == 10
    assert res["reference_budgets_255"] == {}                  # the papers' radii only, no world reference
    assert {"CLIP | cifar10", "TTC | cifar10", "COLA | cifar10"} <= set(res["table1"])
    assert {"clean", "PGD 1/255", "CW 1/255", "PGD 4/255"} <= set(res["table1"]["COLA | cifar10"])
    assert "CW 4/255" not in res["table1"]["COLA | cifar10"]         # CW at the paper's 1/255 only
    assert "COLA, plain cost C | cifar10" in res["table1"]
    assert res["ttc"]["tau_threshold"] == 0.2 and "ttc_tuning" not in res   # no validation split: TTC's own setting
    assert set(res["table3_mean"]) == {"FARE", "FARE + TTC", "FARE + COLA"}
    assert all(c["verdict"] in ("reproduced", "not reproduced", "undecided", "untestable") for c in res["claims"])
    assert res["finetune"] == {}                               # loaded, not fine-tuned
    pre = res["baseline_precondition"]                         # no validation split: measured on the test images
    assert pre["split"] == "test" and pre["n_per_task"] == 8 and set(pre["preconditions"]) == {"FARE"}
    assert [g["sides"] for g in pre["gaps"]] == [["FARE", "CLIP"]]
