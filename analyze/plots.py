"""Figures from an evaluation or a sweep (matplotlib, the optional ``plots`` extra), each
written as PNG and, for papers, as vector PDF beside it.

* ``score_histograms``: per score, the ID score distribution against each OOD set's.
* ``roc_curves``: per score, the ROC curve (ID positive) against each OOD set.
* ``method_comparison``: per OOD set, the AUROC and FPR95 of every method side by side.
* ``layer_contribution``: from a sweep, average AUROC of every single-layer variant.
* ``channel_strip`` and ``heat_colors``: GAIA's channel strip (PNG bytes) and the colour
  map of the HTML report's attribution overlays (``analyze.report``).
"""
import io
import os

import numpy as np
from sklearn.metrics import roc_curve

from .tables import title


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install -e '.[plots]' (make demo installs it)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, out_dir, name):
    """Lay out, write ``out_dir/name`` (PNG at 110 dpi) and the same figure as PDF, close
    it; returns the PNG's path."""
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    fig.savefig(os.path.splitext(path)[0] + ".pdf")
    plt.close(fig)
    return path


def _finite(v):
    return v[np.isfinite(v)]


def score_histograms(evaluation, out_dir):
    """``out_dir/hist_<score>.png`` for every score of ``evaluation``; returns the paths."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    id_name = evaluation.id
    oods = evaluation.ood
    paths = []
    for score in evaluation.results:
        fig, axes = plt.subplots(1, len(oods), figsize=(3.2 * len(oods), 2.8), squeeze=False)
        ref = _finite(evaluation.scores[id_name][score])
        for ax, name in zip(axes[0], oods):
            other = _finite(evaluation.scores[name][score])
            both = np.concatenate([ref, other])
            bins = np.linspace(both.min(), both.max(), 40) if np.ptp(both) > 0 else 10
            # one filled outline per set, not one bar per bin: the same figure, half the drawing time
            ax.hist(ref, bins=bins, alpha=0.6, density=True, histtype="stepfilled", label=f"{id_name} (ID)")
            ax.hist(other, bins=bins, alpha=0.6, density=True, histtype="stepfilled", label=name)
            auroc = evaluation.results[score][name]["AUROC"]
            ax.set_title(f"{name}: AUROC {100 * auroc:.1f}", fontsize=9)
            ax.legend(fontsize=7)
            ax.tick_params(labelsize=7)
            ax.set_xlabel("score", fontsize=8)
            ax.set_ylabel("density", fontsize=8)
        fig.suptitle(f"{title(score)} (higher = more in-distribution)", fontsize=10)
        paths.append(_save(plt, fig, out_dir, f"hist_{score}.png"))
    return paths


def roc_curves(evaluation, out_dir):
    """``out_dir/roc_<score>.png`` (ID positive) for every score; returns the paths."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    id_name = evaluation.id
    paths = []
    for score in evaluation.results:
        fig, ax = plt.subplots(figsize=(4, 4))
        ref = evaluation.scores[id_name][score]
        for name in evaluation.ood:
            values = evaluation.scores[name]
            s = np.nan_to_num(np.concatenate([ref, values[score]]), nan=-1e300, posinf=1e300, neginf=-1e300)
            y = np.r_[np.ones(len(ref)), np.zeros(len(values[score]))]
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, label=f"{name} ({100 * evaluation.results[score][name]['AUROC']:.1f})")
        ax.axhline(0.95, color="grey", lw=0.5, ls="--")
        ax.set_xlabel("false positive rate (OOD accepted)")
        ax.set_ylabel("true positive rate (ID accepted)")
        ax.set_title(f"ROC, {title(score)}", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
        paths.append(_save(plt, fig, out_dir, f"roc_{score}.png"))
    return paths


def method_comparison(evaluation, out_dir):
    """``out_dir/compare_<ood>.png``: per OOD set, AUROC and FPR95 (%) of every method of
    ``evaluation`` as horizontal bars on zero-based axes, best AUROC on top; returns the paths."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for ood in [*evaluation.ood, "Average"]:
        names = sorted(evaluation.results, key=lambda n: evaluation.results[n][ood]["AUROC"])
        fig, axes = plt.subplots(1, 2, figsize=(8, max(2.5, 0.28 * len(names) + 1)), sharey=True)
        for ax, metric in zip(axes, ("AUROC", "FPR95")):
            ax.barh(range(len(names)), [100 * evaluation.results[n][ood][metric] for n in names],
                    color="tab:blue" if metric == "AUROC" else "tab:red")
            ax.set_xlim(0, 100)
            ax.set_xlabel(f"{metric} (%) {'higher' if metric == 'AUROC' else 'lower'} is better", fontsize=8)
        axes[0].set_yticks(range(len(names)))
        axes[0].set_yticklabels([title(n) for n in names], fontsize=7)
        fig.suptitle(f"ID {evaluation.id} vs {ood if ood != 'Average' else 'the average over OOD sets'}",
                     fontsize=10)
        paths.append(_save(plt, fig, out_dir, f"compare_{ood}.png"))
    return paths


def layer_contribution(sweep, out_dir):
    """``out_dir/layers_<score>.png``: for every layered score in the sweep, the best average
    AUROC over the single-layer variants of each layer (whatever their other parameters),
    bars in network order; returns the paths."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    by_score = {}
    for r in sweep.rows:
        layers = r["params"].get("layers") or []
        if len(layers) == 1:
            best = by_score.setdefault(r["score"], {})
            best[layers[0]] = max(best.get(layers[0], -1.0), r["average"]["AUROC"])
    paths = []
    for score, values in by_score.items():
        order = sweep.layer_order.get(score, [])
        layers = [l for l in order if l in values] + [l for l in values if l not in order]
        fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(layers) + 1.5), 3.2))
        ax.bar(range(len(layers)), [100 * values[l] for l in layers], color="tab:blue")
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=70, fontsize=7, ha="right")
        ax.set_xlabel("layer (network order)", fontsize=8)
        ax.set_ylabel("best average AUROC (%)")
        ax.set_ylim(0, 100)         # a zero-based axis: bar heights compare honestly
        ax.set_title(f"{title(score)}: one layer at a time", fontsize=10)
        paths.append(_save(plt, fig, out_dir, f"layers_{score}.png"))
    return paths


def channel_strip(id_means, ood_means, id_label, ood_label, objective):
    """PNG bytes of GAIA's figure from a cache: the channel-wise gradient means (rows:
    images, columns: channels) of ID images beside those of OOD images, one colour scale
    symmetric about zero. id_means, ood_means: (n, C) float arrays."""
    plt = _pyplot()
    scale = float(max(np.abs(id_means).max(initial=0), np.abs(ood_means).max(initial=0))) or 1.0
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 2.4), sharey=False)
    for ax, means, label in zip(axes, (id_means, ood_means), (id_label, ood_label)):
        image = ax.imshow(means, aspect="auto", cmap="coolwarm", vmin=-scale, vmax=scale, interpolation="nearest")
        ax.set_title(label, fontsize=7)
        ax.set_xlabel("channel", fontsize=6)
        ax.set_ylabel("image", fontsize=6)
        ax.tick_params(labelsize=5)
    fig.colorbar(image, ax=axes, fraction=0.03).ax.tick_params(labelsize=5)
    fig.suptitle(f"channel-wise means of the {objective} gradient", fontsize=8, y=0.995)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def heat_colors(values):
    """(H, W, 3) uint8 colours of ``values`` (H, W) in [0, 1] on the ``inferno`` colour map."""
    _pyplot()
    import matplotlib
    return (255 * matplotlib.colormaps["inferno"](np.clip(values, 0, 1))[..., :3]).astype(np.uint8)
