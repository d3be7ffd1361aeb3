"""Typed results of the analysis, plain data: an ``Evaluation`` (``run_evaluation``,
``pipeline.py analyze``, ``analyze.evaluation``), a ``SweepResult`` (``run_sweep``) and a
``CheckpointsEvaluation`` (``analyze.checkpoints``).

Metrics are fractions in [0, 1]. Nothing here renders: tables and captions are
``analyze.tables`` (text), files are ``analyze.output``. The only views here are the
DataFrame of ``Evaluation.frame`` and ``to_json``.
"""
from dataclasses import asdict, dataclass, field
from typing import Optional

#: The deep-ensemble row of a ``CheckpointsEvaluation``.
ENSEMBLE = "ensemble"


def column_name(metric):
    """The DataFrame column of ``metric`` (a metric name without its hyphen: AUPR_IN)."""
    return metric.replace("-", "_").upper() if metric.startswith("AUPR") else metric


@dataclass
class Evaluation:
    """Scores and metrics of the ID test cache ``id`` against the OOD caches ``ood``.

    results: ``{score: {set | "Average" | "nearood" | "farood": {metric: fraction}}}``.
    scores: ``{dataset: {score: (N,) float64}}`` every row, skipped ones included;
    paths: ``{dataset: (N,) str}``; skipped / n_rows: ``{dataset: count}``;
    skip_reasons: ``{dataset: {path: reason}}``; partial: unfinished caches read;
    convention: the metric convention (``analyze.metrics.CONVENTIONS``); fit_caches: the
    caches fitted on (never OOD sets); settings: ``{score: text}`` of the settings that
    ran; groups: ``{"near": [set], "far": [set]}`` or None; id_accuracy: top-1 accuracy
    on the labelled ID rows or None; failed: ``{score: reason}`` left out (``--score
    all``); ci: ``{"level", "resamples", "seed"}`` or None; intervals: ``{score: {set:
    {metric: (low, high)}}}``; comparisons: ``{"A,B": {set: {...}}}``; tuned: ``{score:
    {"params", "auroc", "tried", "on"}}`` from validation tuning; notes: lines for the
    user (scores left out and why, tuned parameters).

    Full-spectrum OOD: csid: the covariate-shifted ID sets (scored; ``scores`` holds them);
    hits: ``{set: (correct, labelled)}`` of the ID test set and each csid set (``accuracy``
    derives from them); fsood: the full-spectrum ``Evaluation`` (its ``full_spectrum`` True,
    its ``id`` "<id>+csid", the ID test set's rows followed by each csid set's) or None.

    For reports: cache_dir: the folder of the caches.
    """
    id: str
    ood: list
    convention: str
    results: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    n_rows: dict = field(default_factory=dict)
    skip_reasons: dict = field(default_factory=dict)
    partial: list = field(default_factory=list)
    fit_caches: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    groups: Optional[dict] = None
    id_accuracy: Optional[float] = None
    failed: dict = field(default_factory=dict)
    ci: Optional[dict] = None
    intervals: dict = field(default_factory=dict)
    comparisons: dict = field(default_factory=dict)
    tuned: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    csid: list = field(default_factory=list)
    hits: dict = field(default_factory=dict)
    full_spectrum: bool = False
    fsood: Optional["Evaluation"] = None
    cache_dir: str = ""

    @property
    def accuracy(self):
        """``{set: fraction or None}``: the classifier's top-1 accuracy on the labelled rows
        of the ID test set and of each csid set (from ``hits``)."""
        return {d: correct / labelled if labelled else None for d, (correct, labelled) in self.hits.items()}

    def frame(self):
        """One row per (score, set), columns ``score, ood, FPR95, AUROC, AUPR_IN, AUPR_OUT,
        DetErr`` (fractions), with ``<metric>_low`` / ``_high`` under ``--ci``: the layout
        ``analyze.evaluate`` returns. With csid sets, a first column ``setting`` ("ood" for
        the standard rows, then "fsood" for the full-spectrum ones)."""
        import pandas as pd
        rows, metrics = [], []
        for part in ([self, self.fsood] if self.fsood else [self]):
            for name, per_set in part.results.items():
                for dataset, values in per_set.items():
                    metrics = metrics or list(values)
                    row = {"setting": "fsood" if part.full_spectrum else "ood", "score": name, "ood": dataset,
                           **{column_name(m): v for m, v in values.items()}}
                    for m, (lo, hi) in part.intervals.get(name, {}).get(dataset, {}).items():
                        row[f"{m}_low"], row[f"{m}_high"] = lo, hi
                    rows.append(row)
        columns = [*(["setting"] if self.fsood else []), "score", "ood", *[column_name(m) for m in metrics]]
        if self.ci and self.intervals:
            columns += ["FPR95_low", "FPR95_high", "AUROC_low", "AUROC_high"]
        return pd.DataFrame(rows, columns=columns)

    def to_json(self):
        """The JSON-able part: everything but the per-row scores and paths (the
        full-spectrum evaluation's likewise, under ``fsood``)."""
        fs, self.fsood = self.fsood, None
        try:
            out = asdict(self)
        finally:
            self.fsood = fs
        out.pop("scores")
        out.pop("paths")
        out["accuracy"] = self.accuracy
        out["fsood"] = fs.to_json() if fs else None
        return out


@dataclass
class SweepResult:
    """Every variant of a sweep (``analyze.sweep.run_sweep``).

    rows: the evaluated variants, best first (``{"label", "score", "params", "per_set":
    {set: {"FPR95", "AUROC"}}, "average", "rank_value", "paper", "seconds"}``); errors: the
    variants the caches could not serve (``{"label", "score", "params", "error", "kind"}``);
    reported: the OOD sets of the averages; select_on: the validation set ranked on or
    None; metric: the ranking metric; selected: ``{score: label}`` best on ``select_on``;
    seconds, n_variants, workers; id: the ID set; layer_order: ``{score: [layer]}``;
    not_stored: ``{score: {"count", "example"}}`` default-grid variants left out; csid:
    the covariate-shifted ID sets of a full-spectrum sweep (else empty).
    """
    rows: list
    errors: list
    reported: list
    select_on: Optional[str]
    metric: str
    selected: dict
    seconds: float
    n_variants: int
    workers: int
    id: str
    layer_order: dict = field(default_factory=dict)
    not_stored: dict = field(default_factory=dict)
    csid: list = field(default_factory=list)

    def to_json(self):
        """Everything, JSON-able."""
        return asdict(self)


@dataclass
class CheckpointsEvaluation:
    """The same evaluation over several checkpoints (``analyze.checkpoints``).

    runs: one ``Evaluation`` per checkpoint folder (``cache_dirs``, in order); id, ood,
    convention as there; results: ``{score | ENSEMBLE: {set | "Average": {metric:
    {"mean", "std", "values"}}}}`` (std over checkpoints, ddof 0); failed: ``{score:
    reason}`` left out on any checkpoint; notes: lines for the user.
    """
    runs: list
    cache_dirs: list
    id: str
    ood: list
    convention: str
    results: dict
    failed: dict
    notes: list = field(default_factory=list)

    def to_json(self):
        """The JSON-able summary (``results.json`` of a several-checkpoint run)."""
        return {"id": self.id, "ood": self.ood, "convention": self.convention, "cache_dirs": self.cache_dirs,
                "results": self.results, "failed": self.failed}
