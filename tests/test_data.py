import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from rclip.data import load_descriptions, retrieval_dataset, zeroshot_dataset
from rclip.data.classification import pil_to_tensor
from rclip.errors import RClipError


def test_cifar10_reads_torchvision_layout(tmp_path, make_cifar10):
    data, labels = make_cifar10(tmp_path)
    task = zeroshot_dataset("cifar10", tmp_path, pil_to_tensor)
    assert task.classnames[3] == "cat" and len(task) == 6 and task.scale == "paper"
    x, y = task.tensors()
    assert y.tolist() == labels
    want = torch.from_numpy(data[2].reshape(3, 32, 32).astype(np.float32) / 255)
    assert torch.allclose(x[2], want)


def test_cifar100_and_stl10(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    with open(base / "test", "wb") as f:
        pickle.dump({"data": np.zeros((4, 3072), np.uint8), "fine_labels": [0, 1, 2, 1]}, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": ["apple", "aquarium_fish", "baby"]}, f)
    t = zeroshot_dataset("cifar100", tmp_path, pil_to_tensor)
    assert t.classnames == ["apple", "aquarium fish", "baby"] and t.tensors()[1].tolist() == [0, 1, 2, 1]

    sbase = tmp_path / "stl10_binary"
    sbase.mkdir()
    img = np.zeros((96, 96, 3), np.uint8)
    img[10, 20] = [255, 0, 0]  # row 10, column 20
    img.transpose(2, 1, 0).tofile(sbase / "test_X.bin")  # STL-10 is stored column-major per channel
    np.array([3], np.uint8).tofile(sbase / "test_y.bin")
    t = zeroshot_dataset("stl10", tmp_path, pil_to_tensor)
    x, y = t.tensors()
    assert y.tolist() == [2] and t.classnames[2] == "car" and x[0, 0, 10, 20] == 1.0 and x[0, 0].sum() == 1.0


def test_unsafe_dataset_pickle_is_refused(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(base / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        zeroshot_dataset("cifar10", tmp_path, pil_to_tensor)


def test_missing_roots_say_how_to_fix(tmp_path):
    with pytest.raises(RClipError, match="download=True"):
        zeroshot_dataset("cifar10", tmp_path / "nowhere", pil_to_tensor)
    with pytest.raises(RClipError, match="unknown dataset"):
        zeroshot_dataset("mnist", tmp_path, pil_to_tensor)
    with pytest.raises(RClipError, match="image folder not found"):
        zeroshot_dataset("imagefolder", tmp_path / "x", pil_to_tensor)


def test_imagefolder_with_names_descriptions_and_limit(tmp_path):
    for c, colour in (("n01", (255, 0, 0)), ("n02", (0, 0, 255))):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), colour).save(tmp_path / c / f"{i}.png")
    (tmp_path / "classnames.json").write_text(json.dumps({"n01": "red thing", "n02": "blue thing"}))
    desc = tmp_path / "desc.json"
    desc.write_text(json.dumps({"red thing": ["it is red"], "Blue thing": ["it is blue", "very blue"]}))
    t = zeroshot_dataset("imagefolder", tmp_path, pil_to_tensor, descriptions=desc, limit=4)
    assert t.classnames == ["red thing", "blue thing"] and t.descriptions[1] == ["it is blue", "very blue"]
    x, y = t.tensors()
    assert sorted(y.tolist()) == [0, 0, 1, 1] and x[y == 0][:, 0].mean() == 1.0
    with pytest.raises(RClipError, match="no descriptions"):
        load_descriptions(desc, ["red thing", "green thing"])


def test_karpathy_and_albef_retrieval(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.new("RGB", (10, 10)).save(tmp_path / "img" / name)
    karpathy = {"images": [
        {"filename": "a.jpg", "split": "test", "sentences": [{"raw": "A dog, running!"}, {"raw": "a dog"}]},
        {"filename": "b.jpg", "split": "train", "sentences": [{"raw": "x"}]},
        {"filename": "c.jpg", "split": "test", "sentences": [{"raw": "Two cats."}, {"raw": "cats"}, {"raw": "c"}]},
    ]}
    ann = tmp_path / "dataset_flickr30k.json"
    ann.write_text(json.dumps(karpathy))
    r = retrieval_dataset(ann, tmp_path / "img", pil_to_tensor)
    assert r.captions == ["a dog running", "a dog", "two cats", "cats", "c"]
    assert r.txt2img.tolist() == [0, 0, 1, 1, 1] and r.img2txt == [[0, 1], [2, 3, 4]]
    assert r.image_tensor().shape == (2, 3, 10, 10)
    albef = tmp_path / "test.json"
    albef.write_text(json.dumps([{"image": "b.jpg", "caption": ["one", "two"]}]))
    assert retrieval_dataset(albef, tmp_path / "img", pil_to_tensor).captions == ["one", "two"]
    with pytest.raises(RClipError, match="missing under"):
        albef.write_text(json.dumps([{"image": "zzz.jpg", "caption": "x"}]))
        retrieval_dataset(albef, tmp_path / "img", pil_to_tensor)
    with pytest.raises(RClipError, match="annotations not found"):
        retrieval_dataset(tmp_path / "none.json", tmp_path / "img", pil_to_tensor)


def test_json_user_files_accept_a_bom_and_name_the_file_when_broken(tmp_path):
    desc = tmp_path / "desc.json"
    desc.write_text(json.dumps({"cat": ["a small cat"], "dog": ["a dog"]}), encoding="utf-8-sig")   # with a BOM
    assert load_descriptions(desc, ["cat", "dog"]) == [["a small cat"], ["a dog"]]
    for bad in (b"{\"cat\": [", b"\xff\xfe not utf-8"):
        desc.write_bytes(bad)
        with pytest.raises(RClipError, match=f"{desc}.* is not UTF-8 JSON .*CuPL/AWT"):
            load_descriptions(desc, ["cat", "dog"])
        ann = tmp_path / "dataset_coco.json"
        ann.write_bytes(bad)
        with pytest.raises(RClipError, match=f"{ann}.* is not UTF-8 JSON .*Karpathy"):
            retrieval_dataset(ann, tmp_path, pil_to_tensor)
    with pytest.raises(RClipError, match="descriptions file not found: .*missing.json"):
        load_descriptions(tmp_path / "missing.json", ["cat"])


def test_karpathy_sentence_without_text_and_bad_classnames_name_the_file(tmp_path):
    ann = tmp_path / "dataset_coco.json"
    ann.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "test", "sentences": [{"sentid": 1}]}]}))
    with pytest.raises(RClipError, match=f"{ann}: a sentence of images\\[0\\] .*neither 'raw' nor 'tokens'"):
        retrieval_dataset(ann, tmp_path, pil_to_tensor)
    root = tmp_path / "folder"
    (root / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "cat" / "0.png")
    (root / "classnames.json").write_text("{not json")
    with pytest.raises(RClipError, match="classnames.json is not UTF-8 JSON"):
        zeroshot_dataset("imagefolder", root, pil_to_tensor)
    (root / "classnames.json").write_text("[\"cat\"]")
    with pytest.raises(RClipError, match="must hold a JSON object"):
        zeroshot_dataset("imagefolder", root, pil_to_tensor)
