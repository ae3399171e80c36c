"""What ``lossd show`` prints and draws of a soft-label matrix, as pure functions.

``supervise`` is in the reference module's layout: column k is the soft label of
class k, so entry (j, k) is how much of class k's target goes to class j. Class
pairs are (true class k, confused with j).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class ConfusedPair:
    true_class: int
    other_class: int
    mass: float  # supervise[other_class, true_class]


def confused_pairs(supervise: torch.Tensor, top: int = 10) -> list[ConfusedPair]:
    """The ``top`` largest positive off-diagonal entries, largest first (ties in row-major order)."""
    c = supervise.shape[0]
    off = supervise.detach().to(torch.float64).cpu().clone()
    off.fill_diagonal_(float("-inf"))
    values, order = torch.sort(off.flatten(), descending=True, stable=True)
    count = min(top, c * c - c)
    return [
        ConfusedPair(true_class=int(i) % c, other_class=int(i) // c, mass=float(v))
        for v, i in zip(values[:count], order[:count], strict=True)
        if float(v) > 0
    ]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise OSError("--png needs matplotlib: pip install 'lossd[tools]'") from None
    return plt


def diagonal_png(epochs: list[int], diagonals: torch.Tensor, path: Path, title: str) -> Any:
    """Each class's soft label on itself over the epochs (a line per class up to 20 classes, the mean in
    black); returns the mean's line artist."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 4))
    try:
        data = diagonals.detach().to(torch.float64).cpu()
        if data.shape[1] <= 20:
            for c in range(data.shape[1]):
                axes.plot(epochs, data[:, c].tolist(), linewidth=0.8, alpha=0.6)
        mean = axes.plot(epochs, data.mean(dim=1).tolist(), color="black", linewidth=2, marker="o", label="mean")
        axes.set_xlabel("epoch")
        axes.set_ylabel("S[k, k]")
        axes.set_title(title)
        axes.legend()
        figure.tight_layout()
        figure.savefig(path, format="png", dpi=100)
    finally:
        plt.close(figure)
    return mean[0]


def heatmap_png(supervise: torch.Tensor, path: Path, title: str) -> Any:
    """Draw S as a heatmap to ``path`` (PNG); returns the image artist, whose array is S as drawn."""
    plt = _pyplot()
    data = supervise.detach().to(torch.float64).cpu().numpy()
    c = data.shape[0]
    figure, axes = plt.subplots(figsize=(min(12.0, 3.0 + 0.35 * c), min(10.0, 2.5 + 0.3 * c)))
    try:
        image = axes.imshow(data, cmap="viridis", interpolation="nearest", vmin=0.0, vmax=max(float(data.max()), 1e-12))
        axes.set_xlabel("true class k (column k: its soft label)")
        axes.set_ylabel("class j")
        axes.set_title(title)
        figure.colorbar(image, ax=axes, label="S[j, k]")
        figure.tight_layout()
        figure.savefig(path, format="png", dpi=100)
    finally:
        plt.close(figure)
    return image
