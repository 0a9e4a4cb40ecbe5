"""PNG plots of a run: accuracy and loss per round, label distribution per client,
participation per client and round, clients online over virtual time."""

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


def plot_privacy(records: list[dict[str, Any]], path: Path, title: str) -> bool:
    """privacy.png: epsilon (left axis) and test accuracy (right) against rounds, for a
    run with differential privacy (False, nothing written, without)."""
    xs, eps = _series(records, "dp_epsilon")
    if not xs:
        return False
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(xs, eps, color="tab:red", label="epsilon")
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon", color="tab:red")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    rounds, acc = _series(records, "eval_accuracy")
    if rounds:
        ax2.plot(rounds, acc, color="tab:blue", label="test accuracy")
    ax2.set_ylabel("test accuracy", color="tab:blue")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


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


# ---------------------------------------------------------------- churn: participation, online

_STATUS_COLORS = (
    "#424242",  # offline
    "#c8c8c8",  # online
    "#fdd835",  # selected
    "#64b5f6",  # replied
    "#e53935",  # dropped
    "#fb8c00",  # late
    "#2e7d32",  # aggregated
    "#8e24aa",  # rejected
)
_NOT_RECORDED_COLOR = "#ffffff"


def plot_participation(
    csv_path: Path, png_path: Path, num_clients: int, max_clients: int = 200
) -> None:
    """Clients x rounds heatmap of participation.csv, coloured by status.

    For more than ``max_clients`` clients an even sample of client ids is shown. Cells with
    no row (participation.csv of a big population records selected clients only) are drawn
    as "not recorded".
    """
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.ticker import MaxNLocator

    from fedsim.world.participation import STATUSES, read_participation

    rounds, cids, codes = read_participation(csv_path)
    n = max(0, int(num_clients))
    max_clients = max(1, int(max_clients))
    shown = (
        np.unique(np.linspace(0, n - 1, max_clients).round().astype(np.int64))
        if n > max_clients
        else np.arange(n, dtype=np.int64)
    )
    row_of = np.full(n, -1, dtype=np.int64)
    row_of[shown] = np.arange(len(shown))
    r_lo, r_hi = (int(rounds.min()), int(rounds.max())) if rounds.size else (1, 1)
    missing = len(STATUSES)  # code of "not recorded"
    mat = np.full((len(shown), r_hi - r_lo + 1), missing, dtype=np.int64)
    keep = (cids >= 0) & (cids < n)
    keep[keep] = row_of[cids[keep]] >= 0
    mat[row_of[cids[keep]], rounds[keep] - r_lo] = codes[keep]

    names = list(STATUSES)
    colors = list(_STATUS_COLORS)
    if (mat == missing).any():
        names.append("not recorded")
        colors.append(_NOT_RECORDED_COLOR)
    k = len(names)
    cmap = ListedColormap(colors)
    norm = BoundaryNorm(np.arange(k + 1) - 0.5, k)

    fig, ax = plt.subplots(figsize=(6, max(3.0, min(8.0, 0.03 * len(shown) + 2.5))), dpi=100)
    ax.set_xlabel("round")
    ax.set_ylabel("client")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(shown):
        im = ax.imshow(
            mat,
            aspect="auto",
            interpolation="nearest",
            cmap=cmap,
            norm=norm,
            extent=(r_lo - 0.5, r_hi + 0.5, len(shown) - 0.5, -0.5),
        )
        step = max(1, len(shown) // 20)
        ax.set_yticks(range(0, len(shown), step))
        ax.set_yticklabels([str(shown[i]) for i in range(0, len(shown), step)])
        cbar = fig.colorbar(im, ax=ax, ticks=range(k))
        cbar.ax.set_yticklabels(names)
        cbar.ax.tick_params(length=0)
    if not rounds.size or not len(shown):
        ax.text(0.5, 0.5, "no rounds recorded", ha="center", va="center", transform=ax.transAxes)
    shown_txt = f"even sample of {len(shown)} of {n} clients" if n > max_clients else f"{n} clients"
    ax.set_title(f"participation ({shown_txt})", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def plot_online(records: list[dict[str, Any]], png_path: Path) -> None:
    """Clients online at each round's start and clients aggregated per round, against the
    cumulative virtual time (hours past 3 h, else seconds); None values are skipped."""
    pts = {
        key: [
            (r["virtual_time_s"], r[key])
            for r in records
            if r.get("virtual_time_s") is not None and r.get(key) is not None
        ]
        for key in ("clients_online", "clients_aggregated")
    }
    t_max = max((t for series in pts.values() for t, _ in series), default=0.0)
    scale, unit = (3600.0, "h") if t_max > 3 * 3600 else (1.0, "s")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, style in (("clients_online", "-"), ("clients_aggregated", "--")):
        series = pts[key]
        if series:
            xs = [t / scale for t, _ in series]
            ys = [y for _, y in series]
            ax.plot(xs, ys, style, marker="." if len(xs) < 60 else None, label=key)
    ax.set_xlabel(f"virtual time ({unit})")
    ax.set_ylabel("clients")
    ax.set_title("clients online at round start, and aggregated")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
