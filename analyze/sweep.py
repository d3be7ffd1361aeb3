"""Sweeps: many variants of the scores evaluated from the caches alone, on all CPU cores.

The variants come from ``analyze.grids``; every entry's published configurations
(``paper``) are always added so each table shows where the published choice stands.
Each variant goes through the engine's two functions (``Engine.score_sets``,
``metric_summary``) in a worker process.

Workers are started with the ``forkserver`` method: a fresh interpreter per worker, never
a fork of a process whose OpenMP or BLAS thread pools are already running (a forked
child can deadlock in them). An interrupted sweep (SIGINT, SIGTERM) terminates its workers
before it exits; after ``kill -9`` of the sweep, each worker sees its lifeline pipe close
and exits at once (``_exit_with_parent``), and the forkserver follows.
"""
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from tqdm import tqdm

from gradood.store.benchmarks import preset_params
from gradood.store.reader import CacheReader, cache_path

from .engine import ConstantScore, Engine, full_spectrum, is_crash, metric_summary
from .fitting import check_same_model
from .grids import expand
from .registry import ScoreError, all_entries, default_grid, entry, load_plugin, paper_variants
from .request import check_ood_sets
from .results import SweepResult


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
        """Head weight (K, D) and bias (K,), read once (``CacheReader.head``: raises for a
        model without a linear head)."""
        if "head" not in self._memo:
            self._memo["head"] = self._reader.head()
        return self._memo["head"]

    def has(self, name):
        return self._reader.has(name)


_STATE = {}


def _init_worker(lifeline, cache_dir, id_name, fit_on, paths, allow_partial, plugins):
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C reaches the whole group: the parent stops us
    threading.Thread(target=_exit_with_parent, args=(lifeline,), daemon=True).start()
    for plugin in plugins:
        load_plugin(plugin)
    readers = {name: MemoReader(p, allow_partial and name in paths["evaluated"]) for name, p in paths["all"].items()}
    _STATE["engine"] = Engine(cache_dir, id_name, fit_on, allow_partial=allow_partial, readers=readers)


def _exit_with_parent(lifeline):
    """Exit the worker as soon as the sweep that started it is gone (``kill -9`` included):
    ``lifeline`` is the read end of a pipe whose only write end the sweep holds, so the
    kernel closes it when the sweep dies and the read ends. (A forkserver worker's parent
    is the forkserver, which itself lives as long as its workers do.)"""
    try:
        lifeline.recv_bytes()
    except (EOFError, OSError):
        pass
    os._exit(1)


def _evaluate_variant(args):
    label, name, params, id_name, ood_names, csid = args
    engine = _STATE["engine"]
    start = time.perf_counter()
    datasets = [id_name, *csid, *ood_names]
    try:
        why = engine.why_not(name, params, datasets)
        if why:
            raise ScoreError(why)
        scored = engine.score_sets(name, params, datasets)
    except ConstantScore as err:
        return {"label": label, "score": name, "params": params, "error": str(err), "kind": "constant"}
    except Exception as err:   # a variant the caches cannot serve is reported, not fatal
        return {"label": label, "score": name, "params": params, "error": f"{type(err).__name__}: {err}",
                "kind": "crashed" if is_crash(err) else "not servable"}
    if csid:        # full-spectrum: the ID side is the ID test set followed by the csid sets
        scored, id_name = full_spectrum(scored, id_name, csid)
    summary = metric_summary(scored, id_name, ood_names, "sklearn")
    per = {n: {"FPR95": summary[n]["FPR95"], "AUROC": summary[n]["AUROC"]} for n in ood_names}
    return {"label": label, "score": name, "params": params, "per_set": per,
            "seconds": time.perf_counter() - start}


def run_sweep(cache_dir, id_name, ood_names, grid=None, fit_on=None, workers=None, select_on=None,
              metric="FPR95", plugins=(), allow_partial=False, progress=False, csid=()):
    """Evaluate every variant of ``grid`` (default: every entry's grid) plus the published
    configurations; returns a dict with ``rows`` (sorted best first by the average
    ``metric`` over the reported sets), ``errors``, ``reported`` (OOD sets in the
    averages), ``select_on``, ``seconds``.

    select_on: an OOD set used only to rank variants (validation); it is left out of the
    reported averages, and ``selected`` names the best variant of each score on it.
    plugins: plugin files the workers load. Benchmark presets' score parameters (recorded
    in the ID cache) apply to every variant unless the variant sets them. csid:
    covariate-shifted ID sets: every variant is then ranked in the full-spectrum setting,
    its ID side the ID test set followed by them (``engine.full_spectrum``).
    """
    if metric not in ("FPR95", "AUROC"):
        raise ValueError(f"unknown ranking metric {metric!r}; choose FPR95 or AUROC")
    if select_on and select_on not in ood_names:
        raise ValueError(f"--select-on {select_on!r} is not one of the OOD sets: {', '.join(ood_names)}")
    csid = list(csid)
    check_ood_sets(id_name, ood_names, csid)
    evaluated = {n: cache_path(cache_dir, n) for n in [id_name, *csid, *ood_names]}
    with CacheReader(evaluated[id_name], allow_partial=allow_partial) as r:
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
    # the fitting caches, by the engine's rule, that exist: read once per worker
    fitting = Engine(cache_dir, id_name, fit_on).fit_caches([s for _, s, _ in variants],
                                                            {s: p for _, s, p in variants})
    fitting = {n: cache_path(cache_dir, n) for n in fitting if os.path.exists(cache_path(cache_dir, n))}
    check_same_model([*evaluated.values(), *fitting.values()], allow_partial, "the swept caches")
    paths = {"all": {**evaluated, **fitting}, "evaluated": list(evaluated)}
    jobs = [(label, s, p, id_name, list(ood_names), csid) for label, s, p in variants]
    start = time.perf_counter()
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    context = multiprocessing.get_context("forkserver")
    before = set(multiprocessing.active_children())
    lifeline, held = context.Pipe(duplex=False)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                               initargs=(lifeline, cache_dir, id_name, fit_on, paths, allow_partial,
                                         tuple(os.path.abspath(p) for p in plugins)))
    try:
        results = list(tqdm(pool.map(_evaluate_variant, jobs, chunksize=max(1, len(jobs) // (8 * workers))),
                            total=len(jobs), desc="sweep", unit="variant", disable=not progress,
                            dynamic_ncols=True))
    except BaseException:
        # interrupted (SIGINT, SIGTERM) or failed: stop the workers now, not after their queued variants
        pool.shutdown(wait=False, cancel_futures=True)
        for worker in set(multiprocessing.active_children()) - before:
            worker.terminate()
        raise
    finally:
        lifeline.close()
    pool.shutdown()
    held.close()
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
                       workers=workers, id=id_name, layer_order=layer_order, csid=csid,
                       not_stored={s: {"count": len(v), "example": v[0]} for s, v in not_stored.items()})
