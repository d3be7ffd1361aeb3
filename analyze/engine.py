"""The analysis engine: the one place that, for a score and its parameters, names the cache
it is fitted on, decides whether the caches can serve it, fits it (or reuses a saved fit)
and scores a cache block by block with its skipped rows masked.

Every door goes through it: ``run_evaluation`` (``pipeline.py analyze`` and
``analyze.evaluate``), ``analyze.score``, the sweep's variants, the validation tuning and
the checkpoint tables. None of them re-implements a step.

The fitting-cache rule (stated once, here and in the README):

* a score fitted on training data (entry ``fit_on="train"``) is fitted on ``fit_on`` when
  given (``--fit-on``), else on ``<id>_train``, ``id`` being the ID test set of the
  analysis;
* a score fitted on validation data (``fit_on="validation"``) is fitted on its
  ``validation`` parameter, else on the ID test cache itself;
* unfitted scores have no fitting cache.

Library code: raises, never prints.
"""
import os
from contextlib import contextmanager

import numpy as np

from gradood.store.benchmarks import train_cache_name
from gradood.store.reader import CacheReader, cache_path
from gradood.store.recipes import missing as lacks
from gradood.store.schema import CacheError

from .fitting import FitStore, check_compatible, score_cache
from .registry import ScoreCrash, ScoreError, entry


def is_crash(err):
    """True when ``err`` (raised while fitting or scoring) is a bug, not a limit of the caches
    or the parameters: anything but CacheError / ScoreError, or a ScoreCrash whose cause is
    not a ValueError (a ValueError from ``fit`` names a parameter out of range)."""
    if not isinstance(err, (CacheError, ScoreError)):
        return True
    if isinstance(err, ScoreCrash):
        return not isinstance(err.__cause__, ValueError)
    return False


class Engine:
    """The caches of one analysis: the folder ``cache_dir``, its ID test set ``id_name``.

    fit_on: the training cache of training-fitted scores (default ``<id>_train``).
    fitted_dir: where fits are saved and reused (``FitStore``; None: never saved).
    allow_partial: read the finished rows of unfinished caches. readers: ``{name: open
    reader}`` used instead of opening those files (a sweep keeps its caches in memory).
    """

    def __init__(self, cache_dir, id_name, fit_on=None, fitted_dir=None, allow_partial=False, readers=None):
        self.cache_dir, self.id_name, self.fit_on = cache_dir, id_name, fit_on
        self.allow_partial = allow_partial
        self.store = FitStore(fitted_dir)
        self.readers = dict(readers or {})
        self._id_attrs = None

    # ------------------------------------------------------------------ caches
    def path(self, dataset):
        """Path of cache ``dataset``."""
        return cache_path(self.cache_dir, dataset)

    @contextmanager
    def open(self, dataset, allow_partial=None):
        """An open reader of cache ``dataset`` (one of ``readers`` when given there)."""
        if dataset in self.readers:
            yield self.readers[dataset]
            return
        partial = self.allow_partial if allow_partial is None else allow_partial
        with CacheReader(self.path(dataset), allow_partial=partial) as reader:
            yield reader

    @property
    def id_attrs(self):
        """Root attributes of the ID test cache."""
        if self._id_attrs is None:
            with self.open(self.id_name, allow_partial=True) as reader:
                self._id_attrs = reader.attrs
        return self._id_attrs

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
        if source and e.fit_on == "validation" and "mahalanobis" in e.passes:
            with self.open(source, allow_partial=True) as reader:
                if not (reader.attrs.get("mahalanobis") or {}).get("adversarial"):
                    return (f"the validation cache {reader.path} has no pseudo-OOD copies (extract it "
                            "with --maha-fit TRAIN_CACHE --maha-adversarial)")
        for dataset in datasets:
            if dataset == self.id_name:
                continue
            with self.open(dataset, allow_partial=True) as reader:
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
        source = self.fit_source(name, params)
        with self.open(source) as reader:
            target = self.id_attrs if against is None else against
            check_compatible(name, params, target, self.path(self.id_name) if against is None else "the scored cache",
                             reader.attrs, reader.path)
            return self.store.get(reader, name, params)

    def values(self, reader, name, params=None, estimator=None):
        """``(scores (N,) float64, usable (N,) bool)`` of every row of the open cache
        ``reader``, block by block; ``usable`` is False for skipped (unreadable) rows, which
        must be finite nowhere else: a non-finite score on a usable row raises ScoreError."""
        estimator = self.estimator(name, params, reader.attrs) if estimator is None else estimator
        values = score_cache(reader, name, estimator, params)
        keep = ~reader.read_all("skipped").astype(bool)
        bad = np.flatnonzero(~np.isfinite(values) & keep)
        if len(bad):
            paths = reader.read_all("paths")
            raise ScoreError(f"{name} gave {len(bad)} non-finite value(s) on {reader.path} (first: row "
                             f"{bad[0]}, {paths[bad[0]]}) with parameters {params or 'the defaults'}; "
                             "check the parameters (e.g. a temperature of 0) and the cache")
        return values, keep
