"""Result folders: the one module that writes the analysis's files (Markdown, CSV, JSON),
and the only CSV path.

A results folder holds one consistent set: the files of an earlier run (listed in its
``results.json``) are moved to ``previous/<time of that run>/`` before the new set is
written; fitted attributes (``fitted/``) stay.
"""
import json
import os
import shutil
import time

import numpy as np

from .tables import (caption, checkpoints_caption, checkpoints_csv_table, checkpoints_table, comparison_table,
                     csv_text, grouped_table, markdown, openood_csv_rows, plain, score_table, summary_csv_table,
                     summary_table, sweep_caption, sweep_table, table_rows, title)


def write_csv(path, header, rows):
    """Write a table (header, rows) as CSV to ``path``."""
    with open(path, "w", newline="") as f:
        f.write(csv_text(header, rows))


def to_csv(result, path=None):
    """CSV text of the main table of ``result`` (an Evaluation: ``summary.csv``; a
    SweepResult: ``sweep.csv``; a CheckpointsEvaluation: its ``summary.csv``); written to
    ``path`` when given."""
    header, rows = table_rows(result)
    if path:
        write_csv(path, header, rows)
    return csv_text(header, rows)


def default_results_dir(cache_dirs):
    """Where an analysis of the cache folders ``cache_dirs`` writes by default:
    ``results/<folder name>``, or ``results/checkpoints-<name>-<name>...`` for several."""
    names = [os.path.basename(os.path.normpath(d)) for d in cache_dirs]
    return os.path.join("results", names[0] if len(names) == 1 else "checkpoints-" + "-".join(names))


def write_scores_csv(evaluation, out_dir):
    """``out_dir/<score>/<dataset>.csv`` with header ``index,path,score,skipped`` in dataset
    order; skipped (unreadable) rows have score ``nan`` and ``skipped`` 1."""
    for dataset, by_score in evaluation.scores.items():
        skipped = set(evaluation.skip_reasons.get(dataset, {}))
        for name, values in by_score.items():
            os.makedirs(os.path.join(out_dir, name), exist_ok=True)
            rows = []
            for i, (p, v) in enumerate(zip(evaluation.paths[dataset], values)):
                flag = str(p) in skipped
                rows.append([i, p, "nan" if flag else repr(float(v)), int(flag)])
            write_csv(os.path.join(out_dir, name, f"{dataset}.csv"), ["index", "path", "score", "skipped"], rows)


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
    write_csv(os.path.join(out_dir, "summary.csv"), *checkpoints_csv_table(ce))
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({**ce.to_json(), "files": ["summary.md", "summary.csv"]}, f, indent=2)
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
        write_csv(os.path.join(out_dir, f"{name}.csv"), header, rows)
        with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
            f.write(f"### {title(name)}\n\n{cap}\n\n{markdown(header, rows)}\n")
        files += [f"{name}.csv", f"{name}.md"]
    os.makedirs(os.path.join(out_dir, "ood"), exist_ok=True)
    for name in evaluation.results:
        ood_rows = openood_csv_rows(evaluation, name)
        write_csv(os.path.join(out_dir, "ood", f"{name}.csv"), ood_rows[0], ood_rows[1:])
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
        write_csv(os.path.join(out_dir, f"{stem}.csv"), ch, cr)
        files += [f"{stem}.md", f"{stem}.csv"]
        text += "\n\n" + plain(ch, cr)
    csv_header, csv_rows = summary_csv_table(evaluation)
    write_csv(os.path.join(out_dir, "summary.csv"), csv_header, csv_rows)
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


def write_sweep(sweep, out_dir):
    """Write ``sweep.md``, ``sweep.csv`` and ``sweep.json`` into ``out_dir``; returns the Markdown path."""
    os.makedirs(out_dir, exist_ok=True)
    header, rows = sweep_table(sweep)
    write_csv(os.path.join(out_dir, "sweep.csv"), header, rows)
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump(sweep.to_json(), f, indent=1, default=_json_default)
    path = os.path.join(out_dir, "sweep.md")
    with open(path, "w") as f:
        f.write(f"{sweep_caption(sweep)}\n\n{markdown(header, rows)}\n")
        if sweep.errors:
            f.write("\nVariants the caches could not serve:\n\n")
            f.writelines(f"- {e['label']}: {e['error']}\n" for e in sweep.errors)
    return path


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)
