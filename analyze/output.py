"""Result folders: the one module that writes the analysis's files (Markdown, CSV, JSON,
figures), and the only CSV path.

A results folder always holds one consistent set, written atomically (``staged``):

* a run writes every file into a temporary sibling, ``.<folder>.writing-<pid>``;
* only when all of them are written does it move the earlier run's files (those listed
  in its manifest, ``results.json`` or ``sweep.json``, and any it would overwrite) to
  ``previous/<time of that run>/`` and its own files into place, with SIGINT and SIGTERM
  held for those few renames;
* a run that is interrupted or fails (a full disk) removes its temporary folder, leaves the
  results folder exactly as it was and says so; a temporary folder left by a killed
  process (``kill -9``) is removed by the next run;
* ``previous/`` keeps the ``KEEP_PREVIOUS`` (5) most recent earlier runs; older ones are
  deleted;
* fitted attributes (``fitted/``) are a cache, not results: they stay where they are.
"""
import contextlib
import json
import os
import shutil
import signal
import threading
import time

import numpy as np

from .plots import layer_contribution, method_comparison, roc_curves, score_histograms
from .report import GALLERY, report_problem, write_html, write_sweep_html
from .tables import (caption, checkpoints_caption, checkpoints_csv_table, checkpoints_table, comparison_table,
                     csv_text, grouped_table, markdown, openood_csv_rows, plain, score_table, summary_csv_table,
                     summary_table, sweep_caption, sweep_table, table_rows, title)

KEEP_PREVIOUS = 5       # earlier runs kept in previous/; older ones are deleted
_STAGE = ".{}.writing-"


def write_text(path, text):
    """Write ``text`` to ``path``; an OSError (a full disk) names the file."""
    try:
        with open(path, "w", newline="") as f:
            f.write(text)
    except OSError as err:
        if err.filename:
            raise
        raise OSError(err.errno, err.strerror or str(err), path) from None


def write_csv(path, header, rows):
    """Write a table (header, rows) as CSV to ``path``."""
    write_text(path, csv_text(header, rows))


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
    order; skipped (unreadable) rows have score ``nan`` and ``skipped`` 1. Written as one
    set (``staged``, manifest ``index.json``)."""
    with staged(out_dir, "index.json") as stage:
        files = []
        for dataset, by_score in evaluation.scores.items():
            skipped = set(evaluation.skip_reasons.get(dataset, {}))
            for name, values in by_score.items():
                os.makedirs(os.path.join(stage, name), exist_ok=True)
                rows = []
                for i, (p, v) in enumerate(zip(evaluation.paths[dataset], values)):
                    flag = str(p) in skipped
                    rows.append([i, p, "nan" if flag else repr(float(v)), int(flag)])
                write_csv(os.path.join(stage, name, f"{dataset}.csv"), ["index", "path", "score", "skipped"], rows)
                files.append(f"{name}/{dataset}.csv")
        _write_json(os.path.join(stage, "index.json"), {"id": evaluation.id, "files": sorted(set(files))})


def write_checkpoints_report(ce, out_dir):
    """Write ``summary.md``, ``summary.csv`` (mean and std columns) and ``results.json`` of a
    several-checkpoint evaluation into ``out_dir`` as one set (``staged``); returns the
    Stage (``text`` to print)."""
    cap = checkpoints_caption(ce)
    header, rows = checkpoints_table(ce)
    with staged(out_dir) as stage:
        write_text(os.path.join(stage, "summary.md"), f"{cap}\n\n{markdown(header, rows)}\n")
        write_csv(os.path.join(stage, "summary.csv"), *checkpoints_csv_table(ce))
        _write_json(os.path.join(stage, "results.json"), {**ce.to_json(), "files": ["summary.md", "summary.csv"]})
    stage.text = cap + "\n\n" + plain(header, rows) + stage.note
    return stage


def write_report(evaluation, out_dir, plots=False, gallery=GALLERY):
    """Write the evaluation's tables (per score and summary: CSV, Markdown, JSON), its HTML
    report (``report.html`` and ``report_files/``, ``analyze.report``; ``gallery`` images
    per gallery) and, with ``plots``, its figures (``plots/``) into ``out_dir`` as one set
    (``staged``); with csid sets the full-spectrum tables go to ``fsood/`` (the same
    files). Returns the Stage (``text`` to print: the standard tables, then the FS-OOD
    ones; ``figures`` written; ``report``: the report's path, or ``note`` why there is
    none: the plots extra is missing)."""
    with staged(out_dir) as stage:
        files, text = _write_tables(evaluation, stage)
        if evaluation.fsood:
            os.makedirs(os.path.join(stage, "fsood"))
            _, fs_text = _write_tables(evaluation.fsood, os.path.join(stage, "fsood"))
            files.append("fsood")
            text += "\n\n" + fs_text
        if plots:
            where = os.path.join(stage, "plots")
            stage.figures = (score_histograms(evaluation, where) + roc_curves(evaluation, where)
                             + method_comparison(evaluation, where))
            files.append("plots")
        missing = report_problem()
        if not missing:
            write_html(evaluation, os.path.join(stage, "report.html"), gallery)
            files += ["report.html", "report_files"]
        fs = evaluation.fsood
        _write_json(os.path.join(stage, "results.json"), {
            "id": evaluation.id, "ood": evaluation.ood, "convention": evaluation.convention,
            "fit_caches": evaluation.fit_caches, "settings": evaluation.settings,
            "skipped": evaluation.skipped, "partial": evaluation.partial,
            "skipped_files": evaluation.skip_reasons,
            "groups": evaluation.groups, "id_accuracy": evaluation.id_accuracy,
            "results": evaluation.results, "ci": evaluation.ci,
            "intervals": evaluation.intervals, "comparisons": evaluation.comparisons,
            "csid": evaluation.csid, "accuracy": evaluation.accuracy,
            "fsood": None if fs is None else {"id": fs.id, "id_accuracy": fs.id_accuracy, "results": fs.results,
                                              "intervals": fs.intervals, "comparisons": fs.comparisons},
            "files": files})
    stage.text = text + stage.note
    stage.report = "" if missing else os.path.join(out_dir, "report.html")
    stage.report_note = missing
    return stage


def _write_tables(evaluation, where):
    """Per-score, OpenOOD-shaped (``ood/``), summary and comparison tables of one
    evaluation into folder ``where``; returns (files written, relative; text to print)."""
    cap = caption(evaluation)
    files = []
    for name in evaluation.results:
        header, rows = score_table(evaluation, name)
        write_csv(os.path.join(where, f"{name}.csv"), header, rows)
        write_text(os.path.join(where, f"{name}.md"), f"### {title(name)}\n\n{cap}\n\n{markdown(header, rows)}\n")
        files += [f"{name}.csv", f"{name}.md"]
    os.makedirs(os.path.join(where, "ood"))
    for name in evaluation.results:
        ood_rows = openood_csv_rows(evaluation, name)
        write_csv(os.path.join(where, "ood", f"{name}.csv"), ood_rows[0], ood_rows[1:])
    header, rows = summary_table(evaluation)
    text = plain(header, rows)
    summary = f"{cap}\n\n{markdown(header, rows)}\n"
    if evaluation.groups:
        gh, gr = grouped_table(evaluation)
        summary += (f"\nNear-OOD and far-OOD (OpenOOD's grouping; averages are unweighted means over "
                    f"each group's sets):\n\n{markdown(gh, gr)}\n")
        text = plain(gh, gr) + "\n\n" + text
    write_text(os.path.join(where, "summary.md"), summary)
    for pair in evaluation.comparisons:
        ch, cr = comparison_table(evaluation, pair)
        stem = "compare_" + pair.replace(",", "_vs_")
        a, b = (title(s) for s in pair.split(","))
        write_text(os.path.join(where, f"{stem}.md"), f"### {a} vs {b}\n\n{cap}\n\n{markdown(ch, cr)}\n")
        write_csv(os.path.join(where, f"{stem}.csv"), ch, cr)
        files += [f"{stem}.md", f"{stem}.csv"]
        text += "\n\n" + plain(ch, cr)
    write_csv(os.path.join(where, "summary.csv"), *summary_csv_table(evaluation))
    files += ["summary.md", "summary.csv", "ood"]
    return files, cap + "\n\n" + text


def write_sweep(sweep, out_dir, plots=False):
    """Write ``sweep.md``, ``sweep.csv``, ``sweep.json`` and, with ``plots``, the per-layer
    charts into ``out_dir`` as one set (``staged``, manifest ``sweep.json``); returns the
    Stage (its ``figures`` list the charts, its ``note`` what moved to ``previous/``). The
    HTML report (``report.html``: the ranking table and the charts) is written beside them
    when the plots extra is installed (else ``report_note`` says so)."""
    header, rows = sweep_table(sweep)
    with staged(out_dir, "sweep.json") as stage:
        write_csv(os.path.join(stage, "sweep.csv"), header, rows)
        text = f"{sweep_caption(sweep)}\n\n{markdown(header, rows)}\n"
        if sweep.errors:
            text += "\nVariants the caches could not serve:\n\n" + "".join(
                f"- {e['label']}: {e['error']}\n" for e in sweep.errors)
        write_text(os.path.join(stage, "sweep.md"), text)
        stage.figures = layer_contribution(sweep, stage) if plots else []
        files = ["sweep.md", "sweep.csv", *(os.path.relpath(f, stage) for f in stage.figures)]
        files += [os.path.splitext(f)[0] + ".pdf" for f in files if f.endswith(".png")]
        stage.report_note = report_problem()
        if not stage.report_note:
            write_sweep_html(sweep, os.path.join(stage, "report.html"), stage.figures)
            files.append("report.html")
        _write_json(os.path.join(stage, "sweep.json"), {**sweep.to_json(), "files": files})
    return stage


def _write_json(path, value):
    write_text(path, json.dumps(value, indent=1, default=_json_default))


class Stage(str):
    """The temporary folder of a run being written (a ``str`` path); after the run is
    published, ``note`` says where the earlier run's files went, ``figures`` lists the
    figures written (final paths) and ``text`` is what the writer returns to print."""
    note = ""
    text = ""
    figures = ()
    report = ""
    report_note = ""


@contextlib.contextmanager
def staged(out_dir, manifest="results.json"):
    """Write a result folder atomically: yields a Stage, an empty temporary sibling of
    ``out_dir`` to write every file into (the ``manifest`` JSON, with its ``files`` list,
    among them). On success the earlier run's files move to ``previous/`` and the new ones
    into ``out_dir``; on any error or interrupt the stage is removed, ``out_dir`` is left as
    it was, and the error says so (an OSError names the file and the folder)."""
    out_dir = os.path.normpath(out_dir)
    parent, name = os.path.split(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    _remove_dead_stages(parent, name)
    stage = Stage(os.path.join(parent, _STAGE.format(name) + str(os.getpid())))
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    try:
        yield stage
    except KeyboardInterrupt as err:
        shutil.rmtree(stage, ignore_errors=True)
        raise KeyboardInterrupt(f"{err or 'interrupted'} while writing the results: nothing written, "
                                f"{out_dir}/ is left as it was") from None
    except OSError as err:
        shutil.rmtree(stage, ignore_errors=True)
        where = os.path.join(out_dir, os.path.relpath(err.filename, stage)) if err.filename else out_dir
        raise OSError(err.errno, f"could not write {where}: {err.strerror or err}; nothing written, "
                      f"{out_dir}/ is left as it was (free space or choose another --results and rerun)") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    stage.figures = [os.path.join(out_dir, os.path.relpath(f, stage)) for f in stage.figures]
    stage.note = _publish(stage, out_dir, manifest)


def _remove_dead_stages(parent, name):
    """Remove the temporary folders of ``name`` left by processes that no longer run."""
    prefix = _STAGE.format(name)
    for entry in os.listdir(parent):
        pid = entry[len(prefix):]
        if entry.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT and SIGTERM (delivered after the block) in the main thread."""
    held = threading.current_thread() is threading.main_thread()
    if held:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        if held:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _publish(stage, out_dir, manifest):
    """Move the earlier run's files to ``previous/`` and the stage's into ``out_dir``
    (the manifest last), remove the stage, bound ``previous/``; returns a note on what moved."""
    new = sorted(os.listdir(stage), key=lambda e: e == manifest)
    with _signals_held():
        os.makedirs(out_dir, exist_ok=True)
        moved, kept = _keep_previous(out_dir, manifest, new)
        for entry in new:
            os.replace(os.path.join(stage, entry), os.path.join(out_dir, entry))
        os.rmdir(stage)
    runs = sorted(os.listdir(os.path.join(out_dir, "previous"))) if kept else []
    for old in runs[:-KEEP_PREVIOUS]:
        shutil.rmtree(os.path.join(out_dir, "previous", old), ignore_errors=True)
    return f"\n\n(the previous run's {moved} files were moved to {kept}/)" if moved else ""


def _keep_previous(out_dir, manifest, new):
    """Move the files an earlier run listed in ``out_dir/manifest`` (and that manifest), and
    any other entry named like one of ``new``, into ``out_dir/previous/<time of that run>/``.
    Returns ``(number of files moved, folder)`` or ``(0, None)``."""
    listed = []
    path = os.path.join(out_dir, manifest)
    if os.path.exists(path):
        try:
            with open(path) as f:
                listed = list(json.load(f).get("files", []))
        except (OSError, ValueError, AttributeError):
            listed = []
    entries = [e for e in dict.fromkeys([*listed, *new, manifest])
               if e not in ("fitted", "previous", "") and os.path.lexists(os.path.join(out_dir, e))]
    if not entries:
        return 0, None
    when = os.path.getmtime(path) if os.path.exists(path) else time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(when))
    dest = os.path.join(out_dir, "previous", stamp)
    suffix = 1
    while os.path.exists(dest):
        suffix += 1
        dest = os.path.join(out_dir, "previous", f"{stamp}-{suffix}")
    moved = 0
    for rel in entries:
        src = os.path.join(out_dir, rel)
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        moved += sum(len(f) for _, _, f in os.walk(src)) if os.path.isdir(src) else 1
        shutil.move(src, os.path.join(dest, rel))
    return moved, dest


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)
