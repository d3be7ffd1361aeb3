"""Evaluation of an ID test cache against OOD caches: every score of a request through the
engine's two functions (``Engine.score_sets``, ``metric_summary``), then, on request,
bootstrap intervals and paired comparisons. Library code: raises, never prints.
"""
import os

import numpy as np
from tqdm import tqdm

from gradood.store.benchmarks import groups_of
from gradood.store.schema import CacheError

from .engine import Engine, check_overlap, full_spectrum, metric_summary
from .registry import ScoreCrash, ScoreError, entry
from .request import check_ood_sets
from .results import Evaluation
from .uncertainty import RESAMPLES, delong, interval, resampled_metrics


def _hits(reader, labels, pred, keep):
    """``(correct, labelled)``: top-1 hits ``pred`` against ``labels`` (both (N,) int) and
    the number of labelled, usable rows of the open cache of an ID set (``reader``)."""
    k = int(reader.attrs["num_classes"])
    beyond = np.unique(labels[(labels >= k) & keep])
    if len(beyond):
        raise ValueError(f"the ID cache {reader.path} has labels {', '.join(map(str, beyond[:5]))}"
                         f"{' ...' if len(beyond) > 5 else ''}, which its {k}-class head cannot produce (an "
                         f"ID set's labels are the head's classes, 0..{k - 1}): its folder holds more class "
                         "folders than the head has classes; re-extract it with the right --num-classes or "
                         "from a folder with exactly the head's classes")
    labelled = (labels >= 0) & keep
    return int((pred[labelled] == labels[labelled]).sum()), int(labelled.sum())


def _settings(out, names, params, id_attrs):
    """Fill ``out.settings``: the settings that differ from each score's defaults."""
    for name in names:
        e = entry(name)
        resolved = e.resolve(params.get(name))
        shown = {k: v for k, v in resolved.items() if v != e.params[k]}
        text = e.describe(resolved, id_attrs) if e.describe else ""
        if shown and not e.describe:
            text = ", ".join(f"{k}={v}" for k, v in shown.items())
        if text:
            out.settings[name] = text


def _describe_sets(out, engine, datasets):
    """Fill the per-set facts of ``out``: paths, skipped rows and why, partial caches, the
    classifier's accuracy on the ID test set and each csid set. Returns ``{dataset: usable
    (N,) bool}``."""
    keep = {}
    for dataset in datasets:
        reader = engine.reader(dataset)
        keep[dataset] = engine.usable(dataset)
        skipped = ~keep[dataset]
        paths = reader.read_all("paths")
        reasons = reader.read_all("skip_reasons") if skipped.any() and reader.has("skip_reasons") else None
        out.paths[dataset] = paths
        out.skipped[dataset] = int(skipped.sum())
        out.n_rows[dataset] = int(len(skipped))
        out.skip_reasons[dataset] = {str(p): (str(reasons[i]) if reasons is not None else "unreadable")
                                     for i, p in enumerate(paths) if skipped[i]}
        if reader.partial:
            out.partial.append(dataset)
        if dataset == out.id or dataset in out.csid:
            pred = np.concatenate([reader.read("logits", a, b).argmax(axis=1) for a, b in reader.blocks()])
            out.hits[dataset] = _hits(reader, reader.read_all("labels"), pred, keep[dataset])
            if dataset in out.csid and not out.hits[dataset][1]:
                raise ScoreError(f"--csid {dataset}: {reader.path} has no labelled row; a covariate-shifted ID set "
                                 "holds images of the ID classes with their labels (OpenOOD's csid lists)")
    out.id_accuracy = out.accuracy.get(out.id)
    return keep


def run_evaluation(cache_dir, id_name, ood_names, names, convention="sklearn", allow_partial=False,
                   params=None, fit_on=None, fitted_dir=None, lenient=False, allow_overlap=False,
                   progress=False, ci=None, resamples=None, seed=0, compare=(), compare_level=95, csid=()):
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

    csid: covariate-shifted ID sets (labelled images of the ID classes). They are scored,
    their accuracy is in ``accuracy``, and ``fsood`` holds the full-spectrum evaluation
    (``full_spectrum``): the same scores, metrics, intervals and comparisons with the ID
    side widened to the ID test set followed by every csid set (OpenOOD v1.5's
    ``eval_ood(fsood=True)``); its ``id_accuracy`` is the accuracy over all those rows,
    OpenOOD's ``csid_acc``. The standard results never include them.
    """
    params = params or {}
    compare = [tuple(p) for p in compare or ()]
    for pair in compare:
        if len(pair) != 2 or pair[0] == pair[1] or any(n not in names for n in pair):
            raise ScoreError(f"compare {','.join(pair)}: name two different scores of this evaluation "
                             f"({', '.join(names)})")
    ood_names, csid = list(ood_names), list(csid)
    check_ood_sets(id_name, ood_names, csid)
    datasets = [id_name, *csid, *ood_names]
    with Engine(cache_dir, id_name, fit_on, fitted_dir, allow_partial) as engine:
        out = Evaluation(id=id_name, ood=ood_names, convention=convention, csid=csid,
                         fit_caches=engine.fit_caches(names, params), cache_dir=cache_dir)
        id_attrs = engine.reader(id_name).attrs          # a strict open: refuses an unfinished ID cache
        if not allow_overlap:
            evaluated = [engine.path(d) for d in datasets]
            for fit in out.fit_caches:
                if os.path.exists(engine.path(fit)):
                    check_overlap(engine.path(fit), evaluated, allow_partial)
        _settings(out, names, params, id_attrs)
        keep = _describe_sets(out, engine, datasets)
        groups = groups_of(id_attrs) or {}
        groups = {g: [d for d in sets if d in ood_names] for g, sets in groups.items()}
        out.groups = groups if any(groups.values()) else None
        scored = {}
        with tqdm(total=len(names) * len(datasets), desc="analyze", unit="score", disable=not progress,
                  dynamic_ncols=True) as bar:
            for name in names:
                try:
                    scored[name] = engine.score_sets(name, params.get(name), datasets)
                except (CacheError, ScoreError) as err:
                    if not lenient or isinstance(err, ScoreCrash):
                        raise
                    out.failed[name] = str(err)
                bar.update(len(datasets))
    names = [n for n in names if n in scored]
    for name in out.failed:
        out.settings.pop(name, None)
    if not names:
        raise ScoreError("no score could be computed: " + "; ".join(f"{n}: {r}" for n, r in out.failed.items()))
    for dataset in datasets:
        out.scores[dataset] = {n: scored[n][dataset].values for n in names}
    for name in names:
        out.results[name] = metric_summary(scored[name], id_name, ood_names, convention, out.groups)
    for pair in compare:
        missing_pair = [n for n in pair if n not in names]
        if missing_pair:
            raise ScoreError(f"compare {','.join(pair)}: {missing_pair[0]} could not be computed: "
                             f"{out.failed.get(missing_pair[0], 'left out')}")
    if ci or compare:
        _add_uncertainty(out, names, keep, float(ci or compare_level), resamples, seed, compare, bool(ci))
    if csid:
        out.fsood = _full_spectrum(out, scored, keep, names, convention)
        if ci or compare:
            fs_keep = {out.fsood.id: np.concatenate([keep[d] for d in [id_name, *csid]]),
                       **{d: keep[d] for d in ood_names}}
            _add_uncertainty(out.fsood, names, fs_keep, float(ci or compare_level), resamples, seed, compare,
                             bool(ci))
    out.notes += [f"{name} left out: {why}" for name, why in out.failed.items()]
    return out


def _full_spectrum(out, scored, keep, names, convention):
    """The FS-OOD ``Evaluation`` of ``out`` (``run_evaluation``'s csid): ID = the ID test set
    followed by each csid set, rows concatenated (``engine.full_spectrum``)."""
    sides = [out.id, *out.csid]
    fs = Evaluation(id="", ood=out.ood, convention=convention, csid=out.csid, full_spectrum=True,
                    fit_caches=out.fit_caches, settings=out.settings, groups=out.groups, partial=out.partial,
                    failed=out.failed, hits=out.hits, cache_dir=out.cache_dir)
    for name in names:
        widened, key = full_spectrum(scored[name], out.id, out.csid)
        fs.results[name] = metric_summary(widened, key, out.ood, convention, out.groups)
    fs.id = key
    for d in out.ood:
        fs.scores[d], fs.paths[d] = out.scores[d], out.paths[d]
        fs.n_rows[d], fs.skipped[d], fs.skip_reasons[d] = out.n_rows[d], out.skipped[d], out.skip_reasons[d]
    fs.scores[key] = {n: np.concatenate([out.scores[d][n] for d in sides]) for n in names}
    fs.paths[key] = np.concatenate([out.paths[d] for d in sides])
    fs.n_rows[key] = sum(out.n_rows[d] for d in sides)
    fs.skipped[key] = sum(out.skipped[d] for d in sides)
    fs.skip_reasons[key] = {p: r for d in sides for p, r in out.skip_reasons[d].items()}
    correct, labelled = (sum(out.hits[d][i] for d in sides) for i in (0, 1))
    fs.id_accuracy = correct / labelled if labelled else None
    return fs


def _add_uncertainty(out, names, keep, level, resamples, seed, compare, intervals):
    """Fill ``out.intervals`` and ``out.comparisons`` (``run_evaluation``)."""
    resamples = int(resamples or RESAMPLES)
    id_name, ood_names = out.id, out.ood

    def usable(dataset, name):
        return out.scores[dataset][name][keep[dataset]]

    def summarise(per_set):
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
