"""Evaluation of an ID test cache against OOD caches: every score of a request through the
analysis engine (``analyze.engine``), then the metrics, the group means and, on request,
bootstrap intervals and paired comparisons. Library code: raises, never prints.
"""
import os

import numpy as np

from gradood.store.benchmarks import groups_of
from gradood.store.reader import CacheReader
from gradood.store.schema import CacheError

from .engine import Engine
from .fitting import check_compatible
from .metrics import METRICS, ood_metrics
from .registry import ScoreCrash, ScoreError, entry


def check_not_constant(name, values, params=None):
    """Raise ScoreError when score ``name`` gives one value to every row of every cache in
    ``values`` ({dataset: (n,) usable scores}): its metrics would be those of a coin toss
    (AUROC 50), not a measurement."""
    rows = [v for v in values.values() if len(v)]
    if not rows:
        return
    low = min(float(np.min(v)) for v in rows)
    if all(float(np.max(v)) == low for v in rows):
        raise ScoreError(f"{name} gives every ID and OOD row the same value ({low:g}) with parameters "
                         f"{params or 'the defaults'}: its metrics would be a coin toss (AUROC 50), "
                         "not a result. Check the parameters (e.g. energy.temperature, neco.dim, nac.O, "
                         "react.percentile) and the size of the fitting cache")


def _accuracy(reader, keep):
    """Top-1 accuracy of the classifier on the labelled, usable rows of an open cache (None
    when no row is labelled)."""
    labels = reader.read_all("labels")
    pred = np.concatenate([reader.read("logits", a, b).argmax(axis=1) for a, b in reader.blocks()])
    k = int(reader.attrs["num_classes"])
    labelled = (labels >= 0) & (labels < k) & keep      # labels the head can have
    return float((pred[labelled] == labels[labelled]).mean()) if labelled.any() else None


def _images(reader):
    """The image identities of a cache: content hashes where recorded, else the paths of
    real files (``mem:`` and ``<set>:<index>`` rows of array datasets have none)."""
    if reader.has("content_hash"):
        return set(reader.read_all("content_hash"))
    return {p for p in reader.read_all("paths") if os.sep in p and not p.startswith("mem:")}


def check_overlap(fit_path, eval_paths, allow_partial=False):
    """Raise CacheError when the fitting cache at ``fit_path`` shares images with one of
    the evaluated caches (``eval_paths``): a score fitted on its own test images. Images
    are compared by content hash (schema v3), or by file path for older caches."""
    with CacheReader(fit_path, allow_partial=True) as fit:
        fit_images = _images(fit)
    for path in eval_paths:
        if path == fit_path:
            continue
        with CacheReader(path, allow_partial=allow_partial) as reader:
            shared = fit_images & _images(reader)
        if shared:
            raise CacheError(f"the fitting cache {fit_path} shares {len(shared)} image(s) with the "
                             f"evaluated cache {path}: the scores would be fitted on the images they "
                             "are tested on. Extract the training cache from other images (the "
                             "training split), or pass --allow-overlap (API: allow_overlap=True) "
                             "to accept it")


def run_evaluation(cache_dir, id_name, ood_names, names, convention="sklearn", allow_partial=False,
                   params=None, fit_on=None, fitted_dir=None, lenient=False, allow_overlap=False,
                   progress=False, ci=None, resamples=None, seed=0, compare=(), compare_level=95):
    """An ``analyze.results.Evaluation`` of the scores ``names`` for the ID cache
    ``id_name`` against each OOD cache of ``ood_names`` in ``cache_dir``.

    params: ``{score: {parameter: value}}``. fit_on, fitted_dir: as ``analyze.engine.Engine``
    (the fitting-cache rule is the engine's). lenient: a score that cannot be fitted or
    computed on these caches is left out (reason in ``failed``) instead of raising, as
    ``--score all`` wants; a crash (``ScoreCrash``) always stops the run. allow_overlap:
    accept fitting caches that share images with the evaluated ones (``check_overlap``;
    refused by default). progress: a progress bar (stderr) over the (cache, score) pairs.
    With groups (the benchmark preset's near and far OOD sets), each score's results also
    hold "nearood" and "farood": the unweighted means over the group, as OpenOOD reports
    them. Skipped (unreadable) images are left out of the metrics.

    ci: a confidence level in percent (e.g. 95): ``intervals`` gains, per score and set
    (and Average / nearood / farood), bootstrap intervals of AUROC and FPR95
    (``analyze.uncertainty``; ``resamples`` resamples, default 1,000, ``seed``). compare:
    ``[(a, b)]`` pairs of scores: ``comparisons`` gains, per pair and set, the paired
    differences a - b of AUROC and FPR95 with their intervals (at ``ci``, else
    ``compare_level``) and DeLong's p-value of the AUROC difference.
    """
    from .results import Evaluation
    params = params or {}
    compare = [tuple(p) for p in compare or ()]
    for pair in compare:
        if len(pair) != 2 or pair[0] == pair[1] or any(n not in names for n in pair):
            raise ScoreError(f"compare {','.join(pair)}: name two different scores of this evaluation "
                             f"({', '.join(names)})")
    ood_names = list(ood_names)
    check_ood_sets(id_name, ood_names)
    engine = Engine(cache_dir, id_name, fit_on, fitted_dir, allow_partial)
    out = Evaluation(id=id_name, ood=ood_names, convention=convention, fit_caches=engine.fit_caches(names, params))
    id_path = engine.path(id_name)
    with CacheReader(id_path, allow_partial=allow_partial) as reader:
        id_attrs = reader.attrs
    if not allow_overlap:
        evaluated = [engine.path(d) for d in [id_name, *ood_names]]
        for fit in out.fit_caches:
            if os.path.exists(engine.path(fit)):
                check_overlap(engine.path(fit), evaluated, allow_partial)
    for name in names:
        e = entry(name)
        resolved = e.resolve(params.get(name))
        shown = {k: v for k, v in resolved.items() if v != e.params[k]}
        text = e.describe(resolved, id_attrs) if e.describe else ""
        if shown and not e.describe:
            text = ", ".join(f"{k}={v}" for k, v in shown.items())
        if text:
            out.settings[name] = text

    def leave_out(name, err):
        if not lenient or isinstance(err, ScoreCrash):
            raise err
        out.failed[name] = str(err)

    estimators = {}
    for name in names:
        try:
            estimators[name] = engine.estimator(name, params.get(name))
        except (CacheError, ScoreError) as err:
            leave_out(name, err)
    names = [n for n in names if n not in out.failed]
    keep = {}
    from tqdm import tqdm
    bar = tqdm(total=len(names) * (1 + len(ood_names)), desc="analyze", unit="score", disable=not progress,
               dynamic_ncols=True)
    try:
        for dataset in [id_name, *ood_names]:
            path = engine.path(dataset)
            with CacheReader(path, allow_partial=allow_partial) as reader:
                for name in names:
                    if dataset != id_name:
                        check_compatible(name, params.get(name), id_attrs, id_path, reader.attrs, path)
                skipped = reader.read_all("skipped").astype(bool)
                if len(skipped) and skipped.all():
                    raise CacheError(f"{path}: all {len(skipped)} rows of set {dataset!r} were skipped (unreadable "
                                     "images): nothing to score; see `pipeline.py inspect` and re-extract it")
                paths = reader.read_all("paths")
                reasons = reader.read_all("skip_reasons") if skipped.any() and reader.has("skip_reasons") else None
                values = {}
                for name in names:
                    if name not in out.failed:
                        try:
                            values[name], _ = engine.values(reader, name, params.get(name), estimators[name])
                        except (CacheError, ScoreError) as err:
                            leave_out(name, err)
                    bar.update(1)
                out.scores[dataset] = values
                out.paths[dataset] = paths
                out.skipped[dataset] = int(skipped.sum())
                out.n_rows[dataset] = int(len(skipped))
                out.skip_reasons[dataset] = {str(p): (str(reasons[i]) if reasons is not None else "unreadable")
                                             for i, p in enumerate(paths) if skipped[i]}
                if reader.partial:
                    out.partial.append(dataset)
                keep[dataset] = ~skipped
                if dataset == id_name:
                    out.id_accuracy = _accuracy(reader, keep[dataset])
    finally:
        bar.close()
    for name in names:
        if name in out.failed:
            continue
        try:
            check_not_constant(name, {d: v[name][keep[d]] for d, v in out.scores.items() if name in v},
                               params.get(name))
        except ScoreError as err:
            leave_out(name, err)
    groups = groups_of(id_attrs) or {}
    groups = {g: [d for d in sets if d in ood_names] for g, sets in groups.items()}
    out.groups = groups if any(groups.values()) else None
    names = [n for n in names if n not in out.failed]
    for dataset in out.scores:
        out.scores[dataset] = {n: v for n, v in out.scores[dataset].items() if n in names}
    for name in out.failed:
        out.settings.pop(name, None)
    if not names:
        raise ScoreError("no score could be computed: " + "; ".join(f"{n}: {r}" for n, r in out.failed.items()))
    for name in names:
        known = out.scores[id_name][name][keep[id_name]]
        rows = {d: ood_metrics(known, out.scores[d][name][keep[d]], convention) for d in ood_names}
        for g, sets in (out.groups or {}).items():
            if sets:
                rows[f"{g}ood"] = {m: float(np.mean([rows[d][m] for d in sets])) for m in METRICS}
        rows["Average"] = {m: float(np.mean([rows[d][m] for d in ood_names])) for m in METRICS}
        out.results[name] = rows
    for pair in compare:
        missing_pair = [n for n in pair if n not in names]
        if missing_pair:
            raise ScoreError(f"compare {','.join(pair)}: {missing_pair[0]} could not be computed: "
                             f"{out.failed.get(missing_pair[0], 'left out')}")
    if ci or compare:
        _add_uncertainty(out, names, keep, float(ci or compare_level), resamples, seed, compare, bool(ci))
    out.notes += [f"{name} left out: {why}" for name, why in out.failed.items()]
    return out


def check_ood_sets(id_name, ood_names):
    """Raise ValueError when there is no OOD set or the ID set is among them."""
    if id_name in ood_names:
        raise ValueError(f"OOD set {id_name!r} (--ood): that is the ID set (--id); an OOD set must be another cache")
    if not ood_names:
        raise ValueError("no OOD set to evaluate against")


def _add_uncertainty(out, names, keep, level, resamples, seed, compare, intervals):
    """Fill ``out.intervals`` and ``out.comparisons`` (``run_evaluation``)."""
    from .uncertainty import RESAMPLES, delong, interval, resampled_metrics
    resamples = int(resamples or RESAMPLES)
    id_name, ood_names = out.id, out.ood

    def usable(dataset, name):
        return out.scores[dataset][name][keep[dataset]]

    def summarise(per_set, point=None):
        """Intervals per set and over the Average / group means of the per-set draws."""
        rows = {d: {m: interval(v, level) for m, v in draws.items()} for d, draws in per_set.items()}
        spans = {"Average": ood_names, **{f"{g}ood": sets for g, sets in (out.groups or {}).items() if sets}}
        for label, sets in spans.items():
            rows[label] = {m: interval(np.mean([per_set[d][m] for d in sets], axis=0), level) for m in ("AUROC", "FPR95")}
        return rows

    out.ci = {"level": level, "resamples": resamples, "seed": seed}
    if intervals:
        for name in names:
            per_set = {d: resampled_metrics(usable(id_name, name), usable(d, name), resamples, seed, i + 1)
                       for i, d in enumerate(ood_names)}
            out.intervals[name] = summarise(per_set)
    for a, b in compare:
        per_set = {d: resampled_metrics(usable(id_name, a), usable(d, a), resamples, seed, i + 1,
                                        other=(usable(id_name, b), usable(d, b)))
                   for i, d in enumerate(ood_names)}
        rows = summarise(per_set)
        for d, row in rows.items():
            row["difference"] = {m: out.results[a][d][m] - out.results[b][d][m] for m in ("AUROC", "FPR95")}
            if d in ood_names:
                row["delong_p"] = delong(usable(id_name, a), usable(d, a), usable(id_name, b), usable(d, b))["p"]
        out.comparisons[f"{a},{b}"] = rows
