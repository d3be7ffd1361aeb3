"""Analysis stage: scores, metrics and reports from caches, on CPU, without torch.

Nothing in this package imports torch, directly or indirectly (a test enforces it).

Public API (see the README, "From Python"):
    open_cache(path)                          a cache, read-only (context manager)
    score(cache_dir, dataset, name, **params) (N,) scores, higher = more in-distribution
    evaluate(cache_dir, id, scores, ...)      pandas.DataFrame of metrics (ci=95: intervals)
    compare(cache_dir, id, a, b, ...)         pandas.DataFrame of paired differences, DeLong p
    evaluate_checkpoints(cache_dirs, id, ...) pandas.DataFrame of mean and std over checkpoints
    register_score(name, ...)                 decorator: add a score (function or class)
    load_plugin(path)                         import a file of register_score calls
    requirements(scores)                      (needs, passes) for extract.ExtractConfig
    CacheData                                 what a score function receives
    list_scores()                             {name: entry} of every registered score
"""
from .api import compare, evaluate, evaluate_checkpoints, open_cache, score
from .data import CacheData
from .registry import ScoreError, load_plugin, register_score, requirements
from .registry import all_entries as list_scores

__all__ = ["compare", "evaluate", "evaluate_checkpoints", "open_cache", "score", "CacheData", "ScoreError", "load_plugin",
           "register_score", "requirements", "list_scores"]
