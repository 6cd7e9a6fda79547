import pytest
import torch

from rclip import retrieval
from rclip.errors import RClipError


def brute_force(sim, txt2img, k):
    """Reference: loop over queries, count strictly better items plus earlier ties."""
    n_img, n_txt = sim.shape
    i2t = 0
    for i in range(n_img):
        best = None
        for t in range(n_txt):
            if txt2img[t] != i:
                continue
            rank = sum(1 for u in range(n_txt) if sim[i, u] > sim[i, t] or (sim[i, u] == sim[i, t] and u < t))
            best = rank if best is None else min(best, rank)
        i2t += best < k
    t2i = 0
    for t in range(n_txt):
        j = txt2img[t]
        rank = sum(1 for u in range(n_img) if sim[u, t] > sim[j, t] or (sim[u, t] == sim[j, t] and u < j))
        t2i += rank < k
    return 100 * i2t / n_img, 100 * t2i / n_txt


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n_img = 13
    counts = torch.randint(1, 6, (n_img,), generator=g)
    owners = torch.repeat_interleave(torch.arange(n_img), counts)
    owners = owners[torch.randperm(len(owners), generator=g)]
    sim = torch.randint(0, 6, (n_img, len(owners)), generator=g).float()  # many ties on purpose
    got = retrieval.recall_at_k(sim, owners, ks=(1, 3, 5))
    for k in (1, 3, 5):
        i2t, t2i = brute_force(sim, owners.tolist(), k)
        assert got[f"i2t_R@{k}"] == pytest.approx(i2t)
        assert got[f"t2i_R@{k}"] == pytest.approx(t2i)


def test_perfect_and_bad_inputs():
    owners = torch.tensor([0, 0, 1, 1, 2])
    sim = torch.zeros(3, 5)
    sim[owners, torch.arange(5)] = 1
    r = retrieval.recall_at_k(sim, owners)
    assert r["i2t_R@1"] == 100 and r["t2i_R@1"] == 100
    with pytest.raises(RClipError, match="NaN"):
        retrieval.recall_at_k(sim.masked_fill(sim == 1, float("nan")), owners)
    with pytest.raises(RClipError, match="text columns"):
        retrieval.recall_at_k(sim, owners[:4])
    with pytest.raises(RClipError, match="at least one image and one caption"):
        retrieval.recall_at_k(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long))
