"""Hyperparameters chosen on validation data, as OpenOOD v1.5's automatic parameter search.

For every score with a sweep grid (its entry's ``grid``, per-layer ``layers=each`` tables
left out: those are ablations, not hyperparameters), each variant is scored on the ID
validation cache and on the OOD validation cache, and the variant with the highest AUROC
wins (the first one on ties, as OpenOOD's ``Evaluator.hyperparam_search``); the entry's
defaults are always candidates, first. Test sets are never looked at.
"""
import numpy as np
from sklearn.metrics import roc_auc_score

from gradood.store.reader import CacheReader, cache_path
from gradood.store.schema import CacheError

from .engine import Engine, is_crash
from .fitting import check_same_model
from .registry import ScoreError, entry
from .sweep import expand


def candidates(name, attrs, base=None):
    """Parameter dicts to try for score ``name``: the defaults (updated by ``base``), then
    the grid's variants, in grid order, those the cache with ``attrs`` can serve."""
    e = entry(name)
    base = dict(base or {})
    tables = [t for t in e.grid if "each" not in t.get("layers", [])]
    found = [base]
    for _, _, params in expand({name: tables}, attrs) if tables else []:
        p = {**base, **params}
        if p not in found and not e.problems(attrs, p):
            found.append(p)
    return found


def tune(cache_dir, id_name, id_val, ood_val, names, params=None, fit_on=None):
    """``{score: {"params", "auroc", "tried", "on"}}``: the chosen parameters of every score
    in ``names`` that has a grid, by AUROC of ``id_val`` against ``ood_val`` (cache names;
    "on" is ``(id_val, ood_val)``). Fits follow the engine's rule (``analyze.engine``). A
    variant these caches cannot serve, or whose parameters are out of range, is skipped;
    a crash stops the tuning (``analyze.engine.is_crash``)."""
    params = params or {}
    out = {}
    check_same_model([cache_path(cache_dir, n) for n in (id_name, id_val, ood_val)], what="--tune-on")
    engine = Engine(cache_dir, id_name, fit_on)
    with CacheReader(cache_path(cache_dir, id_val)) as iv, CacheReader(cache_path(cache_dir, ood_val)) as ov:
        for name in names:
            e = entry(name)
            if not e.grid:
                continue
            best, tried = None, 0
            for p in candidates(name, iv.attrs, params.get(name)):
                if e.problems(ov.attrs, p):
                    continue
                try:
                    est = engine.estimator(name, p)
                    known, keep_i = engine.values(iv, name, p, est)
                    novel, keep_o = engine.values(ov, name, p, est)
                except (CacheError, ScoreError) as err:      # a variant these caches cannot serve
                    if is_crash(err):
                        raise
                    continue
                known, novel = known[keep_i], novel[keep_o]
                auroc = roc_auc_score(np.r_[np.ones(len(known)), np.zeros(len(novel))], np.r_[known, novel])
                tried += 1
                if best is None or auroc > best[1]:
                    best = (p, float(auroc))
            if best is not None:
                out[name] = {"params": best[0], "auroc": best[1], "tried": tried, "on": (id_val, ood_val)}
    return out
