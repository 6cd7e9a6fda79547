"""Image-text retrieval metrics with several captions per image.

* Text retrieval (image query, "i2t"/TR): a hit at k if *any* of the image's true captions ranks in the top k.
* Image retrieval (caption query, "t2i"/IR): each caption has exactly one true image.

Ranks are 0-based positions after sorting similarities in descending order; ties are broken towards the lower
index (the stable order of ``torch.sort``), the same rule the brute-force reference in the tests uses.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from rclip.data.base import RetrievalSet
from rclip.errors import RClipError
from rclip.models import CLIPBundle


def i2t_ranks(sim: torch.Tensor, txt2img: torch.Tensor) -> torch.Tensor:
    """(N_img,) rank of the best-ranked true caption of each image. sim: (N_img, N_txt)."""
    _check_owners(sim, txt2img)
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices  # (N_img, N_txt)
    owner = txt2img.to(sim.device)[order]  # owner image of the caption at each rank
    hit = owner == torch.arange(sim.shape[0], device=sim.device)[:, None]
    if not bool(hit.any(1).all()):
        raise RClipError("some image has no caption in txt2img")
    return hit.float().argmax(1).cpu()


def _check_owners(sim: torch.Tensor, txt2img: torch.Tensor) -> None:
    if len(txt2img) and (int(txt2img.min()) < 0 or int(txt2img.max()) >= sim.shape[0]):
        raise RClipError(f"txt2img names image {int(txt2img.max()) if int(txt2img.max()) >= sim.shape[0] else int(txt2img.min())}"
                         f" but the similarity has {sim.shape[0]} images: every caption's owner must lie in "
                         f"[0, {sim.shape[0] - 1}]")


def t2i_ranks(sim: torch.Tensor, txt2img: torch.Tensor) -> torch.Tensor:
    """(N_txt,) rank of each caption's true image. sim: (N_img, N_txt)."""
    _check_owners(sim, txt2img)
    order = torch.sort(sim.T, dim=1, descending=True, stable=True).indices  # (N_txt, N_img)
    hit = order == txt2img.to(sim.device)[:, None]
    return hit.float().argmax(1).cpu()


def recall_at_k(sim: torch.Tensor, txt2img: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k in percent: ``{"i2t_R@1": ..., "t2i_R@1": ..., ...}`` and the mean of all of them, ``rsum/6``."""
    if sim.shape[1] != len(txt2img):
        raise RClipError(f"similarity has {sim.shape[1]} text columns but txt2img has {len(txt2img)} entries")
    if sim.numel() == 0:
        raise RClipError(f"recall needs at least one image and one caption; the similarity matrix is "
                         f"{tuple(sim.shape)}")
    if torch.isnan(sim).any():
        raise RClipError("the similarity matrix contains NaN; check the embeddings")
    ri, rt = i2t_ranks(sim, txt2img), t2i_ranks(sim, txt2img)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * (ri < k).float().mean().item()
    for k in ks:
        out[f"t2i_R@{k}"] = 100.0 * (rt < k).float().mean().item()
    out["mean_R"] = sum(out.values()) / len(out)
    return out


def evaluate(bundle: CLIPBundle, rset: RetrievalSet, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Clean Recall@k of ``bundle`` on a retrieval set."""
    img = bundle.encode_images(rset.image_tensor())
    txt = bundle.encode_texts(rset.captions)
    return recall_at_k(img @ txt.T, rset.txt2img, ks)


def per_image_recall(i2t: torch.Tensor, t2i: torch.Tensor, img2txt: Sequence[Sequence[int]], k: int = 1):
    """Per-image R@k in points, the item a retrieval claim compares: for image i,
    ``(100 · [i2t[i] < k] + mean over its captions c of 100 · [t2i[c] < k]) / 2`` — the mean of its hit as a text
    retrieval query and the mean hit of its captions as image retrieval queries.

    i2t: (N_img,) and t2i: (N_txt,) 0-based ranks (:func:`i2t_ranks`, :func:`t2i_ranks`); img2txt: each image's
    caption indices. Returns a (N_img,) float numpy array. When every image has the same number of captions (the
    world, Flickr30k) its mean is exactly ``(TR@k + IR@k) / 2`` of :func:`recall_at_k`; otherwise each image's
    captions count as one item together (an image with more captions weighs no more).
    """
    import numpy as np

    i2t, t2i = torch.as_tensor(i2t).cpu(), torch.as_tensor(t2i).cpu()
    if len(i2t) != len(img2txt):
        raise RClipError(f"{len(i2t)} image ranks but {len(img2txt)} caption groups")
    if any(len(caps) == 0 for caps in img2txt):
        raise RClipError("an image has no caption: its image-retrieval half is undefined")
    tr = (i2t < k).double().numpy() * 100.0
    hits = (t2i < k).double().numpy() * 100.0
    ir = np.array([hits[list(caps)].mean() for caps in img2txt])
    return (tr + ir) / 2
