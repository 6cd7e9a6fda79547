import pytest
import torch
import torch.nn.functional as F

from rclip import world, zeroshot
from rclip.data.base import ZeroShotTask
from rclip.errors import RClipError


def test_classifier_is_prompt_ensemble_cosine(tiny):
    task = world.zeroshot_task("colour", n=16, resolution=32)
    clf = zeroshot.zeroshot_classifier(tiny, task, "templates", scale=100.0)
    x, y = task.tensors()
    per_class = []
    for name in task.classnames:
        e = tiny.encode_texts([t.format(name) for t in task.templates])
        per_class.append(F.normalize(e.mean(0), dim=-1))
    w = torch.stack(per_class)
    with torch.no_grad():
        want = 100.0 * tiny.encode_images(x) @ w.T
        got = clf(x)
    assert torch.allclose(got, want, atol=1e-4)
    acc = zeroshot.accuracy(clf, x, y)
    assert acc == pytest.approx(100 * (want.argmax(1) == y).float().mean().item())
    both = zeroshot.evaluate(tiny, task, sources=("templates", "descriptions", "both"))
    assert set(both) == {"templates", "descriptions", "both"}


def test_task_validation():
    ds = torch.utils.data.TensorDataset(torch.zeros(1, 3, 4, 4), torch.zeros(1, dtype=torch.long))
    with pytest.raises(RClipError, match="empty class list"):
        ZeroShotTask("t", ds, [], ["a {}."])
    with pytest.raises(RClipError, match="placeholder"):
        ZeroShotTask("t", ds, ["cat"], ["a photo."])
    task = ZeroShotTask("t", ds, ["cat", "dog"], ["a {}."])
    with pytest.raises(RClipError, match="no class descriptions"):
        zeroshot.class_prompts(task, "descriptions")


def test_first_images_of_a_task_are_a_prefix_of_it(tmp_path):
    from torch.utils.data import Dataset

    task = world.zeroshot_task("shape", n=12, resolution=32)
    head = task.first(5)
    assert len(head) == 5 and head.meta["n"] == 5 and head.classnames == task.classnames
    assert head.meta["scenes"] == task.meta["scenes"][:5]
    assert all(torch.equal(a, b) for a, b in zip(head.tensors(), task.tensors(5)))
    assert torch.equal(world.zeroshot_task("shape", n=5, resolution=32).tensors()[0], head.tensors()[0])
    assert task.first(50) is task
    with pytest.raises(RClipError, match="at least one image"):
        task.first(0)

    class Listed(Dataset):                                          # a dataset that is not a TensorDataset
        def __len__(self):
            return 12

        def __getitem__(self, i):
            return task.dataset[i]

    other = ZeroShotTask("listed", Listed(), task.classnames, task.templates).first(4)
    assert len(other) == 4 and torch.equal(other.tensors()[0], task.tensors(4)[0])
