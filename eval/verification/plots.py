"""PNG outputs of the evaluator: the ROC curve (log-scale FAR) and a sheet of the hardest failed pairs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import cv2  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.fileio import atomic_write  # noqa: E402
from eval.verification.metrics import roc_curve, tar_at_far  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> None:
    try:
        with atomic_write(path, "wb", what="image") as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)


def save_roc(path: Path, scores: np.ndarray, same: np.ndarray, title: str) -> None:
    far, tar, _ = roc_curve(scores, same)
    n_neg = max(int((~np.asarray(same, bool)).sum()), 1)
    keep = far > 0  # log axis: FAR 0 cannot be drawn; the curve starts at one impostor
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot(far[keep], tar[keep], lw=1.5)
    t, _ = tar_at_far(scores, same, 1e-3)
    if np.isfinite(t) and n_neg >= 1000:
        ax.scatter([1e-3], [t], color="C3", zorder=3, label=f"TAR@FAR=1e-3 = {t:.3f}")
        ax.legend(loc="lower right")
    ax.set_xscale("log")
    ax.set_xlim(1.0 / n_neg, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    _save(fig, path)


def save_failures(
    path: Path, rows: Sequence[tuple[str, str, bool, float, float]], read_image: Callable[[str], bytes]
) -> None:
    """rows: (key a, key b, same, score, threshold), hardest first; one pair per row of the sheet."""
    n = max(len(rows), 1)
    fig, axes = plt.subplots(n, 2, figsize=(4.0, 2.1 * n), squeeze=False)
    for r, (a, b, same, score, thr) in enumerate(rows):
        for c, key in enumerate((a, b)):
            img = cv2.imdecode(np.frombuffer(read_image(key), np.uint8), cv2.IMREAD_COLOR)
            ax = axes[r][c]
            if img is not None:
                ax.imshow(img[:, :, ::-1])  # stored JPEG decodes to BGR
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(key, fontsize=5)
        kind = "same person, rejected" if same else "different people, accepted"
        axes[r][0].set_title(f"{kind}: score {score:.3f} (thr {thr:.3f})", fontsize=7, loc="left")
    if not rows:
        for ax in axes[0]:
            ax.axis("off")
        axes[0][0].set_title("no failed pairs", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def save_rocs(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> None:
    """One ROC figure (log-scale FAR) with a curve per named set of (scores, same)."""
    fig, ax = plt.subplots(figsize=(6.0, 4.8))
    floor = 1.0
    for name, (scores, same) in curves.items():
        far, tar, _ = roc_curve(scores, same)
        keep = far > 0  # log axis: FAR 0 cannot be drawn
        floor = min(floor, 1.0 / max(int((~np.asarray(same, bool)).sum()), 1))
        ax.plot(far[keep], tar[keep], lw=1.4, label=name)
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)
