"""PNG plots of a run: accuracy and loss per round, label distribution per client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

MAX_HEATMAP_CLIENTS = 100


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(records: list[dict[str, Any]], out_dir: Path, title: str) -> list[str]:
    """accuracy.png and loss.png; returns the file names written."""
    written = []
    for fname, keys, ylabel in (
        ("accuracy.png", ("eval_accuracy", "client_eval_accuracy"), "accuracy"),
        ("loss.png", ("train_loss", "eval_loss", "client_eval_loss"), "loss"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for key in keys:
            xs, ys = _series(records, key)
            if xs:
                ax.plot(xs, ys, marker="." if len(xs) < 60 else None, label=key)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / fname)
        plt.close(fig)
        written.append(fname)
    return written


def plot_label_heatmap(summary: dict[str, Any], path: Path) -> None:
    """Clients x classes heatmap of training-label counts (an even sample of clients)."""
    clients = summary["clients"]
    if len(clients) > MAX_HEATMAP_CLIENTS:
        pick = np.linspace(0, len(clients) - 1, MAX_HEATMAP_CLIENTS).round().astype(int)
        clients = [clients[i] for i in pick]
    mat = np.array([c["label_histogram"] for c in clients], dtype=float)
    fig, ax = plt.subplots(figsize=(6, max(3.0, min(12.0, 0.12 * len(clients) + 1.5))), dpi=100)
    im = ax.imshow(mat, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("label")
    ax.set_ylabel("client")
    ax.set_xticks(range(mat.shape[1]))
    step = max(1, len(clients) // 20)
    ax.set_yticks(range(0, len(clients), step))
    ax.set_yticklabels([str(clients[i]["client_id"]) for i in range(0, len(clients), step)])
    ax.set_title(f"training labels per client ({summary['num_clients']} clients)")
    fig.colorbar(im, ax=ax, label="examples")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
