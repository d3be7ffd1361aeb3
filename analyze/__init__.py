"""Analysis stage: scores, metrics and reports from caches, on CPU, without torch.

Nothing in this package imports torch, directly or indirectly (a test enforces it).
Inside it, imports run one way: compute (registry, scores, fitting, engine, evaluator,
sweep, tuning, checkpoints) -> data (``results``) -> text (``tables``) -> files
(``plots``, ``report``, ``output``); ``api`` is the door that joins them.

Public API (``from gradood import analyze``; see the README, "Python"):
    open_cache(path)                          a cache, read-only (context manager)
    score(cache_dir, dataset, name, **params) (N,) scores, higher = more in-distribution
    evaluation(cache_dir=..., id=..., ...)    an Evaluation (or evaluation(AnalysisRequest(...)))
    evaluate(cache_dir, id, scores, ...)      pandas.DataFrame of metrics (ci=95: intervals)
    compare(cache_dir, id, a, b, ...)         pandas.DataFrame of paired differences, DeLong p
    evaluate_checkpoints(cache_dirs, id, ...) pandas.DataFrame of mean and std over checkpoints
    to_markdown(result), to_latex(result), to_csv(result, path=None)
                                              an Evaluation, SweepResult or CheckpointsEvaluation as text
    to_html(result, path, gallery=8)          an Evaluation's (or SweepResult's) HTML report (plots extra)
    register_score(name, ...)                 decorator: add a score (function or class)
    load_plugin(path)                         import a file of register_score calls
    requirements(scores)                      (needs, passes) for gradood.extract.ExtractConfig
    CacheData                                 what a score function receives
    list_scores()                             {name: entry} of every registered score
"""
from .api import (checkpoint_evaluation, compare, evaluate, evaluate_checkpoints, evaluation, open_cache,
                  score)
from .data import CacheData
from .output import to_csv
from .registry import ScoreError, load_plugin, register_score, requirements
from .registry import all_entries as list_scores
from .report import to_html
from .request import AnalysisRequest
from .results import CheckpointsEvaluation, Evaluation, SweepResult
from .tables import paper_table, to_latex, to_markdown

__all__ = ["AnalysisRequest", "CacheData", "CheckpointsEvaluation", "Evaluation", "ScoreError", "SweepResult",
           "checkpoint_evaluation", "compare", "evaluate", "evaluate_checkpoints", "evaluation", "list_scores",
           "load_plugin", "open_cache", "paper_table", "register_score", "requirements", "score", "to_csv",
           "to_html", "to_latex", "to_markdown"]
