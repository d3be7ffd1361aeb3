"""Sweeps: many variants of the scores evaluated from the caches alone, on all CPU cores.

A variant is a score name plus parameters. A grid gives, per score, lists of values whose
product is swept; its keys are the score's parameters (``analyze.registry``), so a
plugin's keyword parameters are sweepable too. The special ``layers`` values are ``all``
(the score's default layers), ``each`` (every layer of the score's ``layer_set`` on its
own: the per-layer contribution) or names joined by ``+``.

Grids come from TOML (one table per score) or the command line
(``gaia_z:spatial=nonzero,mean;channel=sq_mean,l2;layers=all,each``). Every entry's
published configurations (``paper``) are always added so each table shows where the
published choice stands; the default grid is the union of the entries' ``grid``.

Workers are started with the ``forkserver`` method: a fresh interpreter per worker, never
a fork of a process whose OpenMP or BLAS thread pools are already running (a forked
child can deadlock in them).
"""
import itertools
import json
import multiprocessing
import os
import time
import tomllib
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from gradood.store.benchmarks import preset_params, train_cache_name
from gradood.store.reader import CacheReader, cache_path

from .engine import Engine, is_crash
from .evaluation import check_not_constant, check_ood_sets
from .fitting import check_same_model
from .metrics import ood_metrics
from .results import SweepResult
from .registry import ScoreError, all_entries, default_grid, entry, load_plugin, paper_variants


def _check_table(name, table, where):
    e = entry(name)
    for key, values in table.items():
        if key not in e.params:
            raise ValueError(f"{where}: {name} has no parameter {key!r} (its parameters: "
                             f"{', '.join(e.params) or 'none'})")
        if key != "layers":
            for v in values:
                e.resolve({key: v})


def parse_grid_text(items):
    """``{score: [table]}`` from command-line grids ``score:key=v1,v2;key=v3``."""
    grid = {}
    for item in items:
        name, sep, body = item.partition(":")
        if name not in all_entries():
            raise ValueError(f"--grid {item!r}: unknown score {name!r}; choose one of: {', '.join(all_entries())}")
        table = {}
        for part in filter(None, body.split(";")):
            key, eq, values = part.partition("=")
            if not eq:
                raise ValueError(f"--grid {item!r}: expected key=v1,v2 in {part!r}")
            table[key.strip()] = [_value(v) for v in values.split(",")]
        _check_table(name, table, f"--grid {item!r}")
        grid.setdefault(name, []).append(table)
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
    for name, tables in raw.items():
        if name not in all_entries():
            raise ValueError(f"{path}: unknown score table [{name}]; choose from: {', '.join(all_entries())}")
        for table in tables if isinstance(tables, list) else [tables]:
            table = {k: v if isinstance(v, list) else [v] for k, v in table.items()}
            _check_table(name, table, path)
            grid.setdefault(name, []).append(table)
    return grid


def _label(name, params):
    shown = ", ".join(f"{k}={'+'.join(v) if isinstance(v, list) else v}" for k, v in params.items()
                      if k != "hyper")
    return f"{entry(name).title} {shown}".strip()


def expand(grid, attrs):
    """List of ``(label, score, params)`` variants of ``grid`` for a cache with ``attrs``."""
    out = []
    for name, tables in grid.items():
        e = entry(name)
        for table in tables:
            keys = list(table)
            for combo in itertools.product(*(table[k] for k in keys)):
                params = dict(zip(keys, combo))
                layers = params.pop("layers", "all")
                if layers == "all":
                    choices = [None]
                elif layers == "each":
                    if e.layer_set is None:
                        raise ValueError(f"{name} has no per-layer variants (layers=each)")
                    choices = [[l] for l in e.layer_set(attrs)]
                else:
                    choices = [layers.split("+") if isinstance(layers, str) else list(layers)]
                for chosen in choices:
                    p = dict({"layers": chosen} if chosen is not None else {}, **params)
                    out.append((_label(name, p), name, p))
    return out


class MemoReader:
    """A CacheReader whose datasets are read whole once and then served from memory.

    Sweeps read the same few datasets hundreds of times; datasets larger than
    ``max_bytes`` are read from the file each time.
    """

    def __init__(self, path, allow_partial=False, max_bytes=256 << 20):
        self._reader = CacheReader(path, allow_partial=allow_partial)
        self.path, self.attrs, self.n_samples = path, self._reader.attrs, self._reader.n_samples
        self.partial = self._reader.partial
        self._memo, self._max = {}, max_bytes

    def read(self, name, start=0, stop=None):
        stop = self.n_samples if stop is None else stop
        if name not in self._memo:
            ds = self._reader._file[name] if self._reader._file is not None and name in self._reader._file else None
            if ds is not None and ds.size * ds.dtype.itemsize > self._max:
                return self._reader.read(name, start, stop)
            self._memo[name] = self._reader.read(name) if name.startswith("head/") else self._reader.read_all(name)
        value = self._memo[name]
        return value if name.startswith("head/") else value[start:stop]

    def read_all(self, name):
        return self.read(name)

    def blocks(self, rows=None):
        yield 0, self.n_samples

    def head(self):
        return self.read("head/weight").astype(np.float64), self.read("head/bias").astype(np.float64)

    def has(self, name):
        return self._reader.has(name)


_STATE = {}


def _init_worker(cache_dir, id_name, fit_on, paths, train_name, plugins, allow_partial):
    for plugin in plugins:
        load_plugin(plugin)
    readers = {name: MemoReader(p, allow_partial) for name, p in paths.items()}
    if train_name:
        readers[train_name] = MemoReader(cache_path(cache_dir, train_name))
    _STATE["engine"] = Engine(cache_dir, id_name, fit_on, allow_partial=allow_partial, readers=readers)


def _evaluate_variant(args):
    label, name, params, id_name, ood_names = args
    engine = _STATE["engine"]
    start = time.perf_counter()
    datasets = [id_name, *ood_names]
    try:
        why = engine.why_not(name, params, datasets)
        if why:
            raise ScoreError(why)
        est = engine.estimator(name, params)
        values = {}
        for n in datasets:
            with engine.open(n) as reader:
                values[n] = engine.values(reader, name, params, est)
    except Exception as err:   # a variant the caches cannot serve is reported, not fatal
        return {"label": label, "score": name, "params": params, "error": f"{type(err).__name__}: {err}",
                "kind": "crashed" if is_crash(err) else "not servable"}
    try:
        check_not_constant(name, {n: v[k] for n, (v, k) in values.items()}, params)
    except ScoreError as err:
        return {"label": label, "score": name, "params": params, "error": str(err), "kind": "constant"}
    per = {}
    known = values[id_name][0][values[id_name][1]]
    for n in ood_names:
        m = ood_metrics(known, values[n][0][values[n][1]], "sklearn")
        per[n] = {"FPR95": m["FPR95"], "AUROC": m["AUROC"]}
    return {"label": label, "score": name, "params": params, "per_set": per,
            "seconds": time.perf_counter() - start}


def run_sweep(cache_dir, id_name, ood_names, grid=None, fit_on=None, workers=None, select_on=None,
              metric="FPR95", plugins=(), allow_partial=False, progress=False):
    """Evaluate every variant of ``grid`` (default: every entry's grid) plus the published
    configurations; returns a dict with ``rows`` (sorted best first by the average
    ``metric`` over the reported sets), ``errors``, ``reported`` (OOD sets in the
    averages), ``select_on``, ``seconds``.

    select_on: an OOD set used only to rank variants (validation); it is left out of the
    reported averages, and ``selected`` names the best variant of each score on it.
    plugins: plugin files the workers load. Benchmark presets' score parameters (recorded
    in the ID cache) apply to every variant unless the variant sets them.
    """
    if metric not in ("FPR95", "AUROC"):
        raise ValueError(f"unknown ranking metric {metric!r}; choose FPR95 or AUROC")
    if select_on and select_on not in ood_names:
        raise ValueError(f"--select-on {select_on!r} is not one of the OOD sets: {', '.join(ood_names)}")
    check_ood_sets(id_name, ood_names)
    paths = {n: cache_path(cache_dir, n) for n in [id_name, *ood_names]}
    train_name = fit_on or train_cache_name(id_name)
    train_path = cache_path(cache_dir, train_name)
    train_name, train_path = (train_name, train_path) if os.path.exists(train_path) else (None, None)
    check_same_model([*paths.values(), *([train_path] if train_path else [])], allow_partial, "the swept caches")
    with CacheReader(paths[id_name], allow_partial=allow_partial) as r:
        attrs = r.attrs
    variants = [(label, s, p) for label, (s, p) in paper_variants().items()]
    variants += [v for v in expand(grid or default_grid(), attrs) if v[0] not in {x[0] for x in variants}]
    variants = [(label, s, preset_params(attrs, {s: p})[s]) for label, s, p in variants]
    not_stored = {}
    if grid is None:
        # the default grid adapts to what the caches store; an explicit grid reports every variant
        kept = []
        for label, s, p in variants:
            e = entry(s)
            try:
                problems = e.problems(attrs, p)
            except ScoreError:
                problems = []
            if problems and label not in paper_variants():
                not_stored.setdefault(s, []).append(problems[0])
            else:
                kept.append((label, s, p))
        variants = kept
    jobs = [(label, s, p, id_name, list(ood_names)) for label, s, p in variants]
    start = time.perf_counter()
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(cache_dir, id_name, fit_on, paths, train_name,
                                       tuple(os.path.abspath(p) for p in plugins), allow_partial)) as pool:
        from tqdm import tqdm
        results = list(tqdm(pool.map(_evaluate_variant, jobs, chunksize=max(1, len(jobs) // (8 * workers))),
                            total=len(jobs), desc="sweep", unit="variant", disable=not progress,
                            dynamic_ncols=True))
    seconds = time.perf_counter() - start
    rows = [r for r in results if "error" not in r]
    errors = [r for r in results if "error" in r]
    reported = [n for n in ood_names if n != select_on]
    higher = metric == "AUROC"
    papers = set(paper_variants())
    for r in rows:
        r["average"] = {m: float(np.mean([r["per_set"][n][m] for n in reported])) for m in ("FPR95", "AUROC")}
        r["rank_value"] = r["per_set"][select_on][metric] if select_on else r["average"][metric]
        r["paper"] = r["label"] in papers
    rows.sort(key=lambda r: (-r["rank_value"] if higher else r["rank_value"], r["label"]))
    selected = {}
    for r in rows:
        selected.setdefault(r["score"], r["label"])
    layer_order = {s: e.layer_set(attrs) for s, e in all_entries().items() if e.layer_set}
    return SweepResult(rows=rows, errors=errors, reported=reported, select_on=select_on, metric=metric,
                       selected=selected if select_on else {}, seconds=seconds, n_variants=len(jobs),
                       workers=workers, id=id_name, layer_order=layer_order,
                       not_stored={s: {"count": len(v), "example": v[0]} for s, v in not_stored.items()})


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


def write_sweep(sweep, out_dir):
    """Write ``sweep.md``, ``sweep.csv`` and ``sweep.json`` into ``out_dir``; returns the Markdown path."""
    import csv

    from .report import markdown
    os.makedirs(out_dir, exist_ok=True)
    header, rows = sweep_table(sweep)
    with open(os.path.join(out_dir, "sweep.csv"), "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump(sweep.to_json(), f, indent=1, default=_json_default)
    cap = (f"ID = {sweep.id}; OOD sets: {', '.join(sweep.reported)}. {sweep.n_variants} variants in "
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
    path = os.path.join(out_dir, "sweep.md")
    with open(path, "w") as f:
        f.write(f"{cap}\n\n{markdown(header, rows)}\n")
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
