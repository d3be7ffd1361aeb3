"""Paper-style tables of an evaluation (``analyze.evaluation.run_evaluation``), printed
and written as CSV, JSON and Markdown.

Tables: one per score (rows = OOD sets + Average, columns = METRICS in percent) and a
summary (rows = scores, columns = FPR95/AUROC per OOD set and the averages). Every table
names its ID set, its OOD sets, its fitting caches and its metric convention. A results
folder holds one consistent set: files of an earlier run (listed in ``results.json``)
that this run does not write are removed, except fitted attributes (``fitted/``).
"""
import csv
import json
import os
import shutil
import time

from .metrics import METRICS
from .registry import entry

WIDTH = 120


def default_results_dir(cache_dirs):
    """Where an analysis of the cache folders ``cache_dirs`` writes by default:
    ``results/<folder name>``, or ``results/checkpoints-<name>-<name>...`` for several."""
    names = [os.path.basename(os.path.normpath(d)) for d in cache_dirs]
    return os.path.join("results", names[0] if len(names) == 1 else "checkpoints-" + "-".join(names))


def title(name):
    """Table title of a score."""
    try:
        return entry(name).title
    except ValueError:
        return name


def write_scores_csv(evaluation, out_dir):
    """``out_dir/<score>/<dataset>.csv`` with header ``index,path,score,skipped`` in dataset
    order; skipped (unreadable) rows have score ``nan`` and ``skipped`` 1."""
    for dataset, by_score in evaluation.scores.items():
        skipped = set(evaluation.skip_reasons.get(dataset, {}))
        for name, values in by_score.items():
            os.makedirs(os.path.join(out_dir, name), exist_ok=True)
            with open(os.path.join(out_dir, name, f"{dataset}.csv"), "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["index", "path", "score", "skipped"])
                for i, (p, v) in enumerate(zip(evaluation.paths[dataset], values)):
                    flag = str(p) in skipped
                    w.writerow([i, p, "nan" if flag else repr(float(v)), int(flag)])


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
    from .uncertainty import excludes_zero
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
    return (f" Intervals: {ci['level']:g}% percentile bootstrap over samples ({ci['resamples']} "
            f"resamples, seed {ci['seed']}; ID and OOD resampled independently; Average over the "
            "resampled sets; FPR95 resampled by GAIA's rank rule, AUROC as Mann-Whitney); * = the "
            "interval of a difference excludes zero.")


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
    text = f"ID = {count(evaluation.id)}"
    if evaluation.id_accuracy is not None:
        text += f", classifier accuracy {100 * evaluation.id_accuracy:.2f}%"
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
    from .checkpoints import ENSEMBLE
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


def write_checkpoints_report(ce, out_dir):
    """Write ``summary.md``, ``summary.csv`` (mean and std columns) and ``results.json`` of a
    several-checkpoint evaluation into ``out_dir`` (an earlier run's files are moved to
    ``previous/``); returns the text to print."""
    os.makedirs(out_dir, exist_ok=True)
    moved, kept = _keep_previous(out_dir)
    cap = checkpoints_caption(ce)
    header, rows = checkpoints_table(ce)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(f"{cap}\n\n{markdown(header, rows)}\n")
    spans = [*ce.ood, "Average"]
    with open(os.path.join(out_dir, "summary.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", *[f"{d} {m} {k}" for d in spans for m in ("FPR95", "AUROC") for k in ("mean", "std")]])
        for name, res in ce.results.items():
            w.writerow([name, *[f"{100 * res[d][m][k]:.2f}" for d in spans for m in ("FPR95", "AUROC")
                                for k in ("mean", "std")]])
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"id": ce.id, "ood": ce.ood, "convention": ce.convention, "cache_dirs": ce.cache_dirs,
                   "results": ce.results, "failed": ce.failed,
                   "files": ["summary.md", "summary.csv"]}, f, indent=2)
    note = f"\n\n(the previous run's {moved} files were moved to {kept}/)" if moved else ""
    return cap + "\n\n" + plain(header, rows) + note


def _keep_previous(out_dir):
    """Move the files an earlier run listed in ``results.json`` (and that manifest) into
    ``out_dir/previous/<time of that run>/``, so a new run's set is consistent and nothing
    is lost (fitted attributes stay). Returns ``(number of files moved, folder)`` or
    ``(0, None)``."""
    manifest = os.path.join(out_dir, "results.json")
    if not os.path.exists(manifest):
        return 0, None
    try:
        with open(manifest) as f:
            files = json.load(f).get("files", [])
    except (OSError, ValueError):
        files = []
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(manifest)))
    dest = os.path.join(out_dir, "previous", stamp)
    suffix = 1
    while os.path.exists(dest):
        suffix += 1
        dest = os.path.join(out_dir, "previous", f"{stamp}-{suffix}")
    moved = 0
    for rel in [*files, "results.json"]:
        path = os.path.join(out_dir, rel)
        if rel in ("fitted", "previous", "") or not os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        moved += sum(len(f) for _, _, f in os.walk(path)) if os.path.isdir(path) else 1
        shutil.move(path, os.path.join(dest, rel))
    return moved, dest


def write_report(evaluation, out_dir, extra_files=()):
    """Write per-score and summary tables (CSV, JSON, Markdown) into ``out_dir`` after
    moving an earlier run's files to ``previous/<its time>/`` (``_keep_previous``); returns
    the text to print. extra_files: paths (relative to out_dir) written besides, e.g.
    plots, listed in the manifest."""
    os.makedirs(out_dir, exist_ok=True)
    moved, kept = _keep_previous(out_dir)
    cap = caption(evaluation)
    files = []
    for name in evaluation.results:
        header, rows = score_table(evaluation, name)
        with open(os.path.join(out_dir, f"{name}.csv"), "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
        with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
            f.write(f"### {title(name)}\n\n{cap}\n\n{markdown(header, rows)}\n")
        files += [f"{name}.csv", f"{name}.md"]
    os.makedirs(os.path.join(out_dir, "ood"), exist_ok=True)
    for name in evaluation.results:
        with open(os.path.join(out_dir, "ood", f"{name}.csv"), "w", newline="") as f:
            csv.writer(f).writerows(openood_csv_rows(evaluation, name))
    header, rows = summary_table(evaluation)
    text = plain(header, rows)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(f"{cap}\n\n{markdown(header, rows)}\n")
        if evaluation.groups:
            gh, gr = grouped_table(evaluation)
            f.write(f"\nNear-OOD and far-OOD (OpenOOD's grouping; averages are unweighted means over "
                    f"each group's sets):\n\n{markdown(gh, gr)}\n")
            text = plain(gh, gr) + "\n\n" + text
    for pair in evaluation.comparisons:
        ch, cr = comparison_table(evaluation, pair)
        stem = "compare_" + pair.replace(",", "_vs_")
        with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
            f.write(f"### {title(pair.split(',')[0])} vs {title(pair.split(',')[1])}\n\n{cap}\n\n{markdown(ch, cr)}\n")
        with open(os.path.join(out_dir, f"{stem}.csv"), "w", newline="") as f:
            csv.writer(f).writerows([ch, *cr])
        files += [f"{stem}.md", f"{stem}.csv"]
        text += "\n\n" + plain(ch, cr)
    csv_header, csv_rows = summary_csv_table(evaluation)
    with open(os.path.join(out_dir, "summary.csv"), "w", newline="") as f:
        csv.writer(f).writerows([csv_header, *csv_rows])
    files += ["summary.md", "summary.csv", "ood", *extra_files]
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"id": evaluation.id, "ood": evaluation.ood, "convention": evaluation.convention,
                   "fit_caches": evaluation.fit_caches, "settings": evaluation.settings,
                   "skipped": evaluation.skipped, "partial": evaluation.partial,
                   "skipped_files": evaluation.skip_reasons,
                   "groups": evaluation.groups, "id_accuracy": evaluation.id_accuracy,
                   "results": evaluation.results, "ci": evaluation.ci,
                   "intervals": evaluation.intervals, "comparisons": evaluation.comparisons,
                   "files": files}, f, indent=2)
    note = f"\n\n(the previous run's {moved} files were moved to {kept}/)" if moved else ""
    return cap + "\n\n" + text + note
