"""Plots (matplotlib, PNG) and the results table."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(v: np.ndarray, width: int) -> np.ndarray:
    if width <= 1 or v.size < width:
        return v
    k = np.ones(width) / width
    return np.convolve(v, k, mode="valid")


def plot_training(metrics: list[dict], out: Path, title: str = "") -> list[str]:
    """``meta_loss.png``, ``meta_accuracy.png`` and ``coefficients.png`` from metrics rows."""
    plt = _plt()
    if not metrics:
        return []
    ep = np.array([m["episodes"] for m in metrics], dtype=float)
    written = []
    for key, fname, ylabel in (
        ("loss", "meta_loss.png", "meta-loss (query CE + L1)"),
        ("query_accuracy", "meta_accuracy.png", "query accuracy (meta-train episodes)"),
    ):
        v = np.array([m[key] if m[key] is not None else np.nan for m in metrics], dtype=float)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(ep, v, alpha=0.3, lw=0.8, label="per meta-step")
        w = max(1, len(v) // 20)
        if w > 1:
            ax.plot(ep[w - 1 :], _smooth(v, w), lw=2, label=f"moving mean ({w})")
        ax.set_xlabel("meta-training episodes")
        ax.set_ylabel(ylabel)
        if key == "loss" and np.all(np.isfinite(v)) and np.nanmax(v) > 20 * np.nanmedian(v):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    names = list(metrics[0]["coefficients"])
    shown = sorted(names, key=lambda n: -abs(metrics[-1]["coefficients"][n] or 0.0))
    shown = [n for n in names if n in shown[:MAX_COEFF_CURVES]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for n in shown:
        ax.plot(ep, [m["coefficients"][n] for m in metrics], label=n)
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_xlabel("meta-training episodes")
    ax.set_ylabel("coefficient")
    extra = f" (largest {len(shown)} of {len(names)})" if len(shown) < len(names) else ""
    ax.set_title((title or "rule coefficients") + extra, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "coefficients.png", dpi=110)
    plt.close(fig)
    written.append("coefficients.png")
    return written


#: The coefficient plot shows at most this many curves (the largest at the end of training).
MAX_COEFF_CURVES = 10


def plot_meta_test(meta_test: dict[str, dict], out: Path, chance: float | None = None) -> str:
    """Bar chart of held-out accuracy with 95% CIs per method."""
    plt = _plt()
    names = list(meta_test)
    acc = np.array([meta_test[n]["accuracy"] for n in names])
    lo = np.array([meta_test[n]["ci95"][0] for n in names])
    hi = np.array([meta_test[n]["ci95"][1] for n in names])
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names)), 3.8))
    ax.bar(names, acc, yerr=[acc - lo, hi - acc], capsize=6, color="#4c72b0")
    if chance is not None:
        ax.axhline(chance, color="k", ls="--", lw=1, label="chance")
        ax.legend()
    ax.set_ylabel("meta-test query accuracy")
    ax.set_ylim(0, 1)
    if max(len(n) for n in names) > 10:
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    fig.savefig(out / "meta_test.png", dpi=110)
    plt.close(fig)
    return "meta_test.png"


def plot_seeds(agg: dict, path: Path, chance: float | None = None, title: str = "") -> None:
    """Held-out accuracy of each method, one dot per meta-training seed (lines join a
    seed's methods), from :func:`metaplastic.run._run.aggregate_seeds`' summary."""
    plt = _plt()
    names = list(agg["test"])
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names)), 3.8))
    x = np.arange(len(names))
    for i, s in enumerate(agg["seeds"]):
        y = [np.nan if agg["test"][n][i] is None else agg["test"][n][i] for n in names]
        ax.plot(x, y, "o-", alpha=0.7, label=f"seed {s}")
    means = [agg["test_stats"][n]["mean"] for n in names]
    ax.scatter(x, [np.nan if m is None else m for m in means], marker="_", s=900, c="k")
    if chance is not None:
        ax.axhline(chance, color="k", ls="--", lw=1)
    ax.set_xticks(x, names)
    ax.set_ylabel("meta-test query accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_table(meta_test: dict[str, dict]) -> str:
    """Markdown table of held-out accuracy per method."""
    lines = [
        "| method | meta-test accuracy | 95% CI | episodes |",
        "|---|---|---|---|",
    ]
    for name, r in meta_test.items():
        lo, hi = r["ci95"]
        n = f"{r['episodes']}"
        if r.get("diverged"):  # blown-up episodes score 0: say how many there were
            n += f" ({r['diverged']} diverged)"
        lines.append(f"| {name} | {r['accuracy']:.3f} | [{lo:.3f}, {hi:.3f}] | {n} |")
    return "\n".join(lines)


def plot_curves(runs: dict[str, list[dict]], key: str, ylabel: str, out_file: Path) -> None:
    """One smoothed training curve per method (``key`` from each run's metrics rows)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, rows in runs.items():
        ep = np.array([r["episodes"] for r in rows], dtype=float)
        v = np.array([np.nan if r[key] is None else r[key] for r in rows], dtype=float)
        w = max(1, len(v) // 20)
        ax.plot(ep[w - 1 :], _smooth(v, w), lw=2, label=label)
    ax.set_xlabel("meta-training episodes")
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_file, dpi=110)
    plt.close(fig)


def plot_lines(
    series: dict[str, tuple[list[float], list[float]]],
    xlabel: str,
    ylabel: str,
    out_file: Path,
    logx: bool = False,
    logy: bool = False,
) -> None:
    """One line per ``label: (x, y)`` (markers at the points), optional log axes."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, (x, y) in series.items():
        ax.plot(x, y, "o-", ms=3, lw=1.5, label=label)
    ax.set_xscale("log" if logx else "linear")
    ax.set_yscale("log" if logy else "linear")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_file, dpi=110)
    plt.close(fig)


def plot_evolution(
    history: list[dict], names: list[str], out_file: Path, ylabel: str = "fitness"
) -> None:
    """An :func:`metaplastic.outer.evolve` run: fitness of the search mean and the median
    member per generation (left), and the mean's parameters, one line per ``names`` entry
    (right)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    g = [h["generation"] for h in history]
    axes[0].plot(g, [h["mean_fitness"] for h in history], label="search mean")
    axes[0].plot(g, [h["median_member"] for h in history], label="median member")
    axes[0].set_xlabel("generation")
    axes[0].set_ylabel(ylabel)
    axes[0].legend(fontsize=8)
    p = np.array([np.ravel(h["params"]) for h in history])
    for i, name in enumerate(names):
        axes[1].plot(g, p[:, i], label=name)
    axes[1].set_xlabel("generation")
    axes[1].set_ylabel("parameter")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_file, dpi=110)
    plt.close(fig)


def seeds_table(agg: dict) -> str:
    """Markdown: meta-test accuracy per seed and method, then mean ± sd [95% CI]."""
    methods = list(agg["test"])
    head = "| seed | " + " | ".join(methods) + " |"
    lines = [head, "|" + "---|" * (len(methods) + 1)]

    def fmt(v):
        return "—" if v is None else f"{v:.3f}"

    for i, s in enumerate(agg["seeds"]):
        lines.append(f"| {s} | " + " | ".join(fmt(agg["test"][m][i]) for m in methods) + " |")
    cells = []
    for m in methods:
        st = agg["test_stats"][m]
        cells.append(
            "—"
            if st["mean"] is None
            else f"{st['mean']:.3f} ± {st['sd']:.3f} [{st['ci95'][0]:.3f}, {st['ci95'][1]:.3f}]"
        )
    lines.append("| mean ± sd [95% CI] | " + " | ".join(cells) + " |")
    if agg.get("gap_closure_stats", {}).get("mean") is not None:
        g = agg["gap_closure_stats"]
        lines.append("")
        lines.append(f"FA→backprop gap closed by the learned rule: {g['mean']:.2f} ± {g['sd']:.2f}")
    lines.append(f"selected seed (best validation score): {agg['selected_seed']}")
    return "\n".join(lines)
