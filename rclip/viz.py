"""One plotting style for the whole book, and the few figure helpers the chapters share."""
from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import seaborn as sns
import torch

PALETTE = "colorblind"


def setup() -> None:
    """Apply the book's style (call once per notebook): the plotting theme, and tables shown whole (pandas truncates
    long cells and wide tables by default)."""
    import pandas as pd

    pd.set_option("display.max_colwidth", None)
    pd.set_option("display.max_columns", None)
    pd.set_option("display.width", None)
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE, font_scale=0.95)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "figure.autolayout": True,
                         "axes.titleweight": "bold"})


def image_grid(images: torch.Tensor, titles: Sequence[str] | None = None, ncols: int = 8, size: float = 1.6,
               fontsize: float = 6.5):
    """Show (N, 3, H, W) [0, 1] images in a grid with optional (wrapped) titles. Returns the figure."""
    import textwrap

    n = len(images)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows * (1.5 if titles else 1.0)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i].permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
        if titles:
            ax.set_title(textwrap.fill(titles[i], 26), fontsize=fontsize, loc="left", fontweight="normal")
    return fig


def percent_axis(ax, label: str = "top-1 (%)") -> None:
    ax.set_ylim(-2, 102)
    ax.set_ylabel(label)


def bar_means(means, title: str, *, rot: int = 30, figsize=(9, 3.2)) -> None:
    """Bar chart of a table of mean accuracies (rows: models, columns: conditions; non-numeric columns such as
    "left out (at chance)" are skipped), one group of bars per condition, on a percent axis."""
    fig, ax = plt.subplots(figsize=figsize)
    means.select_dtypes("number").T.plot.bar(ax=ax, rot=rot)
    ax.set(title=title, xlabel="")
    percent_axis(ax)
    plt.show()
