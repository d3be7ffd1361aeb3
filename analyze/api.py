"""The public Python API of the analysis stage (torch-free).

    import analyze
    with analyze.open_cache("caches/demo-resnet18/digits.h5") as c:   # c.attrs, c.n_samples
        ...
    s = analyze.score("caches/demo-resnet18", "digits", "gaia_z")       # (N,) float64
    s = analyze.score(cache_dir, "noise", "knn", fit_on="digits_train", k=10)
    df = analyze.evaluate("caches/demo-resnet18", id="digits", scores=["gaia_z", "msp"])

Scores are oriented higher = more in-distribution; rows are in dataset order and include
skipped (unreadable) images, whose ``skipped`` flag is in the cache.
"""
import os

from store.benchmarks import is_fitting_or_validation, preset_params
from store.reader import CacheReader, cache_path

from .evaluation import FitStore, check_compatible, fit_caches, run_evaluation, score_cache
from .metrics import METRICS
from .registry import ScoreError, entry


def open_cache(path, allow_partial=False):
    """Open a cache file read-only: a context manager with ``attrs`` (decoded root
    attributes), ``n_samples``, ``read(name, start, stop)`` and ``read_all(name)``.

    allow_partial: read the finished rows of an unfinished extraction.
    """
    return CacheReader(path, allow_partial=allow_partial)


def _fit_cache(cache_dir, name, id_hint, fit_on, params):
    e = entry(name)
    if e.fit_on == "validation":
        source = params.get("validation") or id_hint
        if not source:
            raise ScoreError(f"{name} is fitted on a validation cache: pass validation=NAME")
        return source
    if fit_on:
        return fit_on
    trains = sorted(f[:-3] for f in os.listdir(cache_dir) if f.endswith("_train.h5"))
    if len(trains) != 1:
        raise ScoreError(f"{name} is fitted on an ID training cache: pass fit_on=NAME (found "
                         f"{', '.join(trains) or 'no <id>_train.h5'} in {cache_dir})")
    return trains[0]


def score(cache_dir, dataset, name, fit_on=None, allow_partial=False, fitted_dir=None, **params):
    """Scores of every row of ``cache_dir/<dataset>.h5``: float64 ndarray (N,), higher =
    more in-distribution.

    name: a registered score (built in or from a plugin). params: its parameters, e.g.
    ``k=10`` (defaults: the entry's, then the benchmark preset's recorded in the cache).
    fit_on: the cache a training-fitted score is fitted on (default: the only
    ``*_train.h5`` in the folder). fitted_dir: keep fitted attributes there and reuse them.
    """
    e = entry(name)
    path = cache_path(cache_dir, dataset)
    with CacheReader(path, allow_partial=allow_partial) as reader:
        params = preset_params(reader.attrs, {name: params})[name]
        estimator = e.make(params)
        if e.fitted:
            source = _fit_cache(cache_dir, name, dataset if e.fit_on == "validation" else None, fit_on, params)
            with CacheReader(cache_path(cache_dir, source)) as fit_reader:
                check_compatible(name, params, fit_reader.attrs, fit_reader.path, reader.attrs, path)
                estimator = FitStore(fitted_dir).get(fit_reader, name, params)
        return score_cache(reader, name, estimator, params)


def evaluate(cache_dir, id, scores, ood=None, convention="sklearn", fit_on=None, params=None,
             allow_partial=False, fitted_dir=None, allow_overlap=False, ci=None, resamples=1000, seed=0):
    """Metrics of ``scores`` with ``id`` as the in-distribution test cache, as a
    ``pandas.DataFrame``: one row per (score, OOD set) and one "Average" row per score,
    columns ``score, ood, FPR95, AUROC, AUPR_IN, AUPR_OUT, DetErr`` (fractions in [0, 1], in
    the named ``convention``: "sklearn" or "gaia", ID positive, or "openood", OOD positive);
    with a grouped benchmark, also "nearood" and "farood" rows.

    ood: OOD cache names (default: every other cache in the folder except training and
    fitting caches). params: ``{score: {parameter: value}}``. fit_on: the training cache
    of the training-fitted scores (default ``<id>_train``). allow_overlap: accept a fitting
    cache that shares images with an evaluated one (refused by default). ci: a level in
    percent (``analyze --ci``): columns ``FPR95_low, FPR95_high, AUROC_low, AUROC_high``
    hold bootstrap intervals (``resamples`` resamples, ``seed``).
    """
    import pandas as pd
    ev = _evaluation(cache_dir, id, scores, ood, convention, fit_on, params, allow_partial, fitted_dir,
                     allow_overlap, ci=ci, resamples=resamples, seed=seed)
    rows = []
    for name, per_set in ev["results"].items():
        for dataset, metrics in per_set.items():
            row = {"score": name, "ood": dataset, **{_column(m): v for m, v in metrics.items()}}
            for m, (lo, hi) in (ev.get("intervals", {}).get(name, {}).get(dataset, {})).items():
                row[f"{m}_low"], row[f"{m}_high"] = lo, hi
            rows.append(row)
    columns = ["score", "ood", *[_column(m) for m in METRICS]]
    if ci:
        columns += ["FPR95_low", "FPR95_high", "AUROC_low", "AUROC_high"]
    return pd.DataFrame(rows, columns=columns)


def compare(cache_dir, id, a, b, ood=None, convention="sklearn", fit_on=None, params=None, level=95,
            resamples=1000, seed=0, allow_partial=False, fitted_dir=None, allow_overlap=False):
    """Paired comparison of scores ``a`` and ``b`` on the same samples (``analyze
    --compare A,B``), as a ``pandas.DataFrame``: one row per OOD set (and "Average",
    group means), columns ``ood, AUROC_diff, AUROC_low, AUROC_high, delong_p, FPR95_diff,
    FPR95_low, FPR95_high`` (fractions; differences a - b; intervals at ``level`` % from
    ``resamples`` paired bootstrap resamples; DeLong's two-sided p for the AUROC
    difference, per set only). Other arguments as ``evaluate``."""
    import pandas as pd
    from .registry import canonical
    pair = (canonical(a), canonical(b))
    ev = _evaluation(cache_dir, id, list(pair), ood, convention, fit_on, params, allow_partial, fitted_dir,
                     allow_overlap, resamples=resamples, seed=seed, compare=[pair], compare_level=level)
    rows = []
    for dataset, row in ev["comparisons"][",".join(pair)].items():
        rows.append({"ood": dataset, "AUROC_diff": row["difference"]["AUROC"], "AUROC_low": row["AUROC"][0],
                     "AUROC_high": row["AUROC"][1], "delong_p": row.get("delong_p", float("nan")),
                     "FPR95_diff": row["difference"]["FPR95"], "FPR95_low": row["FPR95"][0],
                     "FPR95_high": row["FPR95"][1]})
    return pd.DataFrame(rows)


def _evaluation(cache_dir, id, scores, ood, convention, fit_on, params, allow_partial, fitted_dir,
                allow_overlap, ci=None, resamples=1000, seed=0, compare=(), compare_level=95):
    """``run_evaluation`` with the API's defaults: presets' parameters, OOD sets found."""
    scores = [scores] if isinstance(scores, str) else list(scores)
    params = {s: dict(p) for s, p in (params or {}).items()}
    with CacheReader(cache_path(cache_dir, id), allow_partial=allow_partial) as reader:
        params = preset_params(reader.attrs, params)
    if ood is None:
        ood = default_ood_sets(cache_dir, id, fit_caches(id, scores, fit_on, params))
    return run_evaluation(cache_dir, id, list(ood), scores, convention, allow_partial, params, fit_on, fitted_dir,
                          allow_overlap=allow_overlap, ci=ci, resamples=resamples, seed=seed,
                          compare=compare, compare_level=compare_level)


def _column(metric):
    return {"AUPR-In": "AUPR_IN", "AUPR-Out": "AUPR_OUT"}.get(metric, metric)


def default_ood_sets(cache_dir, id_name, exclude=()):
    """Every cache in ``cache_dir`` other than the ID cache, ``*_train`` and ``*_val``
    caches and ``exclude`` (fitting and validation caches), sorted by name. Unfinished
    extractions (a ``<name>.h5.parts`` folder only) are listed too: reading them then
    refuses, or, with ``allow_partial``, reads their finished rows and marks them, so a set
    never drops out of a table unseen."""
    if not os.path.isdir(cache_dir):
        raise ScoreError(f"cache folder {cache_dir} does not exist")
    files = os.listdir(cache_dir)
    present = sorted({f[:-3] for f in files if f.endswith(".h5")}
                     | {f[:-len(".h5.parts")] for f in files if f.endswith(".h5.parts")})
    return [n for n in present if n != id_name and not is_fitting_or_validation(n) and n not in exclude]


def evaluate_checkpoints(cache_dirs, id, scores, ood=None, convention="sklearn", fit_on=None, params=None,
                         fitted_dir=None, allow_overlap=False, ensemble=True):
    """``analyze --checkpoint-dirs``: metrics of ``scores`` over several checkpoints' cache
    folders (the same sets and images in each), as a ``pandas.DataFrame`` with one row per
    (score, OOD set) and columns ``score, ood, <metric>_mean, <metric>_std`` (fractions;
    std over checkpoints, ddof 0); the deep ensemble is the score "ensemble". ood: default
    the OOD sets of the first folder. fitted_dir: fits go to ``fitted_dir/<folder name>``."""
    import pandas as pd
    from .checkpoints import evaluate_checkpoints as run
    scores = [scores] if isinstance(scores, str) else list(scores)
    params = {s: dict(p) for s, p in (params or {}).items()}
    with CacheReader(cache_path(cache_dirs[0], id)) as reader:
        params = preset_params(reader.attrs, params)
    if ood is None:
        ood = default_ood_sets(cache_dirs[0], id, fit_caches(id, scores, fit_on, params))
    ce = run(list(cache_dirs), id, list(ood), scores, convention, params, fit_on, fitted_dir,
             allow_overlap=allow_overlap, ensemble=ensemble)
    rows = []
    for name, per_set in ce["results"].items():
        for dataset, metrics in per_set.items():
            row = {"score": name, "ood": dataset}
            for m, cell in metrics.items():
                row[f"{_column(m)}_mean"], row[f"{_column(m)}_std"] = cell["mean"], cell["std"]
            rows.append(row)
    return pd.DataFrame(rows)
