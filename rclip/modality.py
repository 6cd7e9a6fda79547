"""The modality gap: where image and text embeddings sit on the unit sphere."""
from __future__ import annotations

import torch


def modality_gap(image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, float]:
    """Statistics of unit image (N, D) and text (M, D) embeddings.

    Returns the distance between the two centroids (Liang et al.'s gap), the mean cosine within each modality and
    across them.
    """
    mi, mt = image_features.mean(0), text_features.mean(0)
    return {
        "centroid_distance": float((mi - mt).norm()),
        "mean_cos_image_image": float((image_features @ image_features.T).mean()),
        "mean_cos_text_text": float((text_features @ text_features.T).mean()),
        "mean_cos_image_text": float((image_features @ text_features.T).mean()),
    }


def joint_pca(image_features: torch.Tensor, text_features: torch.Tensor, k: int = 2
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Project both modalities on the top-``k`` principal axes of their union: ((N, k), (M, k))."""
    both = torch.cat([image_features, text_features]).double()
    centre = both.mean(0)
    _, _, v = torch.linalg.svd(both - centre, full_matrices=False)
    axes = v[:k].T
    proj = (both - centre) @ axes
    return proj[: len(image_features)].float(), proj[len(image_features):].float()
