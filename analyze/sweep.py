"""Sweeps: many variants of the scores evaluated from the caches alone, on all CPU cores.

A variant is a score name plus parameters (``analyze.scores``, ``analyze.nac``,
``analyze.feature_scores``). A grid gives, per score, lists of values whose product is
swept; the special ``layers`` values are ``all`` (the score's default layers), ``each``
(every layer of the score's hook set on its own: the per-layer contribution) or names
joined by ``+``. NAC's ``M``, ``O`` and ``alpha`` apply to every layer of the variant.

Grids come from TOML (one table per score) or the command line
(``gaia_z:spatial=nonzero,mean;channel=sq_mean,l2;layers=all,each``). ``PAPER_VARIANTS``
are always added so every table shows where the published choice stands.
"""
import itertools
import json
import os
import time
import tomllib
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from store.reader import CacheReader, cache_path

from .metrics import ood_metrics
from .nac import AVGPOOL
from .scores import SCORE_TITLES, SCORES, compute_score, fit_score, fit_source, needs_fit

# The published configurations, by label.
PAPER_VARIANTS = {
    "GAIA-Z (paper)": ("gaia_z", {}),
    "GAIA-A (paper)": ("gaia_a", {}),
    "NAC-UE (paper, CIFAR-10 config)": ("nac", {}),
    "GradNorm (paper)": ("gradnorm", {}),
    "MSP": ("msp", {}), "Energy (T=1)": ("energy", {}),
    "ODIN (recorded pair)": ("odin", {}),
    "Mahalanobis": ("mahalanobis", {}), "ReAct (p=90)": ("react", {}),
    "ASH-S (p=90)": ("ash", {}), "KNN (k=50)": ("knn", {}), "ViM (paper dim)": ("vim", {}),
}

DEFAULT_GRID = {
    "gaia_z": [
        {"layers": ["all"], "objective": ["max_logit", "log_softmax_sum", "feature_sum"],
         "spatial": ["nonzero", "mean", "l1", "l2", "max"],
         "channel": ["sq_mean", "mean", "l1", "l2", "max"]},
        {"layers": ["each"]},
    ],
    "gaia_a": [
        {"layers": ["all"], "spatial": ["mean", "l1", "l2", "max", "nonzero"],
         "channel": ["sq_mean", "mean", "l1", "l2", "max"]},
        {"layers": ["each"]},
    ],
    "nac": [
        {"layers": ["each"], "M": [10, 50, 500], "O": [1, 5, 50], "alpha": [0.001, 1, 100, 1000]},
    ],
    "energy": [{"temperature": [1, 10, 100, 1000]}],
    "react": [{"percentile": [70, 80, 85, 90, 95, 99]}],
    "ash": [{"variant": ["ash_s", "ash_b", "ash_p"], "percentile": [65, 80, 90, 95]}],
    "knn": [{"k": [1, 5, 10, 50, 100]}],
    "vim": [{"dim": [16, 64, 128, 256]}],
}


def parse_grid_text(items):
    """``{score: [table]}`` from command-line grids ``score:key=v1,v2;key=v3``."""
    grid = {}
    for item in items:
        score, sep, body = item.partition(":")
        if score not in SCORES:
            raise ValueError(f"--grid {item!r}: unknown score {score!r}; choose one of: {', '.join(SCORES)}")
        table = {}
        for part in filter(None, body.split(";")):
            key, eq, values = part.partition("=")
            if not eq:
                raise ValueError(f"--grid {item!r}: expected key=v1,v2 in {part!r}")
            table[key.strip()] = [_value(v) for v in values.split(",")]
        grid.setdefault(score, []).append(table)
    return grid


def _value(text):
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        return text


def load_grid_file(path):
    """``{score: [table]}`` from a TOML file: ``[score]`` tables or ``[[score]]`` arrays of tables."""
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    grid = {}
    for score, tables in raw.items():
        if score not in SCORES:
            raise ValueError(f"{path}: unknown score table [{score}]; choose from: {', '.join(SCORES)}")
        for table in tables if isinstance(tables, list) else [tables]:
            grid.setdefault(score, []).append({k: v if isinstance(v, list) else [v] for k, v in table.items()})
    return grid


def _score_layers(score, attrs):
    sets = attrs["hook_sets"]
    if score == "gaia_z":
        return sets.get("bn", [])
    if score == "gaia_a":
        return sets.get("before_head", [])[:-1]
    if score == "nac":
        return [AVGPOOL, *sets.get("nac", [])]
    return []


def expand(grid, attrs):
    """List of ``(label, score, params)`` variants of ``grid`` for a cache with ``attrs``."""
    out = []
    for score, tables in grid.items():
        for table in tables:
            keys = list(table)
            for combo in itertools.product(*(table[k] for k in keys)):
                for params in _layer_params(score, dict(zip(keys, combo)), attrs):
                    label = f"{SCORE_TITLES[score]} " + ", ".join(
                        f"{k}={'+'.join(v) if isinstance(v, list) else v}" for k, v in params.items()
                        if k != "hyper")
                    call = {k: v for k, v in params.items() if k not in ("M", "O", "alpha")}
                    out.append((label.strip(), score, call))
    return out


def _layer_params(score, params, attrs):
    layers = params.pop("layers", "all")
    nac_h = {k: params.pop(k) for k in ("M", "O", "alpha") if k in params} if score == "nac" else {}
    if layers == "all":
        choices = [None]
    elif layers == "each":
        choices = [[l] for l in _score_layers(score, attrs)]
    else:
        choices = [layers.split("+") if isinstance(layers, str) else list(layers)]
    for chosen in choices:
        p = dict(params)
        if chosen is not None:
            p["layers"] = chosen
        if nac_h:
            names = chosen or [AVGPOOL]
            p["hyper"] = {l: (nac_h.get("M", 50), nac_h.get("O", 50), nac_h.get("alpha", 100.0)) for l in names}
            p.update({k: v for k, v in nac_h.items()})
        yield p


class MemoReader:
    """A CacheReader whose datasets are read whole once and then served from memory.

    Sweeps read the same few datasets hundreds of times; datasets larger than
    ``max_bytes`` are read from the file each time.
    """

    def __init__(self, path, max_bytes=256 << 20):
        self._reader = CacheReader(path)
        self.path, self.attrs, self.n_samples = path, self._reader.attrs, self._reader.n_samples
        self.partial = False
        self._memo, self._max = {}, max_bytes

    def read(self, name, start=0, stop=None):
        stop = self.n_samples if stop is None else stop
        if name not in self._memo:
            ds = self._reader._file[name] if self._reader._file is not None else None
            if ds is not None and ds.size * ds.dtype.itemsize > self._max:
                return self._reader.read(name, start, stop)
            self._memo[name] = self._reader.read(name) if name.startswith("head/") else self._reader.read_all(name)
        value = self._memo[name]
        return value if name.startswith("head/") else value[start:stop]

    def read_all(self, name):
        return self.read(name)

    def blocks(self, rows=1 << 30):
        yield 0, self.n_samples

    def head(self):
        return self.read("head/weight").astype(np.float64), self.read("head/bias").astype(np.float64)

    def has(self, name):
        return self._reader.has(name)


_STATE = {}


def _init_worker(paths, train_path):
    _STATE["readers"] = {name: MemoReader(p) for name, p in paths.items()}
    _STATE["train"] = MemoReader(train_path) if train_path else None


def _evaluate_variant(args):
    label, score, params, id_name, ood_names = args
    readers = _STATE["readers"]
    start = time.perf_counter()
    try:
        fitted = None
        if needs_fit(score):
            source = _STATE["train"]
            if SCORES[score].fit_source == "validation":
                name = fit_source(score, id_name, None, params)
                if name not in readers:
                    raise ValueError(f"validation cache {name!r} is not among the swept caches")
                source = readers[name]
            fitted = fit_score(source, score, **params)
        values = {n: compute_score(readers[n], score, fitted, **params) for n in [id_name, *ood_names]}
    except Exception as err:   # a variant the caches cannot serve is reported, not fatal
        return {"label": label, "score": score, "params": params, "error": f"{type(err).__name__}: {err}"}
    keep = {n: ~readers[n].read_all("skipped").astype(bool) for n in values}
    per = {}
    for n in ood_names:
        m = ood_metrics(values[id_name][keep[id_name]], values[n][keep[n]], "sklearn")
        per[n] = {"FPR95": m["FPR95"], "AUROC": m["AUROC"]}
    return {"label": label, "score": score, "params": params, "per_set": per,
            "seconds": time.perf_counter() - start}


def run_sweep(cache_dir, id_name, ood_names, grid, fit_on=None, workers=None, select_on=None,
              metric="FPR95"):
    """Evaluate every variant of ``grid`` (plus PAPER_VARIANTS); returns a dict with
    ``rows`` (sorted best first by the average ``metric`` over the reported sets),
    ``errors``, ``reported`` (OOD sets in the averages), ``select_on``, ``seconds``.

    select_on: an OOD set used only to rank variants (validation); it is left out of the
    reported averages, and ``selected`` names the best variant of each score on it.
    """
    if select_on and select_on not in ood_names:
        raise ValueError(f"--select-on {select_on!r} is not one of the OOD sets: {', '.join(ood_names)}")
    paths = {n: cache_path(cache_dir, n) for n in [id_name, *ood_names]}
    train_path = cache_path(cache_dir, fit_on or f"{id_name}_train")
    train_path = train_path if os.path.exists(train_path) else None
    with CacheReader(paths[id_name]) as r:
        attrs = r.attrs
    variants = [(label, s, p) for label, (s, p) in PAPER_VARIANTS.items()]
    variants += [v for v in expand(grid, attrs) if v[0] not in {x[0] for x in variants}]
    jobs = [(label, s, p, id_name, list(ood_names)) for label, s, p in variants]
    start = time.perf_counter()
    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(paths, train_path)) as pool:
        results = list(pool.map(_evaluate_variant, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    seconds = time.perf_counter() - start
    rows = [r for r in results if "error" not in r]
    errors = [r for r in results if "error" in r]
    reported = [n for n in ood_names if n != select_on]
    higher = metric == "AUROC"
    for r in rows:
        r["average"] = {m: float(np.mean([r["per_set"][n][m] for n in reported])) for m in ("FPR95", "AUROC")}
        r["rank_value"] = r["per_set"][select_on][metric] if select_on else r["average"][metric]
        r["paper"] = r["label"] in PAPER_VARIANTS
    rows.sort(key=lambda r: (-r["rank_value"] if higher else r["rank_value"], r["label"]))
    selected = {}
    for r in rows:
        selected.setdefault(r["score"], r["label"])
    return {"rows": rows, "errors": errors, "reported": reported, "select_on": select_on,
            "metric": metric, "selected": selected if select_on else {}, "seconds": seconds,
            "n_variants": len(jobs), "workers": workers, "id": id_name}


def sweep_table(sweep, top=None):
    """(header, rows) of the sweep, best first; values in percent."""
    header = ["Rank", "Variant", *[f"{n} FPR95/AUROC" for n in sweep["reported"]],
              "Avg FPR95 ↓", "Avg AUROC ↑"]
    if sweep["select_on"]:
        header.insert(2, f"{sweep['select_on']} {sweep['metric']} (selection)")
    out = []
    for i, r in enumerate(sweep["rows"][:top] if top else sweep["rows"], 1):
        cells = [str(i), r["label"] + (" *" if r["paper"] else ""),
                 *[f"{100 * r['per_set'][n]['FPR95']:.2f} / {100 * r['per_set'][n]['AUROC']:.2f}"
                   for n in sweep["reported"]],
                 f"{100 * r['average']['FPR95']:.2f}", f"{100 * r['average']['AUROC']:.2f}"]
        if sweep["select_on"]:
            cells.insert(2, f"{100 * r['rank_value']:.2f}")
        out.append(cells)
    return header, out


def write_sweep(sweep, out_dir):
    """Write ``sweep.md``, ``sweep.csv`` and ``sweep.json`` into ``out_dir``; returns the Markdown path."""
    import csv

    from .report import markdown
    os.makedirs(out_dir, exist_ok=True)
    header, rows = sweep_table(sweep)
    with open(os.path.join(out_dir, "sweep.csv"), "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump(sweep, f, indent=1, default=_json_default)
    cap = (f"ID = {sweep['id']}. {sweep['n_variants']} variants in {sweep['seconds']:.1f} s on "
           f"{sweep['workers']} processes, from the caches only. Sorted by "
           + (f"{sweep['metric']} on the validation set {sweep['select_on']} (left out of the "
              "averages)" if sweep["select_on"] else f"average {sweep['metric']}")
           + "; * marks the published configurations. Metrics in %, scikit-learn convention.")
    if sweep["selected"]:
        cap += " Selected per score: " + "; ".join(f"{SCORE_TITLES[s]}: {l}" for s, l in sweep["selected"].items()) + "."
    path = os.path.join(out_dir, "sweep.md")
    with open(path, "w") as f:
        f.write(f"{cap}\n\n{markdown(header, rows)}\n")
        if sweep["errors"]:
            f.write("\nVariants the caches could not serve:\n\n")
            f.writelines(f"- {e['label']}: {e['error']}\n" for e in sweep["errors"])
    return path


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)
