"""Small PNG charts for asset metadata and dataset cards (matplotlib, headless, nothing written to ~/.config)."""

from __future__ import annotations

import io
import math
import os
import tempfile
from collections.abc import Sequence

# matplotlib writes a font cache under MPLCONFIGDIR (default ~/.config/matplotlib); keep it out of $HOME.
os.environ.setdefault("MPLCONFIGDIR", os.path.join(tempfile.gettempdir(), "attrface-matplotlib"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402

STATE_COLOURS = {"positive": "#2a9d8f", "negative": "#e76f51", "unknown": "#bdbdbd"}


def _png(fig) -> bytes:
    """Lay out, render to PNG bytes and free the figure."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def stacked_bar_png(rows: Sequence[dict], label: str, parts: Sequence[str], title: str) -> bytes:
    """Horizontal stacked bars, one per row (``row[label]``), segments ``row[part]`` for each part."""
    fig, ax = plt.subplots(figsize=(6.4, 0.32 * max(len(rows), 3) + 1.0), dpi=100)
    names = [r[label] for r in rows]
    left = [0.0] * len(rows)
    for part in parts:
        values = [float(r[part]) for r in rows]
        ax.barh(names, values, left=left, label=part, color=STATE_COLOURS.get(part))
        left = [a + b for a, b in zip(left, values)]
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.tick_params(labelsize=8)
    return _png(fig)


def histograms_png(series: dict[str, Sequence[float]], thresholds: dict[str, float | None], title: str) -> bytes:
    """One small histogram per score, with its pass threshold drawn as a dashed line."""
    names = list(series)
    fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names), 2.6), dpi=100, squeeze=False)
    for ax, name in zip(axes[0], names):
        values = [float(v) for v in series[name]]
        if values:
            ax.hist(values, bins=20, color="#457b9d")
        threshold = thresholds.get(name)
        if threshold is not None:
            ax.axvline(threshold, color="#e63946", linestyle="--", linewidth=1)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def _ema(values: Sequence[float], smoothing: float) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing): starts at the first value, not at 0."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = smoothing * avg + (1 - smoothing) * v
        out.append(avg / (1 - smoothing**i))
    return out


def loss_curve_png(rows: Sequence[dict], keys: Sequence[str] = ("loss",), title: str = "training loss",
                   smoothing: float = 0.9) -> bytes:
    """One panel per key: ``row[key]`` against ``row["step"]``, raw points faint and an EMA line over them."""
    keys = list(keys) or ["loss"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 2.8), dpi=100, squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(float(r["step"]), float(r[key])) for r in rows
                  if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, ".", color="#457b9d", alpha=0.25, markersize=3)
            ax.plot(steps, _ema(values, smoothing), color="#e63946", linewidth=1.5, label=f"EMA {smoothing}")
            ax.legend(fontsize=7, loc="upper right")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def overlaid_curves_png(series: dict[str, Sequence[dict]], key: str = "loss", title: str = "training loss",
                        smoothing: float = 0.9) -> bytes:
    """One EMA line of ``row[key]`` against ``row["step"]`` per named series, on one panel (runs side by side)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=100)
    for name, rows in series.items():
        points = [(float(r["step"]), float(r[key])) for r in rows
                  if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, _ema(values, smoothing), linewidth=1.4, label=name)
    if ax.lines:
        ax.legend(fontsize=7, loc="upper right")
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel(f"{key} (EMA {smoothing})", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    return _png(fig)


def metric_by_level_png(values: dict[str, dict[str, dict[str, float]]], levels: Sequence[str],
                        title: str = "metrics against degradation level") -> bytes:
    """One panel per metric: each method's value at each level ({metric: {method: {level: value}}})."""
    metrics = list(values)
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(3.4 * max(1, len(metrics)), 2.9), dpi=100,
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for method, by_level in values[metric].items():
            xs = [i for i, lv in enumerate(levels) if math.isfinite(by_level.get(lv, float("nan")))]
            if xs:
                ax.plot(xs, [by_level[levels[i]] for i in xs], marker="o", linewidth=1.2, label=method)
        ax.set_xticks(range(len(levels)), list(levels), fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    return _png(fig)
