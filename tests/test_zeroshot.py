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
