"""Evaluating scores over an ID cache and OOD caches, and writing paper-style tables.

Tables: one per score (rows = OOD sets + Average, columns = METRICS in percent) and a
summary (rows = scores, columns = FPR95/AUROC per OOD set and the averages), printed and
written as CSV, JSON and Markdown. Every table names its metric convention.
"""
import csv
import json
import os

import numpy as np

from store.reader import CacheReader, cache_path
from store.recipes import missing_for
from store.schema import CacheError

from .metrics import METRICS, ood_metrics
from .scores import SCORE_TITLES, SCORES, compute_score, fit_score, fit_source, needs_fit


def check_compatible(id_attrs, id_path, attrs, path):
    """Refuse to compare caches with different fingerprints, naming the differing fields."""
    a, b = id_attrs["fingerprint"], attrs["fingerprint"]
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        raise CacheError(f"caches {id_path} and {path} come from different extractions "
                         f"(differing: {', '.join(diff)}); re-extract one of them with the "
                         "other's settings")


def load_scores(path, scores, allow_partial=False, params=None, fitted=None):
    """Scores of one cache: dict with ``values`` ({score: float64 (N,)}), ``paths`` (N,),
    ``skipped`` bool (N,), ``skip_reasons`` ({path: reason}), ``attrs`` and ``partial``.

    params: ``{score: {parameter: value}}``; fitted: ``{score: fitted arrays}`` for the
    fitted scores (``fit_score``).
    """
    params, fitted = params or {}, fitted or {}
    with CacheReader(path, allow_partial=allow_partial) as reader:
        skipped = reader.read_all("skipped").astype(bool)
        paths = reader.read_all("paths")
        reasons = reader.read_all("skip_reasons") if skipped.any() and reader.has("skip_reasons") else None
        return {"values": {s: compute_score(reader, s, fitted.get(s), **params.get(s, {})) for s in scores},
                "paths": paths, "skipped": skipped,
                "skip_reasons": {str(p): (str(reasons[i]) if reasons is not None else "unreadable")
                                 for i, p in enumerate(paths) if skipped[i]},
                "attrs": reader.attrs, "partial": reader.partial}


def unavailable_scores(cache_dir, id_name, scores, fit_on=None):
    """``{score: reason}`` for the scores the ID cache (or the training cache) cannot serve."""
    out = {}
    with CacheReader(cache_path(cache_dir, id_name), allow_partial=True) as reader:
        attrs = reader.attrs
    for score in scores:
        problems = missing_for(score, attrs)
        source = cache_path(cache_dir, fit_source(score, id_name, fit_on)) if needs_fit(score) else None
        if problems:
            out[score] = "; ".join(problems)
        elif source and not os.path.exists(source):
            out[score] = (f"needs the ID training cache {source} (extract it with --split train "
                          "--limit 1000 --balanced)")
        elif source and SCORES[score].fit_source == "validation":
            with CacheReader(source) as reader:
                if not (reader.attrs.get("mahalanobis") or {}).get("adversarial"):
                    out[score] = (f"the validation cache {source} has no pseudo-OOD copies "
                                  "(extract it with --maha-fit TRAIN_CACHE --maha-adversarial)")
    return out


def fit_all(cache_dir, id_name, scores, params=None, fit_on=None, fitted_dir=None, id_attrs=None):
    """Fit every fitted score in ``scores`` on the training cache: ``{score: arrays}``.

    The fitted arrays are saved as ``fitted_dir/<score>.npz`` with the training cache's
    fingerprint, sample count and the parameters; a later call with the same inputs loads
    them instead of refitting (so scoring a new OOD set does not refit).
    """
    params = params or {}
    todo = [s for s in scores if needs_fit(s)]
    if not todo:
        return {}
    out = {}
    for score in todo:
        train = cache_path(cache_dir, fit_source(score, id_name, fit_on, params.get(score)))
        with CacheReader(train) as reader:
            if id_attrs is not None:
                check_compatible(id_attrs, cache_path(cache_dir, id_name), reader.attrs, train)
            key = json.dumps({"train": os.path.abspath(train), "n": reader.n_samples,
                              "fingerprint": reader.attrs["fingerprint"],
                              "recipe": reader.attrs.get("mahalanobis"),
                              "params": params.get(score, {})}, sort_keys=True, default=str)
            file = os.path.join(fitted_dir, f"{score}.npz") if fitted_dir else None
            if file and os.path.exists(file):
                with np.load(file) as saved:
                    if str(saved["__key__"]) == key:
                        out[score] = {k: saved[k] for k in saved.files if k != "__key__"}
                        continue
            out[score] = fit_score(reader, score, **params.get(score, {}))
            if file:
                os.makedirs(fitted_dir, exist_ok=True)
                np.savez(file + ".tmp.npz", __key__=np.array(key), **out[score])
                os.replace(file + ".tmp.npz", file)
    return out


def evaluate(cache_dir, id_name, ood_names, scores, convention="sklearn", allow_partial=False,
             params=None, fit_on=None, fitted_dir=None):
    """Scores and metrics for the ID cache against each OOD cache in ``cache_dir``.

    params: optional ``{score: {parameter: value}}``. fit_on: training cache name for the
    fitted scores (default ``<id>_train``); fitted_dir: where fitted arrays are kept.
    Returns ``{"results": {score: {ood or "Average": {metric: value}}}, "scores":
    {dataset: {score: array}}, "paths": {dataset: array}, "skipped": {dataset: count},
    "skip_reasons": {dataset: {path: reason}}, "partial": [dataset...], "convention",
    "id"}``. Skipped (unreadable) images are left out of the metrics.
    """
    out = {"results": {}, "scores": {}, "paths": {}, "skipped": {}, "skip_reasons": {},
           "partial": [], "convention": convention, "id": id_name}
    keep = {}
    with CacheReader(cache_path(cache_dir, id_name), allow_partial=allow_partial) as reader:
        id_attrs = reader.attrs
    fitted = fit_all(cache_dir, id_name, scores, params, fit_on, fitted_dir, id_attrs)
    for name in [id_name, *ood_names]:
        loaded = load_scores(cache_path(cache_dir, name), scores, allow_partial, params, fitted)
        if name != id_name:
            check_compatible(id_attrs, cache_path(cache_dir, id_name),
                             loaded["attrs"], cache_path(cache_dir, name))
        out["scores"][name] = loaded["values"]
        out["paths"][name] = loaded["paths"]
        out["skipped"][name] = int(loaded["skipped"].sum())
        out["skip_reasons"][name] = loaded["skip_reasons"]
        if loaded["partial"]:
            out["partial"].append(name)
        keep[name] = ~loaded["skipped"]
    for score in scores:
        known = out["scores"][id_name][score][keep[id_name]]
        rows = {name: ood_metrics(known, out["scores"][name][score][keep[name]], convention)
                for name in ood_names}
        rows["Average"] = {m: float(np.mean([rows[n][m] for n in ood_names])) for m in METRICS}
        out["results"][score] = rows
    return out


def write_scores_csv(evaluation, out_dir):
    """``out_dir/<score>/<dataset>.csv`` with header ``index,path,score`` in dataset order."""
    for dataset, by_score in evaluation["scores"].items():
        for score, values in by_score.items():
            os.makedirs(os.path.join(out_dir, score), exist_ok=True)
            with open(os.path.join(out_dir, score, f"{dataset}.csv"), "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["index", "path", "score"])
                for i, (p, v) in enumerate(zip(evaluation["paths"][dataset], values)):
                    w.writerow([i, p, repr(float(v))])


def _pct(v):
    return f"{100 * v:.2f}"


def score_table(evaluation, score):
    """(header, rows) of one score's table; values in percent."""
    header = ["OOD set", "FPR95 ↓", "AUROC ↑", "AUPR-In ↑", "AUPR-Out ↑", "DetErr ↓"]
    rows = [[name, *[_pct(m[k]) for k in METRICS]] for name, m in evaluation["results"][score].items()]
    return header, rows


def summary_table(evaluation):
    """(header, rows): one row per score, FPR95/AUROC per OOD set and the averages."""
    any_score = next(iter(evaluation["results"]))
    oods = [n for n in evaluation["results"][any_score] if n != "Average"]
    header = ["Method", *[f"{n} FPR95/AUROC" for n in oods],
              "Avg FPR95 ↓", "Avg AUROC ↑", "Avg AUPR-In ↑", "Avg AUPR-Out ↑"]
    rows = []
    for score, res in evaluation["results"].items():
        avg = res["Average"]
        rows.append([SCORE_TITLES.get(score, score),
                     *[f"{_pct(res[n]['FPR95'])} / {_pct(res[n]['AUROC'])}" for n in oods],
                     _pct(avg["FPR95"]), _pct(avg["AUROC"]), _pct(avg["AUPR-In"]), _pct(avg["AUPR-Out"])])
    return header, rows


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def plain(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda r: "  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), "-" * (sum(widths) + 2 * len(widths) - 2), *map(fmt, rows)])


def caption(evaluation):
    conv = {"sklearn": "scikit-learn AUROC/AUPR, FPR95 at the ROC point with recall closest "
                       "to 95% (GradNorm release)",
            "gaia": "GAIA release: FPR95 at the ID score of rank round(0.05 n), trapezoidal "
                    "AUROC/AUPR"}[evaluation["convention"]]
    text = (f"ID = {evaluation['id']} (positive class). Metrics in %, {conv}; "
            "DetErr as GAIA computes it.")
    skipped = {k: v for k, v in evaluation["skipped"].items() if v}
    if skipped:
        text += " Skipped unreadable images: " + ", ".join(f"{k} {v}" for k, v in skipped.items()) + "."
    if evaluation["partial"]:
        text += " PARTIAL caches (unfinished extraction): " + ", ".join(evaluation["partial"]) + "."
    return text


def write_report(evaluation, out_dir):
    """Write per-score and summary tables (CSV, JSON, Markdown); returns the summary text."""
    os.makedirs(out_dir, exist_ok=True)
    cap = caption(evaluation)
    for score in evaluation["results"]:
        header, rows = score_table(evaluation, score)
        with open(os.path.join(out_dir, f"{score}.csv"), "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
        with open(os.path.join(out_dir, f"{score}.md"), "w") as f:
            f.write(f"### {SCORE_TITLES.get(score, score)}\n\n{cap}\n\n{markdown(header, rows)}\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"id": evaluation["id"], "convention": evaluation["convention"],
                   "skipped": evaluation["skipped"], "partial": evaluation["partial"],
                   "skipped_files": evaluation.get("skip_reasons", {}),
                   "results": evaluation["results"]}, f, indent=2)
    header, rows = summary_table(evaluation)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(f"{cap}\n\n{markdown(header, rows)}\n")
    with open(os.path.join(out_dir, "summary.csv"), "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return cap + "\n\n" + plain(header, rows)
