"""The public Python API of the analysis stage (torch-free), and the library functions the
command line calls: ``pipeline.py analyze`` builds an ``AnalysisRequest`` and runs
``evaluation`` (or ``checkpoint_evaluation``) on it, then prints and writes files
(``analyze.output``).

    from gradood import analyze
    with analyze.open_cache("caches/demo-resnet18/digits.h5") as c:   # c.attrs, c.n_samples
        ...
    s = analyze.score("caches/demo-resnet18", "digits", "gaia_z")       # (N,) float64
    s = analyze.score(cache_dir, "noise", "knn", id="digits", k=10)
    df = analyze.evaluate("caches/demo-resnet18", id="digits", scores=["gaia_z", "msp"])
    ev = analyze.evaluation(cache_dir="caches/demo-resnet18", id="digits")  # an Evaluation
    print(analyze.to_latex(ev))

Scores are oriented higher = more in-distribution; rows are in dataset order and include
skipped (unreadable) images, whose ``skipped`` flag is in the cache. Fitted scores are
fitted by the engine's rule (``analyze.engine``): ``fit_on``, else ``<id>_train``.
"""
import os

from gradood.store.benchmarks import benchmark as preset_of
from gradood.store.benchmarks import csid_of, is_fitting_or_validation, ood_sets, preset_params, val_cache_name
from gradood.store.reader import CacheReader, cache_path, default_cache_dir

from .checkpoints import evaluate_checkpoints as run_checkpoints
from .engine import Engine
from .evaluator import run_evaluation
from .registry import ScoreError, all_entries, canonical
from .request import AnalysisRequest, check_ood_sets, compare_pairs
from .results import column_name
from .tuning import tune


def open_cache(path, allow_partial=False):
    """Open a cache file read-only: a context manager with ``attrs`` (decoded root
    attributes), ``n_samples``, ``read(name, start, stop)`` and ``read_all(name)``.

    allow_partial: read the finished rows of an unfinished extraction.
    """
    return CacheReader(path, allow_partial=allow_partial)


def score(cache_dir, dataset, name, fit_on=None, allow_partial=False, fitted_dir=None, id=None, **params):
    """Scores of every row of ``cache_dir/<dataset>.h5``: float64 ndarray (N,), higher =
    more in-distribution.

    name: a registered score (built in or from a plugin). params: its parameters, e.g.
    ``k=10`` (defaults: the entry's, then the benchmark preset's recorded in the cache).
    id: the ID test set of the analysis (default: the preset's ID set recorded in the
    cache, else ``dataset``); a training-fitted score is fitted on ``fit_on``, else on
    ``<id>_train``; a validation-fitted one on its ``validation`` parameter, else ``id``.
    fitted_dir: keep fitted attributes there and reuse them. Refuses (ScoreError) a
    non-finite value on a usable row, naming it, and a score constant over the whole cache,
    as every analysis does (``analyze.engine``).
    """
    path = cache_path(cache_dir, dataset)
    with CacheReader(path, allow_partial=allow_partial) as reader:
        attrs = reader.attrs
    params = preset_params(attrs, {name: params})[name]
    if id is None:
        bench = attrs.get("benchmark")
        id = preset_of(bench).id if bench else dataset
    with Engine(cache_dir, id, fit_on, fitted_dir, allow_partial) as engine:
        return engine.score_sets(name, params, [dataset], against=attrs)[dataset].values


def score_names(scores, every=None):
    """``(names, explicit)`` of ``scores`` (a name, or names, each possibly comma-separated;
    ``all`` = ``every``, default every registered score): canonical names in order, and
    those named explicitly.
    A score named explicitly must be computable (an error otherwise); one that comes with
    ``all`` is left out with a note when the caches cannot serve it."""
    scores = [scores] if isinstance(scores, str) else list(scores or ["all"])
    names, explicit = [], []
    for item in scores:
        for part in (p.strip() for p in item.split(",")):
            if part == "all":
                names += [n for n in (all_entries() if every is None else every) if n not in names]
            elif part:
                part = canonical(part)
                explicit += [part] if part not in explicit else []
                names += [part] if part not in names else []
    return names, explicit


def resolve_caches(cache_dir=None, id=None, ood=None, benchmark=None, arch=None, exclude=()):
    """``(cache_dir, id, ood)`` of an analysis: the preset's folder and ID set where not
    given; the OOD sets default to every other cache in the folder (``default_ood_sets``)
    but the benchmark's covariate-shifted ID sets, in the preset's table order first.
    Raises ScoreError naming what is missing."""
    if benchmark:
        preset = preset_of(benchmark)
        cache_dir = cache_dir or default_cache_dir(benchmark, arch or preset.arch)
        id = id or preset.id
    if not cache_dir or not id:
        raise ScoreError("give a benchmark, or a cache folder and an ID set (--benchmark, or --cache-dir and --id)")
    check_cache_dir(cache_dir)
    ood = list(ood or [])
    if not ood:
        found = default_ood_sets(cache_dir, id, [*exclude, *_preset_csid(benchmark, cache_dir, id)])
        order = ood_sets(benchmark) if benchmark else []
        ood = [n for n in order if n in found] + [n for n in found if n not in order]
        if not ood:
            raise ScoreError(f"no OOD caches in {cache_dir}; extract some first (pipeline.py extract)")
    check_ood_sets(id, ood)
    return cache_dir, id, ood


def check_cache_dir(cache_dir):
    """Raise ScoreError unless ``cache_dir`` is a folder (naming a file given instead)."""
    if os.path.isfile(cache_dir):
        raise ScoreError(f"--cache-dir {cache_dir} is a file, not a folder of caches: give the folder "
                         f"that holds the .h5 files ({os.path.dirname(cache_dir) or '.'}?)")
    if not os.path.isdir(cache_dir):
        raise ScoreError(f"cache folder {cache_dir} does not exist; extract first (pipeline.py extract)")


def default_ood_sets(cache_dir, id_name, exclude=()):
    """Every cache in ``cache_dir`` other than the ID cache, ``*_train`` and ``*_val``
    caches and ``exclude`` (fitting and validation caches), sorted by name. Unfinished
    extractions (a ``<name>.h5.parts`` folder only) are listed too: reading them then
    refuses, or, with ``allow_partial``, reads their finished rows and marks them, so a set
    never drops out of a table unseen."""
    check_cache_dir(cache_dir)
    files = os.listdir(cache_dir)
    present = sorted({f[:-3] for f in files if f.endswith(".h5")}
                     | {f[:-len(".h5.parts")] for f in files if f.endswith(".h5.parts")})
    return [n for n in present if n != id_name and not is_fitting_or_validation(n) and n not in exclude]


def _check_same_sets(folders, id, exclude):
    """Raise ScoreError unless every checkpoint folder holds the same default OOD sets (a
    set missing from any folder, whichever its place in the list, is named)."""
    found = {folder: set(default_ood_sets(folder, id, exclude)) for folder in folders}
    every = set().union(*found.values())
    for folder, sets in found.items():
        lacking = sorted(every - sets)
        if lacking:
            held = next(f for f in folders if lacking[0] in found[f])
            raise ScoreError(f"{folder} holds no {lacking[0]}.h5, which {held} holds: every checkpoint's folder "
                             "must hold the same sets; extract it there, or choose the sets with --ood")


def _preset_csid(bench, cache_dir, id):
    """The covariate-shifted ID sets of the benchmark (``bench``, else the one the ID cache
    was extracted for), or ()."""
    if bench:
        return tuple(preset_of(bench).csid)
    path = cache_path(cache_dir, id) if cache_dir and id else ""
    if not os.path.exists(path):
        return ()
    with CacheReader(path, allow_partial=True) as reader:
        return csid_of(reader.attrs)


def _csid(given, shifted, cache_dir, id, ood):
    """The covariate-shifted ID sets of an analysis: ``given`` (``--csid``), each a cache of
    the folder; default the preset's (``shifted``) that the folder holds. A preset's csid
    set given as an OOD set is refused."""
    wrong = [n for n in ood if n in shifted]
    if wrong:
        raise ScoreError(f"{wrong[0]} is a covariate-shifted ID set of this benchmark (images of the ID classes, "
                         f"in-distribution in OpenOOD's full-spectrum setting), not an OOD set: give it with "
                         f"--csid {wrong[0]}, not --ood")
    if given is None:
        return tuple(n for n in shifted if os.path.exists(cache_path(cache_dir, n)))
    for name in given:
        if not os.path.exists(cache_path(cache_dir, name)):
            raise ScoreError(f"--csid {name}: {cache_path(cache_dir, name)} not found; extract it (with "
                             f"--benchmark, --dataset {name}, or --dataset {name}=DIR)")
    check_ood_sets(id, ood, given)
    return tuple(given)


def _prepared(request):
    """The parts every evaluation of ``request`` shares: ``(cache_dir, id, ood, names,
    explicit, params, pairs, notes, csid)`` with the presets' parameters merged, the
    covariate-shifted ID sets resolved (``_csid``) and the scores the caches cannot serve
    split off (an explicit one raises; the others come back as notes)."""
    pairs = compare_pairs(request.compare, canonical)
    names, explicit = score_names(request.scores)
    compared = []
    for pair in pairs:        # compared scores must be computed: refused, like explicit ones, when not servable
        names += [n for n in pair if n not in names]
        compared += [n for n in pair if n not in compared]
    params = {s: dict(p) for s, p in request.params.items()}
    folders = list(request.checkpoint_dirs) or ([request.cache_dir] if request.cache_dir else [])
    first = folders[0] if folders else None
    id = request.id or (preset_of(request.benchmark).id if request.benchmark else "")
    probe = Engine(first, id, request.fit_on)
    exclude = probe.fit_caches(names, params)
    cache_dir, id, ood = resolve_caches(first, request.id, request.ood, request.benchmark, request.arch,
                                        [*exclude, *(request.csid or ())])
    csid = _csid(request.csid, _preset_csid(request.benchmark, cache_dir, id), cache_dir, id, ood)
    if len(folders) > 1 and not request.ood:
        _check_same_sets(folders, id, exclude)
    with CacheReader(cache_path(cache_dir, id), allow_partial=True) as reader:
        params = preset_params(reader.attrs, params)
    notes, missing = [], {}
    for folder in folders or [cache_dir]:
        with Engine(folder, id, request.fit_on) as engine:
            names, reasons = engine.servable(names, params, [*csid, *ood])
        missing.update(reasons)
    bad = [s for s in dict.fromkeys([*explicit, *compared]) if s in missing]
    if bad:
        raise ScoreError("; ".join(f"{s}: {missing[s]}" + ("" if "extract with" in missing[s] else
                                                           f" (re-extract with --score {s})") for s in bad))
    notes += [f"{name} left out: {why}" for name, why in missing.items()]
    if not names:
        raise ScoreError("none of the requested scores can be computed from these caches"
                         + ("" if not missing else ": " + "; ".join(f"{n}: {r}" for n, r in missing.items())))
    return cache_dir, id, ood, names, explicit, params, pairs, notes, csid


def _as_request(request, options):
    """``request`` itself, or an ``AnalysisRequest`` of the keyword ``options``."""
    if request is None:
        return AnalysisRequest(**options)
    if options:
        raise TypeError("give an AnalysisRequest or keyword options, not both")
    if not isinstance(request, AnalysisRequest):
        raise TypeError(f"expected an AnalysisRequest, got {type(request).__name__} (use keywords: "
                        "evaluation(cache_dir=..., id=...))")
    return request


def evaluation(request=None, **options):
    """An ``analyze.results.Evaluation``: what ``pipeline.py analyze`` computes.

    request: an ``AnalysisRequest``, or its fields as keywords (``cache_dir``, ``id``,
    ``scores``, ``ood``, ...; the options of ``pipeline.py analyze``, with the same
    defaults and the same argument rules, ``analyze.request``).

    scores: names (comma-separated allowed) or ``"all"``; a score named explicitly must be
    computable, one that comes with ``all`` is left out with a note (``.notes``) when the
    caches cannot serve it. ood: default every other cache of the folder (training,
    fitting and validation caches excluded), the preset's order first. benchmark / arch:
    a preset's cache folder and ID set. tune_on: an OOD validation cache; every score with
    a sweep grid gets the parameters with the best AUROC of the ID validation cache
    (``tune_id``, default the preset's, else ``<id>_val``) against it, as OpenOOD's
    parameter search (``analyze.tuning``), before the test sets are scored; the choice is
    in ``.tuned``, ``.settings`` and ``.notes``. compare: ``[(a, b)]`` or ``["a,b"]``.
    Other fields as ``run_evaluation``.
    """
    request = _as_request(request, options)
    if request.checkpoint_dirs:
        raise ValueError("checkpoint_dirs: several checkpoints are evaluated by checkpoint_evaluation")
    cache_dir, id, ood, names, explicit, params, pairs, notes, csid = _prepared(request)
    tuned = {}
    if request.tune_on:
        tune_on = request.tune_on
        val_id = request.tune_id or (preset_of(request.benchmark).val_id if request.benchmark else None) \
            or val_cache_name(id)
        for name in (val_id, tune_on):
            if not os.path.exists(cache_path(cache_dir, name)):
                raise ScoreError(f"--tune-on: validation cache {cache_path(cache_dir, name)} not found; extract it "
                                 f"(with --benchmark, --dataset {name})")
        if tune_on in ood or val_id in ood:
            raise ScoreError(f"--tune-on: {tune_on} / {val_id} are validation caches, not OOD test sets; leave "
                             "them out of --ood")
        tuned = tune(cache_dir, id, val_id, tune_on, names, params, request.fit_on)
        for name, t in tuned.items():
            params[name] = t["params"]
            notes.append(f"tuned {name} on {val_id} vs {tune_on}: " + _setting(t["params"])
                         + f" (validation AUROC {100 * t['auroc']:.2f}, {t['tried']} candidates)")
    ev = run_evaluation(cache_dir, id, ood, names, request.convention, request.allow_partial, params,
                        request.fit_on, request.fitted_dir, lenient=not explicit,
                        allow_overlap=request.allow_overlap, progress=request.progress, ci=request.ci,
                        resamples=request.resamples, seed=request.seed, compare=pairs,
                        compare_level=request.compare_level, csid=csid)
    ev.tuned = tuned
    for name, t in tuned.items():
        if name in ev.results:
            before = ev.settings.get(name)
            ev.settings[name] = (f"{before}; " if before else "") + \
                f"tuned on {t['on'][0]} vs {t['on'][1]}: " + _setting(t["params"])
    ev.notes = notes + ev.notes
    return ev


def _setting(params):
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"


def evaluate(cache_dir, id, scores, ood=None, convention="sklearn", fit_on=None, params=None,
             allow_partial=False, fitted_dir=None, allow_overlap=False, ci=None, resamples=1000, seed=0,
             tune_on=None, tune_id=None, csid=None):
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
    hold bootstrap intervals (``resamples`` resamples, ``seed``). tune_on / tune_id:
    choose each score's parameters on validation caches first (``analyze --tune-on``,
    ``evaluation``). csid: covariate-shifted ID sets (``analyze --csid``; default the
    benchmark's that the folder holds): the frame then starts with a ``setting`` column,
    "ood" rows as above followed by the "fsood" rows of the full-spectrum setting. The
    ``Evaluation`` object itself comes from ``evaluation``.
    """
    return evaluation(cache_dir=cache_dir, id=id, scores=scores, ood=ood, convention=convention, fit_on=fit_on,
                      params=params, tune_on=tune_on, tune_id=tune_id, allow_partial=allow_partial,
                      fitted_dir=fitted_dir, allow_overlap=allow_overlap, ci=ci, resamples=resamples,
                      seed=seed, csid=csid).frame()


def compare(cache_dir, id, a, b, ood=None, convention="sklearn", fit_on=None, params=None, level=95,
            resamples=1000, seed=0, allow_partial=False, fitted_dir=None, allow_overlap=False):
    """Paired comparison of scores ``a`` and ``b`` on the same samples (``analyze
    --compare A,B``), as a ``pandas.DataFrame``: one row per OOD set (and "Average",
    group means), columns ``ood, AUROC_diff, AUROC_low, AUROC_high, delong_p, FPR95_diff,
    FPR95_low, FPR95_high`` (fractions; differences a - b; intervals at ``level`` % from
    ``resamples`` paired bootstrap resamples; DeLong's two-sided p for the AUROC
    difference, per set only). Other arguments as ``evaluate``."""
    import pandas as pd
    pair = (canonical(a), canonical(b))
    ev = evaluation(cache_dir=cache_dir, id=id, scores=list(pair), ood=ood, convention=convention, fit_on=fit_on,
                    params=params, allow_partial=allow_partial, fitted_dir=fitted_dir, allow_overlap=allow_overlap,
                    resamples=resamples, seed=seed, compare=[pair], compare_level=level)
    rows = []
    for dataset, row in ev.comparisons[",".join(pair)].items():
        rows.append({"ood": dataset, "AUROC_diff": row["difference"]["AUROC"], "AUROC_low": row["AUROC"][0],
                     "AUROC_high": row["AUROC"][1], "delong_p": row.get("delong_p", float("nan")),
                     "FPR95_diff": row["difference"]["FPR95"], "FPR95_low": row["FPR95"][0],
                     "FPR95_high": row["FPR95"][1]})
    return pd.DataFrame(rows)


def checkpoint_evaluation(request=None, **options):
    """An ``analyze.results.CheckpointsEvaluation`` (``pipeline.py analyze
    --checkpoint-dirs``): the scores every checkpoint's folder can serve, each cell as mean
    ± std over the checkpoints, and the deep ensemble.

    request: an ``AnalysisRequest`` with ``checkpoint_dirs``, or its fields as keywords.
    ood: default every OOD set, which every folder must hold. fitted_dir: fits go to
    ``fitted_dir/<folder name>``. Scores left out are in ``.notes``. Intervals,
    comparisons, tuning and plots apply to one checkpoint's folder and are refused here.
    """
    request = _as_request(request, options)
    if not request.checkpoint_dirs:
        raise ValueError("checkpoint_dirs: give the cache folders of the checkpoints (at least two)")
    used = [o for o, v in (("ci", request.ci), ("compare", request.compare), ("tune_on", request.tune_on)) if v]
    if used:
        raise ValueError(f"{used[0]}: several checkpoints are reported as mean ± std over checkpoints; "
                         "--ci, --compare and --tune-on apply to one checkpoint's folder (--cache-dir)")
    _, id, ood, names, explicit, params, _, notes, _ = _prepared(request)
    ce = run_checkpoints(list(request.checkpoint_dirs), id, list(ood), names, request.convention, params,
                         request.fit_on, request.fitted_dir, lenient=not explicit,
                         allow_overlap=request.allow_overlap, ensemble=request.ensemble)
    ce.notes = notes + [f"{name} left out: {why}" for name, why in ce.failed.items()]
    return ce


def evaluate_checkpoints(cache_dirs, id, scores, ood=None, convention="sklearn", fit_on=None, params=None,
                         fitted_dir=None, allow_overlap=False, ensemble=True):
    """``analyze --checkpoint-dirs``: metrics of ``scores`` over several checkpoints' cache
    folders (the same sets and images in each), as a ``pandas.DataFrame`` with one row per
    (score, OOD set) and columns ``score, ood, <metric>_mean, <metric>_std`` (fractions;
    std over checkpoints, ddof 0); the deep ensemble is the score "ensemble". ood: default
    every OOD set, which every folder must hold. fitted_dir: fits go to ``fitted_dir/<folder name>``."""
    import pandas as pd
    ce = checkpoint_evaluation(checkpoint_dirs=cache_dirs, id=id, scores=scores, ood=ood, convention=convention,
                               fit_on=fit_on, params=params, fitted_dir=fitted_dir, allow_overlap=allow_overlap,
                               ensemble=ensemble)
    rows = []
    for name, per_set in ce.results.items():
        for dataset, metrics in per_set.items():
            row = {"score": name, "ood": dataset}
            for m, cell in metrics.items():
                row[f"{column_name(m)}_mean"], row[f"{column_name(m)}_std"] = cell["mean"], cell["std"]
            rows.append(row)
    return pd.DataFrame(rows)
