"""Leaderboard figures as PNG bytes (matplotlib, Agg canvas; no pyplot state, safe in any thread or worker).

- ``stratified_bars``: paper Fig. 2, findings with AUC >= 0.90 and 0.80-0.90 per backbone, LoRA vs +MoLRE.
- ``radar``: paper Fig. 3, per-finding AUC of one backbone, LoRA vs +MoLRE, spokes grouped by category.
- ``importance_bars``: Optuna hyperparameter importances.
- ``router_heatmaps``: mean routing weight per (finding category, expert) of each backbone's best MoLRE trial.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

LORA_COLOR = "#4c72b0"
MOLRE_COLOR = "#dd8452"
# One light background per finding category on the radar (order of molre.findings.CATEGORY_NAMES).
CATEGORY_COLORS = ("#fde0dd", "#e0ecf4", "#fff7bc", "#e5f5e0", "#efedf5", "#f0f0f0")
DPI = 120


def _png(fig: Figure) -> bytes:
    """PNG bytes, quantised to a 256-colour palette: plots have few colours, and the HTML embeds every image
    (a 75-spoke radar drops from ~600 kB to ~180 kB)."""
    from PIL import Image

    FigureCanvasAgg(fig)
    raw, out = io.BytesIO(), io.BytesIO()
    fig.savefig(raw, format="png", dpi=DPI, bbox_inches="tight")
    Image.open(raw).convert("RGB").quantize(256).save(out, format="png", optimize=True)
    return out.getvalue()


def _label_bars(ax, bars) -> None:
    for bar in bars:
        height = bar.get_height()
        ax.annotate(f"{height:.0f}", (bar.get_x() + bar.get_width() / 2, height), ha="center", va="bottom",
                    fontsize=7, xytext=(0, 1), textcoords="offset points")  # fmt: skip


def stratified_bars(counts: pd.DataFrame) -> bytes:
    """``counts``: one row per backbone, columns ``(band, side)`` with band in {">= 0.90", "0.80-0.90"} and
    side in {"LoRA", "+MoLRE"} (NaN where a side is missing). Two panels, grouped bars per backbone."""
    bands = list(dict.fromkeys(b for b, _ in counts.columns))
    fig = Figure(figsize=(max(6.0, 1.1 * len(counts) + 1), 3.0 * len(bands)))  # one panel per band, stacked
    x, width = np.arange(len(counts)), 0.38
    for i, band in enumerate(bands):
        ax = fig.add_subplot(len(bands), 1, i + 1)
        for j, (side, color) in enumerate((("LoRA", LORA_COLOR), ("+MoLRE", MOLRE_COLOR))):
            values = counts[(band, side)].to_numpy(dtype=float)
            keep = ~np.isnan(values)
            bars = ax.bar(x[keep] + (j - 0.5) * width, values[keep], width, label=side, color=color)
            _label_bars(ax, bars)
        ax.set_title(f"AUC {band}", fontsize=10)
        ax.set_xticks(x, list(counts.index), rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("number of findings", fontsize=8)
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return _png(fig)


def _radial_labels(ax, angles: np.ndarray, labels: list[str]) -> None:
    """Finding names written along their spokes, flipped on the left half so none reads upside down. The axes
    start at north and run clockwise, so a spoke at data angle t points at 90 - t degrees on screen."""
    ax.set_xticks(angles, [""] * len(angles))
    for angle, label in zip(angles, labels, strict=True):
        screen = (90 - np.degrees(angle)) % 360
        flip = 90 < screen < 270
        ax.text(angle, ax.get_rmax() + 0.01, label, rotation=screen - 180 if flip else screen,
                rotation_mode="anchor", ha="right" if flip else "left", va="center", fontsize=5.5)  # fmt: skip


def radar(title: str, names: list[str], categories: list[str], lora: np.ndarray, molre: np.ndarray,
          category_names: dict[str, str]) -> bytes:  # fmt: skip
    """One polar plot, one spoke per finding (in taxonomy order, so categories form contiguous wedges)."""
    n = len(names)
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    low = max(0.0, np.floor(np.nanmin(np.concatenate([lora, molre])) * 10) / 10 - 0.1)
    fig = Figure(figsize=(9, 9))
    ax = fig.add_subplot(projection="polar")
    ax.set_theta_zero_location("N")
    ax.set_theta_direction(-1)
    ax.set_ylim(low, 1.0)
    ax.set_yticks(np.arange(np.ceil(low * 10) / 10, 0.95, 0.1))  # no "1.0" label on top of the first spoke
    step = 2 * np.pi / n
    for k, cat in enumerate(category_names):
        idx = [i for i, c in enumerate(categories) if c == cat]
        if idx:
            ax.bar(angles[idx], 1.0 - low, width=step, bottom=low, color=CATEGORY_COLORS[k % 6],
                   edgecolor="none", zorder=0, label=f"{category_names[cat]} ({len(idx)})")  # fmt: skip
    closed = np.append(angles, angles[:1])
    for values, label, color in ((lora, "LoRA", LORA_COLOR), (molre, "+MoLRE", MOLRE_COLOR)):
        ax.plot(closed, np.append(values, values[:1]), color=color, lw=1.2, label=label, zorder=3)
        ax.fill(closed, np.append(values, values[:1]), color=color, alpha=0.08, zorder=2)
    ax.tick_params(axis="y", labelsize=7, colors="#555555")
    ax.set_rlabel_position(360 * 0.5 / n)  # between the first two spokes
    ax.grid(color="#cccccc", lw=0.4)
    _radial_labels(ax, angles, names)
    ax.set_title(title, pad=130, fontsize=11)  # clears the vertical labels of the top spokes
    ax.legend(loc="upper left", bbox_to_anchor=(1.08, 1.08), fontsize=7, frameon=False)
    return _png(fig)


def importance_bars(importances: pd.Series) -> bytes:
    """Horizontal bars, most important at the top; ``importances`` sums to 1 (Optuna normalises)."""
    ordered = importances.sort_values()
    fig = Figure(figsize=(7, 0.4 * len(ordered) + 1.2))
    ax = fig.add_subplot()
    bars = ax.barh(list(ordered.index), ordered.to_numpy(), color=LORA_COLOR)
    for bar, value in zip(bars, ordered.to_numpy(), strict=True):
        ax.annotate(f"{value:.2f}", (value, bar.get_y() + bar.get_height() / 2), va="center", fontsize=7,
                    xytext=(2, 0), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("importance for val/best_mean_auc (fANOVA, normalised)", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.margins(x=0.15)
    fig.tight_layout()
    return _png(fig)


@dataclass(frozen=True)
class RouterPanel:
    title: str
    usage: pd.DataFrame  # rows: category display names; columns: expert index; values: mean routing weight


def router_heatmaps(panels: list[RouterPanel]) -> bytes:
    """One heatmap per backbone (category x expert), values annotated; uniform routing would read 1/K."""
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.6 * cols, 3.4 * rows))
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        values = panel.usage.to_numpy(dtype=float)
        image = ax.imshow(values, cmap="viridis", aspect="auto", vmin=0.0, vmax=max(np.nanmax(values), 1e-6))
        for (r, c), v in np.ndenumerate(values):
            if not np.isnan(v):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if v < 0.6 * np.nanmax(values) else "black")  # fmt: skip
        ax.set_xticks(range(values.shape[1]), [f"E{k}" for k in panel.usage.columns], fontsize=7)
        ax.set_yticks(range(values.shape[0]), list(panel.usage.index), fontsize=7)
        ax.set_title(panel.title, fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    fig.tight_layout()
    return _png(fig)
