"""Hyperparameters chosen on validation data, as OpenOOD v1.5's automatic parameter search.

For every score with a sweep grid (its entry's ``grid``, per-layer ``layers=each`` tables
left out: those are ablations, not hyperparameters), each variant is scored on the ID
validation cache and on the OOD validation cache through the engine's two functions
(``Engine.score_sets``, ``metric_summary``), and the variant with the highest AUROC wins
(the first one on ties, as OpenOOD's ``Evaluator.hyperparam_search``); the entry's
defaults are always candidates, first. Test sets are never looked at.
"""
from gradood.store.reader import cache_path
from gradood.store.schema import CacheError

from .engine import Engine, is_crash, metric_summary
from .fitting import check_same_model
from .grids import candidates
from .registry import ScoreError, entry


def tune(cache_dir, id_name, id_val, ood_val, names, params=None, fit_on=None):
    """``{score: {"params", "auroc", "tried", "on"}}``: the chosen parameters of every score
    in ``names`` that has a grid, by AUROC of ``id_val`` against ``ood_val`` (cache names;
    "on" is ``(id_val, ood_val)``). Fits follow the engine's rule (``analyze.engine``). A
    variant these caches cannot serve, whose parameters are out of range or whose scores
    are constant, is skipped; a crash stops the tuning (``analyze.engine.is_crash``)."""
    params = params or {}
    out = {}
    check_same_model([cache_path(cache_dir, n) for n in (id_name, id_val, ood_val)], what="--tune-on")
    with Engine(cache_dir, id_name, fit_on) as engine:
        id_attrs, ood_attrs = engine.reader(id_val).attrs, engine.reader(ood_val).attrs
        for name in names:
            e = entry(name)
            if not e.grid:
                continue
            best, tried = None, 0
            for p in candidates(name, id_attrs, params.get(name)):
                if e.problems(ood_attrs, p):
                    continue
                try:
                    scored = engine.score_sets(name, p, [id_val, ood_val])
                except (CacheError, ScoreError) as err:      # a variant these caches cannot serve
                    if is_crash(err):
                        raise
                    continue
                auroc = metric_summary(scored, id_val, [ood_val], "sklearn")[ood_val]["AUROC"]
                tried += 1
                if best is None or auroc > best[1]:
                    best = (p, float(auroc))
            if best is not None:
                out[name] = {"params": best[0], "auroc": best[1], "tried": tried, "on": (id_val, ood_val)}
    return out
