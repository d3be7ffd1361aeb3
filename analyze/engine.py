"""The analysis engine: the one loop from a score to its numbers.

Two functions do the work, and every door calls only these: ``pipeline.py analyze`` and
``analyze.evaluate`` (through ``run_evaluation``), ``analyze.score``, the sweep's
variants, the validation tuning and the checkpoint tables.

* ``Engine.score_sets(name, params, datasets)`` fits score ``name`` on its fitting cache
  (or reuses a saved fit), scores every row of each cache of ``datasets`` block by
  block, masks the skipped (unreadable) rows and refuses what is not a measurement: a
  non-finite value on a usable row, or one value for every usable row of every set
  (``ConstantScore``). It returns ``{dataset: Scored}``.
* ``metric_summary(scored, id_name, ood_names, convention)`` turns those into the
  metrics of every OOD set, the group means (near / far) and the Average, in any
  convention (``analyze.metrics.CONVENTIONS``).

The engine also holds the rules around them, each stated once:

* the fitting-cache rule: a score fitted on training data (entry ``fit_on="train"``) is
  fitted on ``fit_on`` when given (``--fit-on``), else on ``<id>_train``, ``id`` being the
  ID test set of the analysis; a score fitted on validation data
  (``fit_on="validation"``) on its ``validation`` parameter, else on the ID test cache
  itself; unfitted scores have no fitting cache;
* servability (``why_not``): what a cache lacks, named with the cache and the fix;
* refusals: non-finite and constant scores, caches of other models
  (``analyze.fitting.check_compatible``), fitting caches that share images with the
  evaluated ones (``check_overlap``), sets whose every row was skipped;
* crashes versus limits (``is_crash``).

The engine names no score: what a score needs of its fitting cache beyond its ``needs``
is the entry's ``fit_requires``. Library code: raises, never prints.
"""
import os
from typing import NamedTuple

import numpy as np

from gradood.store.benchmarks import train_cache_name
from gradood.store.reader import CacheReader, cache_path
from gradood.store.recipes import missing as lacks
from gradood.store.schema import CacheError

from .fitting import FitStore, check_compatible, score_cache
from .metrics import METRICS, ood_metrics
from .registry import ScoreCrash, ScoreError, entry


class ConstantScore(ScoreError):
    """A score gave one value to every usable row of every set: its metrics would be those
    of a coin toss, not a measurement."""


class Scored(NamedTuple):
    """The scores of one cache: ``values`` (N,) float64 of every row, ``usable`` (N,) bool,
    False for skipped (unreadable) rows, whose values mean nothing."""
    values: np.ndarray
    usable: np.ndarray

    @property
    def kept(self):
        """(n_usable,) float64: the values of the usable rows."""
        return self.values[self.usable]


def is_crash(err):
    """True when ``err`` (raised while fitting or scoring) is a bug, not a limit of the caches
    or the parameters: anything but CacheError / ScoreError, or a ScoreCrash whose cause is
    not a ValueError (a ValueError from ``fit`` names a parameter out of range)."""
    if not isinstance(err, (CacheError, ScoreError)):
        return True
    if isinstance(err, ScoreCrash):
        return not isinstance(err.__cause__, ValueError)
    return False


def check_not_constant(name, scored, params=None, setting=""):
    """Raise ConstantScore when score ``name`` gives one value to every usable row of every
    cache of ``scored`` ({dataset: Scored}); ``setting``: the entry's description of its
    setting on these caches (e.g. GAIA-Z's note on activations without exact zeros)."""
    rows = [s.kept for s in scored.values() if s.usable.any()]
    if not rows:
        return
    low = min(float(np.min(v)) for v in rows)
    if all(float(np.max(v)) == low for v in rows):
        raise ConstantScore(f"{name} gives every ID and OOD row the same value ({low:g}) with parameters "
                            f"{params or 'the defaults'}: its metrics would be a coin toss (AUROC 50), "
                            "not a result. Check the parameters (e.g. energy.temperature, neco.dim, nac.O, "
                            "react.percentile) and the size of the fitting cache"
                            + (f". {name} on these caches: {setting}" if setting else ""))


def full_spectrum(scored, id_name, csid):
    """``(scored', key)``: ``scored`` ({dataset: Scored}) with one more entry, ``key`` =
    ``"<id_name>+csid"``, holding the rows of the ID test set followed by those of each
    covariate-shifted ID set of ``csid`` in order, the ID side of full-spectrum OOD
    (OpenOOD v1.5's ``eval_ood(fsood=True)`` concatenates them the same way)."""
    key = f"{id_name}+csid"
    parts = [scored[d] for d in [id_name, *csid]]
    widened = Scored(np.concatenate([p.values for p in parts]), np.concatenate([p.usable for p in parts]))
    return {**scored, key: widened}, key


def metric_summary(scored, id_name, ood_names, convention="sklearn", groups=None):
    """``{set | "<group>ood" | "Average": {metric: fraction}}``: the metrics (``METRICS``)
    of the usable ID rows of ``scored[id_name]`` against those of each OOD set of
    ``ood_names``, in ``convention``; each non-empty group of ``groups`` ({"near": [set],
    "far": [set]}) as the unweighted mean over its sets (OpenOOD's nearood / farood), and
    "Average" over every OOD set."""
    known = scored[id_name].kept
    rows = {d: ood_metrics(known, scored[d].kept, convention) for d in ood_names}
    for g, sets in (groups or {}).items():
        if sets:
            rows[f"{g}ood"] = {m: float(np.mean([rows[d][m] for d in sets])) for m in METRICS}
    rows["Average"] = {m: float(np.mean([rows[d][m] for d in ood_names])) for m in METRICS}
    return rows


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


class Engine:
    """The caches of one analysis: the folder ``cache_dir``, its ID test set ``id_name``.

    fit_on: the training cache of training-fitted scores (default ``<id>_train``).
    fitted_dir: where fits are saved and reused (``FitStore``; None: never saved).
    allow_partial: read the finished rows of unfinished caches. readers: ``{name: open
    reader}`` used instead of opening those files (a sweep keeps its caches in memory).

    A context manager: the caches it opens stay open until it closes.
    """

    def __init__(self, cache_dir, id_name, fit_on=None, fitted_dir=None, allow_partial=False, readers=None):
        self.cache_dir, self.id_name, self.fit_on = cache_dir, id_name, fit_on
        self.allow_partial = allow_partial
        self.store = FitStore(fitted_dir)
        self.readers = dict(readers or {})
        self._opened = {}
        self._id_attrs = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Close the caches this engine opened."""
        for reader in self._opened.values():
            reader.close()
        self._opened.clear()

    # ------------------------------------------------------------------ caches
    def path(self, dataset):
        """Path of cache ``dataset``."""
        return cache_path(self.cache_dir, dataset)

    def reader(self, dataset, allow_partial=None):
        """The open reader of cache ``dataset`` (one of ``readers`` when given there; else
        opened once and kept until ``close``). ``allow_partial``: as the engine's, or
        True to read attributes of an unfinished cache."""
        if dataset in self.readers:
            return self.readers[dataset]
        partial = self.allow_partial if allow_partial is None else allow_partial
        if partial and (dataset, False) in self._opened:
            return self._opened[(dataset, False)]     # a complete cache reads the same either way
        key = (dataset, bool(partial))
        if key not in self._opened:
            self._opened[key] = CacheReader(self.path(dataset), allow_partial=partial)
        return self._opened[key]

    @property
    def id_attrs(self):
        """Root attributes of the ID test cache."""
        if self._id_attrs is None:
            self._id_attrs = self.reader(self.id_name, allow_partial=True).attrs
        return self._id_attrs

    def usable(self, dataset):
        """(N,) bool: the rows of cache ``dataset`` that were read (not skipped). Raises
        CacheError when every row was skipped: nothing to score."""
        reader = self.reader(dataset)
        skipped = reader.read_all("skipped").astype(bool)
        if len(skipped) and skipped.all():
            raise CacheError(f"{reader.path}: all {len(skipped)} rows of set {dataset!r} were skipped (unreadable "
                             "images): nothing to score; see `pipeline.py inspect` and re-extract it")
        return ~skipped

    # ------------------------------------------------------------------ the fit rule
    def fit_source(self, name, params=None):
        """Name of the cache score ``name`` is fitted on with ``params`` (the module's rule);
        None for unfitted scores."""
        e = entry(name)
        if e.fit_on is None:
            return None
        if e.fit_on == "validation":
            return (params or {}).get("validation") or self.id_name
        return self.fit_on or train_cache_name(self.id_name)

    def fit_caches(self, names, params=None):
        """Names of the caches the scores ``names`` are fitted on, the ID cache excluded."""
        params = params or {}
        found = []
        for name in names:
            source = self.fit_source(name, params.get(name))
            if source and source != self.id_name and source not in found:
                found.append(source)
        return found

    # ------------------------------------------------------------------ servability
    def why_not(self, name, params=None, datasets=()):
        """Empty when the ID cache, the fitting cache and every cache in ``datasets`` can
        serve score ``name`` with ``params``; else the reason, naming the cache and what it
        lacks. Unknown parameters raise ScoreError."""
        e = entry(name)
        problems = e.problems(self.id_attrs, params)
        if problems:
            return "; ".join(problems)
        source = self.fit_source(name, params)
        if source and source != self.id_name:
            path = self.path(source)
            if not os.path.exists(path) and source not in self.readers:
                return (f"needs the fitting cache {path} (the ID training cache: extract with --split train "
                        "--limit 1000 --balanced)" if e.fit_on == "train" else f"needs the validation cache {path}")
        if source and e.fit_requires is not None:
            reader = self.reader(source, allow_partial=True)
            reason = e.fit_requires(reader.attrs)
            if reason:
                return f"the {e.fit_on} cache {reader.path}: {reason}"
        for dataset in datasets:
            if dataset == self.id_name:
                continue
            reader = self.reader(dataset, allow_partial=True)
            problems = lacks(e.needs_for(params), e.passes, reader.attrs)
            if problems:
                return f"{dataset}: " + "; ".join(problems)
            try:
                check_compatible(name, params, self.id_attrs, self.id_name, reader.attrs, dataset)
            except CacheError as err:
                return str(err)
        return ""

    def servable(self, names, params=None, datasets=()):
        """``(servable names, {name: reason})``: ``why_not`` for each score of ``names``."""
        params = params or {}
        reasons = {}
        for name in names:
            try:
                why = self.why_not(name, params.get(name), datasets)
            except ScoreError as err:
                why = str(err)
            if why:
                reasons[name] = why
        return [n for n in names if n not in reasons], reasons

    # ------------------------------------------------------------------ fit and score
    def estimator(self, name, params=None, against=None):
        """The estimator of score ``name`` with ``params``: fitted on its fitting cache (or a
        saved fit reused) for fitted scores. The fitting cache is checked against the ID
        cache, or against the root attributes ``against`` of the cache to be scored."""
        e = entry(name)
        if not e.fitted:
            return e.make(params)
        reader = self.reader(self.fit_source(name, params))
        target = self.id_attrs if against is None else against
        check_compatible(name, params, target, self.path(self.id_name) if against is None else "the scored cache",
                         reader.attrs, reader.path)
        return self.store.get(reader, name, params)

    def _values(self, reader, name, params, estimator):
        """``Scored`` of every row of the open cache ``reader``, block by block; a
        non-finite score on a usable row raises ScoreError naming the row."""
        values = score_cache(reader, name, estimator, params)
        keep = ~reader.read_all("skipped").astype(bool)
        bad = np.flatnonzero(~np.isfinite(values) & keep)
        if len(bad):
            paths = reader.read_all("paths")
            raise ScoreError(f"{name} gave {len(bad)} non-finite value(s) on {reader.path} (first: row "
                             f"{bad[0]}, {paths[bad[0]]}) with parameters {params or 'the defaults'}; "
                             "check the parameters (e.g. a temperature of 0) and the cache")
        return Scored(values, keep)

    def score_sets(self, name, params=None, datasets=None, estimator=None, against=None):
        """``{dataset: Scored}`` of score ``name`` with ``params`` on each cache of
        ``datasets`` (default: the ID cache): the one loop of the analysis.

        Fits the score (``estimator``; or uses the given one), checks each cache against the
        ID cache (or, with ``against``, the fit against the scored cache's attributes: a
        lone cache scored outside an analysis), scores it block by block and masks its
        skipped rows. Raises ScoreError for a non-finite value on a usable row and
        ConstantScore when every usable row of every set has one value; CacheError for
        caches that cannot be combined."""
        datasets = [self.id_name] if datasets is None else list(datasets)
        if estimator is None:
            estimator = self.estimator(name, params, against)
        out = {}
        for dataset in datasets:
            reader = self.reader(dataset)
            if dataset != self.id_name and against is None:
                check_compatible(name, params, self.id_attrs, self.path(self.id_name), reader.attrs, reader.path)
            out[dataset] = self._values(reader, name, params, estimator)
        check_not_constant(name, out, params, self._setting(name, params))
        return out

    def _setting(self, name, params):
        """The entry's description of its setting on the ID cache, or "" (``describe``)."""
        e = entry(name)
        if not e.describe:
            return ""
        try:
            return e.describe(e.resolve(params), self.id_attrs)
        except (KeyError, TypeError, ValueError, CacheError):
            return ""
