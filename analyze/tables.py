"""Text of the analysis: paper-style tables and captions of an ``Evaluation``, a
``SweepResult`` and a ``CheckpointsEvaluation`` (``analyze.results``), as Markdown, plain
text, CSV text and booktabs LaTeX, and the paper layout as a pandas DataFrame.

Tables: one per score (rows = OOD sets + Average, columns = METRICS in percent) and a
summary (rows = scores, columns = FPR95/AUROC per OOD set and the averages). Every table
names its ID set, its OOD sets, its fitting caches and its metric convention. Nothing
here writes a file (``analyze.output`` does).
"""
import csv
import io

from .metrics import METRICS
from .registry import entry
from .results import ENSEMBLE, CheckpointsEvaluation, Evaluation, SweepResult
from .uncertainty import FEW_ROWS, excludes_zero

WIDTH = 120
LOWER_IS_BETTER = ("FPR95", "DetErr")


def title(name):
    """Table title of a score."""
    try:
        return entry(name).title
    except ValueError:
        return name


def _pct(v):
    return f"{100 * v:.2f}"


def score_table(evaluation, name):
    """(header, rows) of one score's table; values in percent."""
    header = ["OOD set", "FPR95 ↓", "AUROC ↑", "AUPR-In ↑", "AUPR-Out ↑", "DetErr ↓"]
    rows = [[d, *[_pct(m[k]) for k in METRICS]] for d, m in evaluation.results[name].items()]
    return header, rows


def _cell(evaluation, name, dataset, metric):
    """A metric in percent, with its bootstrap interval ``[low, high]`` when the evaluation
    has intervals (``--ci``)."""
    text = _pct(evaluation.results[name][dataset][metric])
    ci = evaluation.intervals.get(name, {}).get(dataset, {}).get(metric)
    return text if ci is None else f"{text} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def summary_table(evaluation):
    """(header, rows): one row per score, FPR95/AUROC per OOD set and the averages (with
    ``[low, high]`` bootstrap intervals of FPR95 and AUROC under ``--ci``)."""
    oods = evaluation.ood
    header = ["Method", *[f"{n} FPR95/AUROC" for n in oods],
              "Avg FPR95 ↓", "Avg AUROC ↑", "Avg AUPR-In ↑", "Avg AUPR-Out ↑"]
    rows = []
    for name, res in evaluation.results.items():
        avg = res["Average"]
        rows.append([title(name), *[f"{_cell(evaluation, name, n, 'FPR95')} / {_cell(evaluation, name, n, 'AUROC')}"
                                    for n in oods],
                     _cell(evaluation, name, "Average", "FPR95"), _cell(evaluation, name, "Average", "AUROC"),
                     _pct(avg["AUPR-In"]), _pct(avg["AUPR-Out"])])
    return header, rows


def comparison_table(evaluation, pair):
    """(header, rows) of the paired comparison ``pair`` ("A,B"): per OOD set (and Average,
    group means) the differences A - B of AUROC and FPR95 in points, their bootstrap
    intervals and DeLong's p for AUROC; "*" marks an interval that excludes zero."""
    a, b = pair.split(",")
    level = evaluation.ci["level"]
    header = ["OOD set", f"ΔAUROC ({title(a)} − {title(b)})", f"{level:g}% CI", "DeLong p",
              "ΔFPR95", f"{level:g}% CI"]
    rows = []
    for d, row in evaluation.comparisons[pair].items():
        cells = [d]
        for m in ("AUROC", "FPR95"):
            lo, hi = row[m]
            mark = "*" if excludes_zero(row[m]) else ""
            cells += [f"{100 * row['difference'][m]:+.2f}{mark}", f"[{100 * lo:+.2f}, {100 * hi:+.2f}]"]
            if m == "AUROC":
                cells.append(f"{row['delong_p']:.2g}" if "delong_p" in row else "-")
        rows.append(cells)
    return header, rows


def uncertainty_caption(evaluation):
    """What the intervals are, for the text under tables with intervals or comparisons."""
    ci = evaluation.ci
    if not ci:
        return ""
    text = (f" Intervals: {ci['level']:g}% percentile bootstrap over samples ({ci['resamples']} "
            f"resamples, seed {ci['seed']}; ID and OOD resampled independently; Average over the "
            "resampled sets; FPR95 resampled by GAIA's rank rule, AUROC as Mann-Whitney); * = the "
            "interval of a difference excludes zero.")
    few = {d: evaluation.n_rows[d] - evaluation.skipped[d] for d in [evaluation.id, *evaluation.ood]}
    few = {d: n for d, n in few.items() if n < FEW_ROWS}
    if few:
        text += (f" WARNING: {', '.join(f'{d} has {n} row(s)' for d, n in few.items())}, fewer than "
                 f"{FEW_ROWS}; a bootstrap interval or DeLong's test on so few samples says little.")
    return text


def summary_csv_table(evaluation):
    """(header, rows) of ``summary.csv``: the summary table with one number per cell (metrics
    in %, two decimals), a column per (OOD set, metric), for spreadsheets and pandas."""
    oods = evaluation.ood
    header = ["method", *[f"{n} {m}" for n in oods for m in ("FPR95", "AUROC")],
              "average FPR95", "average AUROC", "average AUPR-In", "average AUPR-Out"]
    rows = []
    for name, res in evaluation.results.items():
        avg = res["Average"]
        rows.append([title(name), *[_pct(res[n][m]) for n in oods for m in ("FPR95", "AUROC")],
                     *[_pct(avg[m]) for m in ("FPR95", "AUROC", "AUPR-In", "AUPR-Out")]])
    if evaluation.intervals:         # --ci: low and high of each interval, same units
        spans = [*oods, "Average"]
        header += [f"{'average' if d == 'Average' else d} {m} {end}" for d in spans for m in ("FPR95", "AUROC")
                   for end in ("low", "high")]
        for row, name in zip(rows, evaluation.results):
            ci = evaluation.intervals[name]
            row += [_pct(ci[d][m][i]) for d in spans for m in ("FPR95", "AUROC") for i in (0, 1)]
    return header, rows


def grouped_table(evaluation):
    """(header, rows) in OpenOOD's layout: per score, near-OOD and far-OOD averages (FPR95,
    AUROC), then AUROC per set, near sets first; the ID accuracy is in the caption."""
    groups = evaluation.groups
    sets = [d for g in ("near", "far") for d in groups.get(g, [])]
    sets += [d for d in evaluation.ood if d not in sets]
    header = ["Method", "Near FPR95 ↓", "Near AUROC ↑", "Far FPR95 ↓", "Far AUROC ↑",
              *[f"{d} AUROC" for d in sets]]
    rows = []
    for name, res in evaluation.results.items():
        cells = [title(name)]
        for g in ("near", "far"):
            r = res.get(f"{g}ood")
            cells += [_pct(r["FPR95"]), _pct(r["AUROC"])] if r else ["-", "-"]
        rows.append(cells + [_pct(res[d]["AUROC"]) for d in sets])
    return header, rows


def openood_csv_rows(evaluation, name):
    """Rows of OpenOOD's per-method CSV (its evaluator's ``ood.csv`` shape): header
    ``dataset,FPR@95,AUROC,AUPR_IN,AUPR_OUT,ACC``, one row per near set, ``nearood``, one
    per far set, ``farood`` (ungrouped: every set and ``Average``); percent, 2 decimals."""
    res = evaluation.results[name]
    acc = "" if evaluation.id_accuracy is None else f"{100 * evaluation.id_accuracy:.2f}"
    order = []
    if evaluation.groups:
        for g in ("near", "far"):
            if evaluation.groups.get(g):
                order += [*evaluation.groups[g], f"{g}ood"]
    else:
        order = [*evaluation.ood, "Average"]
    rows = [["dataset", "FPR@95", "AUROC", "AUPR_IN", "AUPR_OUT", "ACC"]]
    for d in order:
        m = res[d]
        rows.append([d, *[f"{100 * m[k]:.2f}" for k in ("FPR95", "AUROC", "AUPR-In", "AUPR-Out")], acc])
    return rows


def markdown(header, rows):
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def plain(header, rows, width=WIDTH):
    """Plain-text table, split into several tables (each repeating the first column) when
    it would be wider than ``width`` characters."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    chunks, current, used = [], [], widths[0]
    for i in range(1, len(header)):
        if current and used + 2 + widths[i] > width:
            chunks.append(current)
            current, used = [], widths[0]
        current.append(i)
        used += 2 + widths[i]
    chunks.append(current)
    out = []
    for cols in chunks:
        idx = [0, *cols]
        ws = [widths[i] for i in idx]

        def fmt(r):
            return "  ".join(str(r[i]).ljust(w) if j == 0 else str(r[i]).rjust(w) for j, (i, w) in enumerate(zip(idx, ws)))
        out.append("\n".join([fmt(header), "-" * (sum(ws) + 2 * len(ws) - 2), *map(fmt, rows)]))
    return "\n\n".join(out)


CONVENTION_TEXT = {
    "sklearn": "ID positive, scikit-learn AUROC/AUPR, FPR95 at the ROC point with recall closest to 95% "
               "(GradNorm release)",
    "gaia": "ID positive, GAIA release: FPR95 at the ID score of rank round(0.05 n), trapezoidal AUROC/AUPR",
    "openood": "OpenOOD v1.5: OOD positive, FPR95 = ID samples flagged at 95% OOD recall, AUROC and "
               "AUPR by the trapezoid rule",
}


def caption(evaluation):
    """The text under every table: sets, sample counts, convention, settings, skips."""
    def count(d):
        n, k = evaluation.n_rows[d], evaluation.skipped[d]
        return f"{d} ({n - k} images" + (f", {k} skipped" if k else "") + ")"
    if evaluation.full_spectrum:
        base = evaluation.id[:-len("+csid")]
        text = (f"Full-spectrum OOD (FS-OOD, as OpenOOD v1.5's --fsood): ID = {count(evaluation.id)}, the ID "
                f"test set {base} followed by the covariate-shifted ID sets {', '.join(evaluation.csid)}")
    else:
        text = f"ID = {count(evaluation.id)}"
    if evaluation.id_accuracy is not None:
        text += f", classifier accuracy {100 * evaluation.id_accuracy:.2f}%"
    if evaluation.csid:
        per = [f"{d} {100 * a:.2f}%" for d, a in evaluation.accuracy.items() if a is not None]
        text += (("" if evaluation.full_spectrum else
                  f". Covariate-shifted ID sets: {', '.join(count(d) for d in evaluation.csid)}, counted as ID in "
                  "the FS-OOD tables only")
                 + (f"; accuracy per set: {', '.join(per)}" if per else ""))
    groups = evaluation.groups
    if groups:
        grouped = {d for g in groups.values() for d in g}
        other = [d for d in evaluation.ood if d not in grouped]
        parts = [f"{g}-OOD: " + ", ".join(count(d) for d in groups[g]) for g in ("near", "far") if groups.get(g)]
        parts += ["other OOD sets: " + ", ".join(count(d) for d in other)] if other else []
        text += ". " + "; ".join(parts) + "."
    else:
        text += ". OOD sets: " + ", ".join(count(d) for d in evaluation.ood) + "."
    if evaluation.fit_caches:
        text += " Fitted on: " + ", ".join(evaluation.fit_caches) + " (not OOD sets)."
    text += f" Metrics in %, {CONVENTION_TEXT[evaluation.convention]}; DetErr as GAIA computes it."
    if evaluation.settings:
        text += " Settings: " + "; ".join(f"{title(s)}: {t}" for s, t in evaluation.settings.items()) + "."
    text += uncertainty_caption(evaluation)
    if evaluation.partial:
        text += " PARTIAL caches (unfinished extraction): " + ", ".join(evaluation.partial) + "."
    return text


def _mean_std(cell):
    """"m ± s" in percent; a single value (the ensemble's) alone."""
    if len(cell["values"]) == 1:
        return f"{100 * cell['mean']:.2f}"
    return f"{100 * cell['mean']:.2f} ± {100 * cell['std']:.2f}"


def checkpoints_table(ce):
    """(header, rows) of a several-checkpoint evaluation (``analyze.checkpoints``): per
    score (and the deep ensemble) FPR95 / AUROC per OOD set and the averages, as
    mean ± std over the checkpoints, in percent."""
    header = ["Method", *[f"{d} FPR95 / AUROC" for d in ce.ood], "Avg FPR95 ↓", "Avg AUROC ↑"]
    rows = []
    for name, res in ce.results.items():
        label = "Deep ensemble (MSP of the mean softmax)" if name == ENSEMBLE else title(name)
        rows.append([label, *[f"{_mean_std(res[d]['FPR95'])} / {_mean_std(res[d]['AUROC'])}" for d in ce.ood],
                     _mean_std(res["Average"]["FPR95"]), _mean_std(res["Average"]["AUROC"])])
    return header, rows


def checkpoints_caption(ce):
    """The text under a several-checkpoint table."""
    first = ce.runs[0]
    acc = [r.id_accuracy for r in ce.runs]
    text = (f"ID = {first.id}; OOD sets: {', '.join(ce.ood)}. Mean ± std over {len(ce.runs)} "
            f"checkpoints ({', '.join(ce.cache_dirs)}); std over checkpoints with ddof 0.")
    if all(a is not None for a in acc):
        text += " Classifier accuracy per checkpoint: " + ", ".join(f"{100 * a:.2f}%" for a in acc) + "."
    if first.fit_caches:
        text += " Fitted per checkpoint on: " + ", ".join(first.fit_caches) + "."
    text += f" Metrics in %, {CONVENTION_TEXT[ce.convention]}."
    return text


def _escape(text):
    """``text`` with LaTeX's special characters escaped."""
    out = str(text)
    for char, repl in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                       ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}")):
        out = out.replace(char, repl)
    return out.replace(r"\textbackslash\{\}", r"\textbackslash{}")


def csv_text(header, rows):
    """CSV text of a table (header, rows)."""
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
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


def sweep_table(sweep, top=None):
    """(header, rows) of the sweep, best first; values in percent."""
    header = ["Rank", "Variant", *[f"{n} FPR95/AUROC" for n in sweep.reported],
              "Avg FPR95 ↓", "Avg AUROC ↑"]
    if sweep.select_on:
        header.insert(2, f"{sweep.select_on} {sweep.metric} (selection)")
    out = []
    for i, r in enumerate(sweep.rows[:top] if top else sweep.rows, 1):
        cells = [str(i), r["label"] + (" *" if r["paper"] else ""),
                 *[f"{100 * r['per_set'][n]['FPR95']:.2f} / {100 * r['per_set'][n]['AUROC']:.2f}"
                   for n in sweep.reported],
                 f"{100 * r['average']['FPR95']:.2f}", f"{100 * r['average']['AUROC']:.2f}"]
        if sweep.select_on:
            cells.insert(2, f"{100 * r['rank_value']:.2f}")
        out.append(cells)
    return header, out


def sweep_caption(sweep):
    """The text above a sweep's table: sets, variant count, ranking, selections, what was left out."""
    shifted = (f" followed by the covariate-shifted ID sets {', '.join(sweep.csid)} (full-spectrum OOD, as "
               "OpenOOD's --fsood)") if sweep.csid else ""
    cap = (f"ID = {sweep.id}{shifted}; OOD sets: {', '.join(sweep.reported)}. {sweep.n_variants} variants in "
           f"{sweep.seconds:.1f} s on {sweep.workers} processes, from the caches only. Sorted by "
           + (f"{sweep.metric} on the validation set {sweep.select_on} (left out of the "
              "averages)" if sweep.select_on else
              f"average {sweep.metric} on the test sets themselves (no validation set: a variant "
              "chosen from this ranking is tuned on its test data; --select-on SET ranks on a held-out "
              "OOD set instead)")
           + "; * marks the published configurations. Metrics in %, scikit-learn convention.")
    if sweep.selected:
        cap += " Selected per score: " + "; ".join(f"{entry(s).title}: {l}" for s, l in sweep.selected.items()) + "."
    if sweep.not_stored:
        cap += (" Not swept (the default grid's variants that need statistics these caches do not "
                "store; extract with --policy stats to sweep them): "
                + "; ".join(f"{entry(s).title} {v['count']} ({v['example']})" for s, v in sweep.not_stored.items())
                + ".")
    return cap


def paper_table(result):
    """The paper layout as a DataFrame, in percent.

    Evaluation: indexed by method title, columns (OOD set, FPR95 / AUROC) for every set,
    then ("Average", each metric). SweepResult: indexed by variant label (``*``: a
    published configuration), columns (set, FPR95 / AUROC) per reported set and
    ("Average", ...), best first. CheckpointsEvaluation: indexed by method, columns (set,
    metric, "mean" / "std") for FPR95 and AUROC per OOD set and the Average.
    """
    import pandas as pd
    if isinstance(result, Evaluation):
        columns = [(d, m) for d in result.ood for m in ("FPR95", "AUROC")] + [("Average", m) for m in METRICS]
        data = [[100 * res[d][m] for d, m in columns] for res in result.results.values()]
        index = pd.Index([title(n) for n in result.results], name="Method")
        names = ["set", "metric"]
    elif isinstance(result, SweepResult):
        columns = [(d, m) for d in result.reported for m in ("FPR95", "AUROC")] + [("Average", "FPR95"),
                                                                                   ("Average", "AUROC")]
        data = [[100 * (r["average"] if d == "Average" else r["per_set"][d])[m] for d, m in columns]
                for r in result.rows]
        index = pd.Index([r["label"] + (" *" if r["paper"] else "") for r in result.rows], name="Variant")
        names = ["set", "metric"]
    elif isinstance(result, CheckpointsEvaluation):
        columns = [(d, m, k) for d in [*result.ood, "Average"] for m in ("FPR95", "AUROC") for k in ("mean", "std")]
        data = [[100 * res[d][m][k] for d, m, k in columns] for res in result.results.values()]
        index = pd.Index([title(n) for n in result.results], name="Method")
        names = ["set", "metric", "stat"]
    else:
        raise TypeError(f"no paper table for a {type(result).__name__}")
    return pd.DataFrame(data, index=index, columns=pd.MultiIndex.from_tuples(columns, names=names))


def table_rows(result):
    """(header, rows) of the main table of ``result`` (what ``summary.csv`` / ``sweep.csv``
    hold: one number per cell for an evaluation, the printed cells otherwise)."""
    if isinstance(result, Evaluation):
        return summary_csv_table(result)
    if isinstance(result, SweepResult):
        return sweep_table(result)
    if isinstance(result, CheckpointsEvaluation):
        return checkpoints_csv_table(result)
    raise TypeError(f"no table for a {type(result).__name__}")


def to_markdown(result):
    """The caption and the main table of ``result`` as Markdown (bootstrap intervals in
    brackets under ``--ci``); a sweep's table without its caption."""
    if isinstance(result, Evaluation):
        return f"{caption(result)}\n\n{markdown(*summary_table(result))}\n"
    if isinstance(result, SweepResult):
        return markdown(*sweep_table(result)) + "\n"
    if isinstance(result, CheckpointsEvaluation):
        return f"{checkpoints_caption(result)}\n\n{markdown(*checkpoints_table(result))}\n"
    raise TypeError(f"no Markdown for a {type(result).__name__}")


def to_latex(result, label=None, top=None):
    """``result`` as a booktabs LaTeX table, the best value of each column in bold, the
    caption under it (a sweep: its ``top`` best variants)."""
    if isinstance(result, SweepResult):
        table = paper_table(result) if top is None else paper_table(result).iloc[:top]
        return latex_table(table, f"Sweep on {result.id}; {result.n_variants} variants, ranked by {result.metric}.",
                           label or "tab:sweep")
    if isinstance(result, Evaluation):
        return latex_table(paper_table(result), caption(result), label or "tab:ood")
    raise TypeError(f"no LaTeX table for a {type(result).__name__}")


def checkpoints_csv_table(ce):
    """(header, rows) of a several-checkpoint ``summary.csv``: mean and std columns per
    (set, metric), percent."""
    spans = [*ce.ood, "Average"]
    header = ["method", *[f"{d} {m} {k}" for d in spans for m in ("FPR95", "AUROC") for k in ("mean", "std")]]
    rows = [[name, *[f"{100 * res[d][m][k]:.2f}" for d in spans for m in ("FPR95", "AUROC") for k in ("mean", "std")]]
            for name, res in ce.results.items()]
    return header, rows
