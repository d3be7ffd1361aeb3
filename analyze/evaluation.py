"""Scores of whole caches, fitting on training or validation caches, and metrics.

The glue between the registry (``analyze.registry``), the cache reader and the metrics:
``score_cache`` streams one cache through an estimator block by block, ``fit_estimator``
fits one on every usable row of a fitting cache, ``FitStore`` keeps fitted attributes on
disk so a new OOD set is scored without refitting, ``run_evaluation`` does it all for an
ID cache against OOD caches. Library code: raises, never prints.
"""
import json
import os

import numpy as np

from store.benchmarks import groups_of
from store.reader import BLOCK_ROWS, CacheReader, cache_path
from store.recipes import comparable, layers_of
from store.schema import CacheError, differing

from .data import CacheData
from .metrics import METRICS, ood_metrics
from .registry import ScoreCrash, ScoreError, entry

MAP_BLOCK_BYTES = 128 << 20


def block_rows(needs, attrs):
    """Rows per block for a score reading ``needs``: BLOCK_ROWS, fewer when it reads maps
    (at most about 128 MiB of float64 maps per block)."""
    per_row = 0
    for set_name, _, stat in needs:
        if stat == "map":
            for layer in layers_of(attrs["hook_sets"], set_name) or []:
                per_row += 8 * int(np.prod(attrs["layer_shapes"][layer]))
    return BLOCK_ROWS if not per_row else max(1, min(BLOCK_ROWS, MAP_BLOCK_BYTES // per_row))


def check_serves(reader, name, params=None):
    """Raise CacheError when the cache lacks what score ``name`` reads with ``params``."""
    e = entry(name)
    problems = e.problems(reader.attrs, params)
    if problems:
        raise CacheError(f"{reader.path} lacks what {name} needs: {'; '.join(problems)}. "
                         f"Re-extract it with --score {name}")


def check_compatible(name, params, attrs_a, path_a, attrs_b, path_b):
    """Raise CacheError when two caches differ in what score ``name`` reads (the model, the
    preprocessing, the hooked layers it uses), naming the differing fields."""
    e = entry(name)
    needs = e.needs_for(params)
    diff = differing(comparable(attrs_a, needs, e.passes), comparable(attrs_b, needs, e.passes))
    if diff:
        raise CacheError(f"{name} cannot combine {path_a} and {path_b}: they differ in "
                         f"{', '.join(diff)} (what {name} reads must come from the same model and "
                         "preprocessing); re-extract one of them with the other's settings")


def check_same_model(paths, allow_partial=False, what="these caches"):
    """Raise CacheError unless every cache in ``paths`` comes from the same model and
    preprocessing (``store.schema.MODEL_FIELDS``), naming the first that differs: caches of
    different weights never meet in one table, sweep or tuning."""
    first, base = None, None
    for path in paths:
        with CacheReader(path, allow_partial=allow_partial) as reader:
            ident = comparable(reader.attrs)
        if first is None:
            first, base = path, ident
            continue
        diff = differing(base, ident)
        if diff:
            raise CacheError(f"{what} mix models: {path} differs from {first} in {', '.join(diff)}; "
                             "every cache of one analysis must come from the same weights and "
                             "preprocessing")


def _wrap(name, path, err):
    """CacheError and ScoreError as raised; any other exception as a ScoreCrash naming the
    score, the cache and the cause (it stops even a lenient run: a bug is never a note)."""
    if isinstance(err, (CacheError, ScoreError)):
        return err
    return ScoreCrash(f"{name} crashed on {path}: {type(err).__name__}: {err} (a bug in the score, "
                      "not a limit of the cache: fix it, or leave the score out with --score)")


def score_cache(reader, name, estimator, params=None):
    """Scores (N,) float64 of every row of an open cache, block by block.

    estimator: from ``entry(name).make(params)`` (fitted first for fitted scores).
    """
    e = entry(name)
    check_serves(reader, name, params)
    needs = e.needs_for(params)
    parts = []
    for a, b in reader.blocks(block_rows(needs, reader.attrs)):
        data = CacheData(reader, a, b, needs=needs, passes=e.passes, score=name)
        try:
            values = np.asarray(estimator.score(data), dtype=np.float64)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"interrupted while {name} scored rows {a}-{b} of {reader.path}; "
                                    "no table or score file of this run was written") from None
        except Exception as err:
            raise _wrap(name, reader.path, err) from err
        if values.shape != (b - a,):
            raise ScoreError(f"{name} returned shape {values.shape} for a block of {b - a} rows of "
                             f"{reader.path}; a score returns one value per row, shape (n,)")
        parts.append(values)
    return np.concatenate(parts) if parts else np.empty(0)


def fit_estimator(reader, name, params=None):
    """A fitted estimator of score ``name`` with ``params``, fitted on every usable (not
    skipped) row of the open cache ``reader``."""
    e = entry(name)
    check_serves(reader, name, params)
    keep = ~reader.read_all("skipped").astype(bool)
    if keep.sum() == 0:
        raise CacheError(f"{reader.path}: no usable rows to fit {name} on")
    labels = reader.read_all("labels")[keep]
    k = int(reader.attrs["num_classes"])
    if (labels >= k).any() or (labels < -1).any():
        bad = int(((labels >= k) | (labels < -1)).sum())
        raise CacheError(f"{reader.path}: {bad} row(s) have labels a {k}-class head cannot have (e.g. "
                         f"{int(labels[(labels >= k) | (labels < -1)][0])}); {name} cannot be fitted on "
                         "them: check --num-classes and the labels of that set")
    data = CacheData(reader, 0, reader.n_samples, keep=keep, needs=e.needs_for(params),
                     passes=e.passes, score=name)
    try:
        est = e.make(params).fit(data)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted while fitting {name} on {reader.path}; no table or "
                                "fit of this run was written") from None
    except Exception as err:
        raise _wrap(name, reader.path, err) from err
    if est is None:
        raise ScoreError(f"{name}.fit must return self (scikit-learn convention)")
    return est


def fitted_state(estimator):
    """The fitted attributes (names ending in ``_``) of an estimator, flattened for ``np.savez``
    (a dict attribute ``a_`` = {k: array} becomes keys ``a_/k``)."""
    out = {}
    for key, value in vars(estimator).items():
        if not key.endswith("_") or key.startswith("_"):
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{k}": np.asarray(v) for k, v in value.items()})
        else:
            out[key] = np.asarray(value)
    return out


def restore(name, params, state):
    """An estimator of ``name`` with ``params`` and the fitted attributes of ``state``."""
    est = entry(name).make(params)
    nested = {}
    for key, value in state.items():
        attr, slash, sub = key.partition("/")
        if slash:
            nested.setdefault(attr, {})[sub] = value
        else:
            setattr(est, key, value)
    for attr, value in nested.items():
        setattr(est, attr, value)
    return est


class FitStore:
    """Fitted attributes kept as ``folder/<score>/`` (``key.json`` and one ``.npy`` per
    attribute; a dict attribute ``a_`` becomes ``a_/<key>.npy``), reused while the fitting
    cache (path, rows, what the score reads) and the fit parameters are the same. Arrays
    are memory-mapped when reused, so a large fit (a covariance, a bank's row index) is
    read from disk as the score touches it instead of loaded whole."""

    def __init__(self, folder=None):
        self.folder = folder

    def get(self, reader, name, params=None):
        """A fitted estimator of ``name``: loaded when a matching fit is stored, else fitted
        (and stored when the store has a folder)."""
        e = entry(name)
        key = json.dumps({"score": name, "cache": os.path.abspath(reader.path), "n": reader.n_samples,
                          "reads": comparable(reader.attrs, e.needs_for(params), e.passes),
                          "fit": e.fit_key(params)}, sort_keys=True, default=str)
        where = os.path.join(self.folder, name) if self.folder else None
        if where:
            state = _load_fit(where, key)
            if state is not None:
                return restore(name, params, state)
        est = fit_estimator(reader, name, params)
        if where:
            _save_fit(where, key, fitted_state(est))
        return est


def _load_fit(where, key):
    """The saved state at folder ``where`` when its key is ``key``, else None."""
    try:
        with open(os.path.join(where, "key.json")) as f:
            if f.read() != key:
                return None
    except OSError:
        return None
    state = {}
    for root, _, files in os.walk(where):
        for file in files:
            if file.endswith(".npy"):
                path = os.path.join(root, file)
                name = os.path.relpath(path, where)[:-4].replace(os.sep, "/")
                value = np.load(path, mmap_mode="r", allow_pickle=False)
                state[name] = value if value.ndim else value[()]
    return state


def _save_fit(where, key, state):
    """Write ``state`` ({attribute: array}) and ``key`` to folder ``where``, replacing what
    was there only once the new fit is whole (written to ``<where>.tmp`` first)."""
    import shutil
    tmp = where + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for name, value in state.items():
        path = os.path.join(tmp, *name.split("/")) + ".npy"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.save(path, np.asarray(value), allow_pickle=False)
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, "key.json"), "w") as f:
        f.write(key)
    shutil.rmtree(where, ignore_errors=True)
    os.replace(tmp, where)


def fit_source(name, id_name, fit_on=None, params=None):
    """Name of the cache score ``name`` is fitted on: the ``validation`` parameter (default
    the ID test cache) for validation-fitted scores, else ``fit_on`` or ``<id>_train``;
    None for unfitted scores."""
    e = entry(name)
    if e.fit_on is None:
        return None
    if e.fit_on == "validation":
        return (params or {}).get("validation") or id_name
    return fit_on or f"{id_name}_train"


def unavailable_scores(cache_dir, id_name, names, fit_on=None, params=None):
    """``{score: reason}`` for the scores the ID cache (or its fitting cache) cannot serve."""
    params = params or {}
    out = {}
    with CacheReader(cache_path(cache_dir, id_name), allow_partial=True) as reader:
        attrs = reader.attrs
    for name in names:
        e = entry(name)
        try:
            problems = e.problems(attrs, params.get(name))
        except ScoreError as err:
            out[name] = str(err)
            continue
        source = fit_source(name, id_name, fit_on, params.get(name))
        path = cache_path(cache_dir, source) if source else None
        if problems:
            out[name] = "; ".join(problems)
        elif path and not os.path.exists(path):
            out[name] = (f"needs the fitting cache {path} (the ID training cache: extract with "
                         "--split train --limit 1000 --balanced)" if e.fit_on == "train" else
                         f"needs the validation cache {path}")
        elif path and e.fit_on == "validation":
            with CacheReader(path) as reader:
                if not (reader.attrs.get("mahalanobis") or {}).get("adversarial"):
                    out[name] = (f"the validation cache {path} has no pseudo-OOD copies "
                                 "(extract it with --maha-fit TRAIN_CACHE --maha-adversarial)")
    return out


def fit_all(cache_dir, id_name, names, params=None, fit_on=None, fitted_dir=None, id_attrs=None, failed=None):
    """``{score: fitted estimator}`` for the fitted scores in ``names``; each fitting cache
    is checked against the ID cache on what the score reads. failed: a dict; when given, a
    score that cannot be fitted is recorded there ({score: reason}) instead of raising."""
    params = params or {}
    store = FitStore(fitted_dir)
    out = {}
    for name in names:
        source = fit_source(name, id_name, fit_on, params.get(name))
        if source is None:
            continue
        path = cache_path(cache_dir, source)
        try:
            with CacheReader(path) as reader:
                if id_attrs is not None:
                    check_compatible(name, params.get(name), id_attrs, cache_path(cache_dir, id_name),
                                     reader.attrs, path)
                out[name] = store.get(reader, name, params.get(name))
        except (CacheError, ScoreError) as err:
            if failed is None or isinstance(err, ScoreCrash):
                raise
            failed[name] = str(err)
    return out


def fit_caches(id_name, names, fit_on=None, params=None):
    """Names of the caches the scores ``names`` are fitted on (never OOD sets)."""
    params = params or {}
    found = []
    for name in names:
        source = fit_source(name, id_name, fit_on, params.get(name))
        if source and source != id_name and source not in found:
            found.append(source)
    return found


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


def _check_finite(name, values, keep, paths, path, params):
    bad = np.flatnonzero(~np.isfinite(values) & keep)
    if len(bad):
        raise ScoreError(f"{name} gave {len(bad)} non-finite value(s) on {path} (first: row "
                         f"{bad[0]}, {paths[bad[0]]}) with parameters {params or 'the defaults'}; "
                         "check the parameters (e.g. a temperature of 0) and the cache")


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
    """Scores and metrics for the ID cache against each OOD cache in ``cache_dir``.

    params: ``{score: {parameter: value}}``. fit_on: training cache name for the scores
    fitted on training data (default ``<id>_train``); fitted_dir: where fitted attributes
    are kept. Returns ``{"results": {score: {ood or "Average": {metric: value}}},
    "scores": {dataset: {score: (N,) array}}, "paths": {dataset: array}, "skipped":
    {dataset: count}, "n_rows": {dataset: N}, "skip_reasons": {dataset: {path: reason}},
    "partial": [dataset], "convention", "id", "ood": [set], "fit_caches": [set],
    "settings": {score: text}, "groups": {"near": [set], "far": [set]} or None,
    "id_accuracy": fraction or None, "failed": {score: reason}}``. lenient: a score that
    cannot be fitted or computed is left out (reason in "failed") instead of raising, as
    ``--score all`` wants. allow_overlap: accept fitting caches that share images with the
    evaluated ones (``check_overlap``; refused by default). progress: a progress bar (stderr)
    over the (cache, score) pairs. With groups (the benchmark preset's near and far
    OOD sets), each score's results also hold "nearood" and "farood": the unweighted means
    over the group, as OpenOOD reports them. Skipped (unreadable) images are left out of
    the metrics.

    ci: a confidence level in percent (e.g. 95): "intervals" gains, per score and set
    (and Average / nearood / farood), bootstrap intervals of AUROC and FPR95
    (``analyze.uncertainty``; ``resamples`` resamples, default 1,000, ``seed``). compare:
    ``[(a, b)]`` pairs of scores: "comparisons" gains, per pair and set, the paired
    differences a - b of AUROC and FPR95 with their intervals (at ``ci``, else
    ``compare_level``) and DeLong's p-value of the AUROC difference.
    """
    params = params or {}
    compare = [tuple(p) for p in compare or ()]
    for pair in compare:
        if len(pair) != 2 or pair[0] == pair[1] or any(n not in names for n in pair):
            raise ScoreError(f"compare {','.join(pair)}: name two different scores of this evaluation "
                             f"({', '.join(names)})")
    ood_names = list(ood_names)
    if id_name in ood_names:
        raise ValueError(f"{id_name!r} is the ID set; it cannot also be an OOD set")
    if not ood_names:
        raise ValueError("no OOD set to evaluate against")
    out = {"results": {}, "scores": {}, "paths": {}, "skipped": {}, "n_rows": {}, "skip_reasons": {},
           "partial": [], "convention": convention, "id": id_name, "ood": ood_names,
           "fit_caches": fit_caches(id_name, names, fit_on, params), "settings": {}}
    id_path = cache_path(cache_dir, id_name)
    with CacheReader(id_path, allow_partial=allow_partial) as reader:
        id_attrs = reader.attrs
    if not allow_overlap:
        evaluated = [cache_path(cache_dir, d) for d in [id_name, *ood_names]]
        for fit in out["fit_caches"]:
            if os.path.exists(cache_path(cache_dir, fit)):
                check_overlap(cache_path(cache_dir, fit), evaluated, allow_partial)
    for name in names:
        e = entry(name)
        resolved = e.resolve(params.get(name))
        shown = {k: v for k, v in resolved.items() if v != e.params[k]}
        text = e.describe(resolved, id_attrs) if e.describe else ""
        if shown and not e.describe:
            text = ", ".join(f"{k}={v}" for k, v in shown.items())
        if text:
            out["settings"][name] = text
    out["failed"] = {}
    fitted = fit_all(cache_dir, id_name, names, params, fit_on, fitted_dir, id_attrs,
                     out["failed"] if lenient else None)
    names = [n for n in names if n not in out["failed"]]
    keep = {}
    from tqdm import tqdm
    bar = tqdm(total=len(names) * (1 + len(ood_names)), desc="analyze", unit="score", disable=not progress,
               dynamic_ncols=True)
    for dataset in [id_name, *ood_names]:
        path = cache_path(cache_dir, dataset)
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
                if name in out["failed"]:
                    bar.update(1)
                    continue
                try:
                    est = fitted.get(name) or entry(name).make(params.get(name))
                    values[name] = score_cache(reader, name, est, params.get(name))
                    _check_finite(name, values[name], ~skipped, paths, path, params.get(name))
                except (CacheError, ScoreError) as err:
                    if not lenient or isinstance(err, ScoreCrash):
                        bar.close()
                        raise
                    out["failed"][name] = str(err)
                bar.update(1)
            out["scores"][dataset] = values
            out["paths"][dataset] = paths
            out["skipped"][dataset] = int(skipped.sum())
            out["n_rows"][dataset] = int(len(skipped))
            out["skip_reasons"][dataset] = {str(p): (str(reasons[i]) if reasons is not None else "unreadable")
                                            for i, p in enumerate(paths) if skipped[i]}
            if reader.partial:
                out["partial"].append(dataset)
            keep[dataset] = ~skipped
            if dataset == id_name:
                out["id_accuracy"] = _accuracy(reader, keep[dataset])
    bar.close()
    for name in names:
        if name in out["failed"]:
            continue
        try:
            check_not_constant(name, {d: v[name][keep[d]] for d, v in out["scores"].items() if name in v},
                               params.get(name))
        except ScoreError as err:
            if not lenient:
                raise
            out["failed"][name] = str(err)
    groups = groups_of(id_attrs) or {}
    groups = {g: [d for d in sets if d in ood_names] for g, sets in groups.items()}
    out["groups"] = groups if any(groups.values()) else None
    names = [n for n in names if n not in out["failed"]]
    for dataset in out["scores"]:
        out["scores"][dataset] = {n: v for n, v in out["scores"][dataset].items() if n in names}
    for name in out["failed"]:
        out["settings"].pop(name, None)
    if not names:
        raise ScoreError("no score could be computed: " + "; ".join(f"{n}: {r}" for n, r in out["failed"].items()))
    for name in names:
        known = out["scores"][id_name][name][keep[id_name]]
        rows = {d: ood_metrics(known, out["scores"][d][name][keep[d]], convention) for d in ood_names}
        for g, sets in (out["groups"] or {}).items():
            if sets:
                rows[f"{g}ood"] = {m: float(np.mean([rows[d][m] for d in sets])) for m in METRICS}
        rows["Average"] = {m: float(np.mean([rows[d][m] for d in ood_names])) for m in METRICS}
        out["results"][name] = rows
    for pair in compare:
        missing_pair = [n for n in pair if n not in names]
        if missing_pair:
            raise ScoreError(f"compare {','.join(pair)}: {missing_pair[0]} could not be computed: "
                             f"{out['failed'].get(missing_pair[0], 'left out')}")
    if ci or compare:
        _add_uncertainty(out, names, keep, float(ci or compare_level), resamples, seed, compare, bool(ci))
    return out


def _add_uncertainty(out, names, keep, level, resamples, seed, compare, intervals):
    """Fill ``out["intervals"]`` and ``out["comparisons"]`` (``run_evaluation``)."""
    from .uncertainty import RESAMPLES, delong, interval, resampled_metrics
    resamples = int(resamples or RESAMPLES)
    id_name, ood_names = out["id"], out["ood"]

    def usable(dataset, name):
        return out["scores"][dataset][name][keep[dataset]]

    def summarise(per_set, point=None):
        """Intervals per set and over the Average / group means of the per-set draws."""
        rows = {d: {m: interval(v, level) for m, v in draws.items()} for d, draws in per_set.items()}
        spans = {"Average": ood_names, **{f"{g}ood": sets for g, sets in (out["groups"] or {}).items() if sets}}
        for label, sets in spans.items():
            rows[label] = {m: interval(np.mean([per_set[d][m] for d in sets], axis=0), level) for m in ("AUROC", "FPR95")}
        return rows

    out["ci"] = {"level": level, "resamples": resamples, "seed": seed}
    if intervals:
        out["intervals"] = {}
        for name in names:
            per_set = {d: resampled_metrics(usable(id_name, name), usable(d, name), resamples, seed, i + 1)
                       for i, d in enumerate(ood_names)}
            out["intervals"][name] = summarise(per_set)
    out["comparisons"] = {}
    for a, b in compare:
        per_set = {d: resampled_metrics(usable(id_name, a), usable(d, a), resamples, seed, i + 1,
                                        other=(usable(id_name, b), usable(d, b)))
                   for i, d in enumerate(ood_names)}
        rows = summarise(per_set)
        for d, row in rows.items():
            row["difference"] = {m: out["results"][a][d][m] - out["results"][b][d][m] for m in ("AUROC", "FPR95")}
            if d in ood_names:
                row["delong_p"] = delong(usable(id_name, a), usable(d, a), usable(id_name, b), usable(d, b))["p"]
        out["comparisons"][f"{a},{b}"] = rows
