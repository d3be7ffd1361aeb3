"""One benchmark over several trained checkpoints (OpenOOD's ``s0/s1/s2``): the same
scores on each checkpoint's caches, reported as mean ± std per cell, and a deep ensemble
of the checkpoints.

Each checkpoint has its own cache folder holding the same sets (ID test, OOD sets, the
training cache) of the same images in the same order; they must come from different
weights. Every checkpoint is evaluated by ``run_evaluation`` alone (its fits kept apart in
``fitted_root/<folder name>``), then each metric is averaged over the checkpoints; the
spread is the standard deviation over checkpoints with ddof 0 (numpy's ``np.std``
default; the sample std, ddof 1, is sqrt(N / (N - 1)) times larger: 1.22x for three).

The deep ensemble (Lakshminarayanan et al., NeurIPS 2017) is the maximum of the members'
mean softmax, computed from each cache's logits row by row; it is reported as one more
row, "Deep ensemble", next to the scores.
"""
import os

import numpy as np

from gradood.store.reader import CacheReader, cache_path
from gradood.store.schema import CacheError

from .engine import Scored, metric_summary
from .evaluator import run_evaluation
from .logits import log_softmax
from .metrics import METRICS
from .results import ENSEMBLE, CheckpointsEvaluation


def check_members(cache_dirs, datasets):
    """Raise CacheError unless the folders hold every one of ``datasets`` with the same
    images (paths) in the same order, from models with the same classes and pairwise
    different weights."""
    if len(cache_dirs) < 2:
        raise CacheError(f"several checkpoints need at least two cache folders, got {len(cache_dirs)}")
    twice = [d for i, d in enumerate(cache_dirs) if d in cache_dirs[:i]]
    if twice:
        raise CacheError(f"{twice[0]} is given twice; give one folder per trained checkpoint")
    weights = {}
    for dataset in datasets:
        first = None
        for folder in cache_dirs:
            path = cache_path(folder, dataset)
            if not os.path.exists(path):
                raise CacheError(f"{path} is missing: every checkpoint's folder must hold the same sets "
                                 f"({', '.join(datasets)}); extract it with that checkpoint")
            with CacheReader(path) as r:
                paths = r.read_all("paths")
                weights.setdefault(folder, r.attrs.get("weights_sha256") or r.attrs["checkpoint_sha256"])
                classes = int(r.attrs["num_classes"])
            if first is None:
                first = (path, paths, classes)
            elif classes != first[2]:
                raise CacheError(f"{path} comes from a {classes}-class model and {first[0]} from a {first[2]}-class "
                                 "one; the checkpoints averaged here must share one head (the same classes): "
                                 "give the folders of one benchmark's checkpoints")
            elif len(paths) != len(first[1]) or (paths != first[1]).any():
                raise CacheError(f"{path} and {first[0]} hold different images (or another order); the "
                                 "checkpoints of one benchmark are compared on the same samples: extract "
                                 "each set with the same --limit and data root")
    seen = {}
    for folder, w in weights.items():
        if w in seen:
            raise CacheError(f"{folder} and {seen[w]} were extracted with the same weights ({w[:12]}...); "
                             "give one folder per trained checkpoint")
        seen[w] = folder


def ensemble_scores(cache_dirs, dataset):
    """(n,) float64 max of the mean softmax over the checkpoints' logits of ``dataset``,
    and the (n,) bool usable rows (not skipped in any member)."""
    probs, keep = None, None
    for folder in cache_dirs:
        with CacheReader(cache_path(folder, dataset)) as r:
            p = np.concatenate([np.exp(log_softmax(r.read("logits", a, b).astype(np.float64)))
                                for a, b in r.blocks()])
            k = ~r.read_all("skipped").astype(bool)
        probs = p if probs is None else probs + p
        keep = k if keep is None else keep & k
    return (probs / len(cache_dirs)).max(axis=1), keep


def evaluate_checkpoints(cache_dirs, id_name, ood_names, names, convention="sklearn", params=None,
                         fit_on=None, fitted_root=None, lenient=False, allow_overlap=False, ensemble=True):
    """Mean ± std of every metric over the checkpoints whose caches are in ``cache_dirs``.

    Returns an ``analyze.results.CheckpointsEvaluation``; with ``ensemble`` its results
    also hold ``"ensemble"`` (the deep ensemble, one value per metric: "std" 0, "values" one).
    A score left out on any checkpoint (``lenient``) is left out of all.
    """
    cache_dirs = [os.path.normpath(d) for d in cache_dirs]
    check_members(cache_dirs, [id_name, *ood_names])
    runs = []
    for folder in cache_dirs:
        fitted = os.path.join(fitted_root, os.path.basename(folder)) if fitted_root else None
        runs.append(run_evaluation(folder, id_name, ood_names, names, convention, params=params, fit_on=fit_on,
                                   fitted_dir=fitted, lenient=lenient, allow_overlap=allow_overlap))
    failed = {}
    for run in runs:
        failed.update(run.failed)
    kept = [n for n in names if n not in failed and all(n in run.results for run in runs)]
    results = {}
    for name in kept:
        rows = {}
        for dataset in runs[0].results[name]:
            rows[dataset] = {}
            for m in METRICS:
                values = [run.results[name][dataset][m] for run in runs]
                rows[dataset][m] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}
        results[name] = rows
    if ensemble:
        scored = {d: Scored(*ensemble_scores(cache_dirs, d)) for d in [id_name, *ood_names]}
        summary = metric_summary(scored, id_name, list(ood_names), convention)
        results[ENSEMBLE] = {d: {m: {"mean": v, "std": 0.0, "values": [v]} for m, v in row.items()}
                             for d, row in summary.items()}
    return CheckpointsEvaluation(runs=runs, cache_dirs=cache_dirs, id=id_name, ood=list(ood_names),
                                 convention=convention, results=results, failed=failed)
