"""Typed results of the analysis: an ``Evaluation`` (``run_evaluation``, ``pipeline.py
analyze``, ``analyze.evaluation``) and a ``SweepResult`` (``run_sweep``), each with its
caption facts as attributes and the paper's table as a pandas DataFrame (``.table``),
Markdown, CSV and LaTeX (booktabs, the best value of each column in bold).

Metrics are fractions in [0, 1] in the attributes and percent in the tables.
"""
from dataclasses import asdict, dataclass, field
from typing import Optional

LOWER_IS_BETTER = ("FPR95", "DetErr")


def _escape(text):
    """``text`` with LaTeX's special characters escaped."""
    out = str(text)
    for char, repl in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                       ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}")):
        out = out.replace(char, repl)
    return out.replace(r"\textbackslash\{\}", r"\textbackslash{}")


def csv_text(header, rows, path=None):
    """CSV text of a table (header, rows); also written to ``path`` when given."""
    import csv
    import io
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    if path:
        with open(path, "w", newline="") as f:
            f.write(buf.getvalue())
    return buf.getvalue()


def latex_table(frame, caption="", label=""):
    """A booktabs ``table`` of ``frame`` (rows = methods, columns = a two-level
    (group, metric) MultiIndex of numbers in percent): the groups as spanning headers
    with ``\\cmidrule``s, two decimals, the best value of each column in bold (lowest for
    FPR95 / DetErr, highest otherwise; every tie bold)."""
    groups = list(dict.fromkeys(g for g, _ in frame.columns))
    spans = [[m for g2, m in frame.columns if g2 == g] for g in groups]
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{l" + "".join("r" * len(s) for s in spans) + "}", r"\toprule"]
    head, rules, at = ["Method"], [], 2
    for g, s in zip(groups, spans):
        head.append(rf"\multicolumn{{{len(s)}}}{{c}}{{{_escape(g)}}}")
        rules.append(rf"\cmidrule(lr){{{at}-{at + len(s) - 1}}}")
        at += len(s)
    lines += [" & ".join([""] + head[1:]) + r" \\", " ".join(rules)]
    arrows = {m: (r"$\downarrow$" if m in LOWER_IS_BETTER else r"$\uparrow$") for _, m in frame.columns}
    lines.append(" & ".join(["Method", *[_escape(m) + arrows[m] for _, m in frame.columns]]) + r" \\")
    lines.append(r"\midrule")
    rounded = frame.round(2)
    best = {c: (rounded[c].min() if c[1] in LOWER_IS_BETTER else rounded[c].max()) for c in frame.columns}
    for method, row in rounded.iterrows():
        cells = [_escape(method)]
        for c in frame.columns:
            text = f"{row[c]:.2f}"
            cells.append(rf"\textbf{{{text}}}" if row[c] == best[c] else text)
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines.append(rf"\caption{{{_escape(caption)}}}")
    if label:
        lines.append(rf"\label{{{label}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


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

    @property
    def caption(self):
        """The text under every table: sets, sample counts, convention, settings, skips."""
        from .report import caption
        return caption(self)

    @property
    def table(self):
        """The summary in the paper layout: a DataFrame indexed by method title, columns
        (OOD set, FPR95 / AUROC) for every set, then ("Average", each metric); percent."""
        import pandas as pd
        from .metrics import METRICS
        from .report import title
        columns = [(d, m) for d in self.ood for m in ("FPR95", "AUROC")] + [("Average", m) for m in METRICS]
        data = [[100 * res[d][m] for d, m in columns] for res in self.results.values()]
        return pd.DataFrame(data, index=pd.Index([title(n) for n in self.results], name="Method"),
                            columns=pd.MultiIndex.from_tuples(columns, names=["set", "metric"]))

    def frame(self):
        """One row per (score, set), columns ``score, ood, FPR95, AUROC, AUPR_IN, AUPR_OUT,
        DetErr`` (fractions), with ``<metric>_low`` / ``_high`` under ``--ci``: the layout
        ``analyze.evaluate`` returns."""
        import pandas as pd
        from .metrics import METRICS, column_name
        rows = []
        for name, per_set in self.results.items():
            for dataset, metrics in per_set.items():
                row = {"score": name, "ood": dataset, **{column_name(m): v for m, v in metrics.items()}}
                for m, (lo, hi) in self.intervals.get(name, {}).get(dataset, {}).items():
                    row[f"{m}_low"], row[f"{m}_high"] = lo, hi
                rows.append(row)
        columns = ["score", "ood", *[column_name(m) for m in METRICS]]
        if self.ci and self.intervals:
            columns += ["FPR95_low", "FPR95_high", "AUROC_low", "AUROC_high"]
        return pd.DataFrame(rows, columns=columns)

    def to_markdown(self):
        """The caption and the summary table (bootstrap intervals in brackets under ``--ci``)."""
        from .report import markdown, summary_table
        return f"{self.caption}\n\n{markdown(*summary_table(self))}\n"

    def to_csv(self, path=None):
        """``summary.csv``'s text (one number per cell, percent); written to ``path`` when given."""
        from .report import summary_csv_table
        return csv_text(*summary_csv_table(self), path)

    def to_latex(self, label="tab:ood"):
        """The summary as a booktabs LaTeX table, best per column in bold, the caption under it."""
        return latex_table(self.table, self.caption, label)

    def to_json(self):
        """The JSON-able part: everything but the per-row scores and paths."""
        out = asdict(self)
        out.pop("scores")
        out.pop("paths")
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
    not_stored: ``{score: {"count", "example"}}`` default-grid variants left out.
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

    @property
    def table(self):
        """DataFrame indexed by variant label (``*``: a published configuration), columns
        (set, FPR95 / AUROC) per reported set and ("Average", ...); percent, best first."""
        import pandas as pd
        columns = [(d, m) for d in self.reported for m in ("FPR95", "AUROC")] + [("Average", "FPR95"), ("Average", "AUROC")]
        data = [[100 * (r["average"] if d == "Average" else r["per_set"][d])[m] for d, m in columns] for r in self.rows]
        return pd.DataFrame(data, index=pd.Index([r["label"] + (" *" if r["paper"] else "") for r in self.rows],
                                                 name="Variant"),
                            columns=pd.MultiIndex.from_tuples(columns, names=["set", "metric"]))

    def to_markdown(self):
        """The sweep table as ``sweep.md`` prints it (without its caption)."""
        from .report import markdown
        from .sweep import sweep_table
        return markdown(*sweep_table(self)) + "\n"

    def to_csv(self, path=None):
        """``sweep.csv``'s text; written to ``path`` when given."""
        from .sweep import sweep_table
        return csv_text(*sweep_table(self), path)

    def to_latex(self, label="tab:sweep", top=None):
        """The ``top`` best variants as a booktabs LaTeX table, best per column in bold."""
        table = self.table if top is None else self.table.iloc[:top]
        return latex_table(table, f"Sweep on {self.id}; {self.n_variants} variants, ranked by {self.metric}.", label)

    def to_json(self):
        """Everything, JSON-able."""
        return asdict(self)


@dataclass
class CheckpointsEvaluation:
    """The same evaluation over several checkpoints (``analyze.checkpoints``).

    runs: one ``Evaluation`` per checkpoint folder (``cache_dirs``, in order); id, ood,
    convention as there; results: ``{score | "ensemble": {set | "Average": {metric:
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

    @property
    def table(self):
        """DataFrame indexed by method, columns (set, metric, "mean" / "std") for FPR95 and
        AUROC per OOD set and the Average; percent."""
        import pandas as pd
        from .report import title
        columns = [(d, m, k) for d in [*self.ood, "Average"] for m in ("FPR95", "AUROC") for k in ("mean", "std")]
        data = [[100 * res[d][m][k] for d, m, k in columns] for res in self.results.values()]
        return pd.DataFrame(data, index=pd.Index([title(n) for n in self.results], name="Method"),
                            columns=pd.MultiIndex.from_tuples(columns, names=["set", "metric", "stat"]))

    def to_markdown(self):
        """The caption and the mean ± std table."""
        from .report import checkpoints_caption, checkpoints_table, markdown
        return f"{checkpoints_caption(self)}\n\n{markdown(*checkpoints_table(self))}\n"
