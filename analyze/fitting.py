"""Fitting and scoring one cache: the primitives the analysis engine composes.

``score_cache`` streams one cache through an estimator block by block, ``fit_estimator``
fits one on every usable row of a fitting cache, ``FitStore`` keeps fitted attributes on
disk so a new OOD set is scored without refitting; the ``check_*`` functions refuse caches
that cannot serve a score or cannot be combined. Library code: raises, never prints.
"""
import json
import os
import shutil

import numpy as np

from gradood.store.reader import BLOCK_ROWS, CacheReader
from gradood.store.recipes import comparable, layers_of
from gradood.store.schema import CacheError, differing

from .data import CacheData
from .registry import ScoreCrash, ScoreError, entry

MAP_BLOCK_BYTES = 128 << 20


def block_rows(needs, attrs):
    """Rows per block for a score reading ``needs``: BLOCK_ROWS, fewer when it reads maps
    (at most about 128 MiB of float64 maps per block)."""
    per_row = 0
    for set_name, _, stat in needs:
        if stat == "map":
            for layer in layers_of(attrs["hook_sets"], set_name) or []:
                per_row += 8 * int(np.prod(attrs["layer_shapes"][layer]))
    return BLOCK_ROWS if not per_row else max(1, min(BLOCK_ROWS, MAP_BLOCK_BYTES // per_row))


def check_serves(reader, name, params=None):
    """Raise CacheError when the cache lacks what score ``name`` reads with ``params``."""
    e = entry(name)
    problems = e.problems(reader.attrs, params)
    if problems:
        raise CacheError(f"{reader.path} lacks what {name} needs: {'; '.join(problems)}. "
                         f"Re-extract it with --score {name}")


def check_compatible(name, params, attrs_a, path_a, attrs_b, path_b):
    """Raise CacheError when two caches differ in what score ``name`` reads (the model, the
    preprocessing, the hooked layers it uses), naming the differing fields."""
    e = entry(name)
    needs = e.needs_for(params)
    diff = differing(comparable(attrs_a, needs, e.passes), comparable(attrs_b, needs, e.passes))
    if diff:
        raise CacheError(f"{name} cannot combine {path_a} and {path_b}: they differ in "
                         f"{', '.join(diff)} (what {name} reads must come from the same model and "
                         "preprocessing); re-extract one of them with the other's settings")


def check_same_model(paths, allow_partial=False, what="these caches"):
    """Raise CacheError unless every cache in ``paths`` comes from the same model and
    preprocessing (``store.schema.MODEL_FIELDS``), naming the first that differs: caches of
    different weights never meet in one table, sweep or tuning."""
    first, base = None, None
    for path in paths:
        with CacheReader(path, allow_partial=allow_partial) as reader:
            ident = comparable(reader.attrs)
        if first is None:
            first, base = path, ident
            continue
        diff = differing(base, ident)
        if diff:
            raise CacheError(f"{what} mix models: {path} differs from {first} in {', '.join(diff)}; "
                             "every cache of one analysis must come from the same weights and "
                             "preprocessing")


def _wrap(name, path, err):
    """CacheError and ScoreError as raised; any other exception as a ScoreCrash naming the
    score, the cache and the cause (it stops even a lenient run: a bug is never a note)."""
    if isinstance(err, (CacheError, ScoreError)):
        return err
    return ScoreCrash(f"{name} crashed on {path}: {type(err).__name__}: {err} (a bug in the score, "
                      "not a limit of the cache: fix it, or leave the score out with --score)")


def score_cache(reader, name, estimator, params=None):
    """Scores (N,) float64 of every row of an open cache, block by block.

    estimator: from ``entry(name).make(params)`` (fitted first for fitted scores).
    """
    e = entry(name)
    check_serves(reader, name, params)
    needs = e.needs_for(params)
    parts = []
    for a, b in reader.blocks(block_rows(needs, reader.attrs)):
        data = CacheData(reader, a, b, needs=needs, passes=e.passes, score=name)
        try:
            values = np.asarray(estimator.score(data), dtype=np.float64)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"interrupted while {name} scored rows {a}-{b} of {reader.path}; "
                                    "no table or score file of this run was written") from None
        except Exception as err:
            raise _wrap(name, reader.path, err) from err
        if values.shape != (b - a,):
            raise ScoreError(f"{name} returned shape {values.shape} for a block of {b - a} rows of "
                             f"{reader.path}; a score returns one value per row, shape (n,)")
        parts.append(values)
    return np.concatenate(parts) if parts else np.empty(0)


def fit_estimator(reader, name, params=None):
    """A fitted estimator of score ``name`` with ``params``, fitted on every usable (not
    skipped) row of the open cache ``reader``."""
    e = entry(name)
    check_serves(reader, name, params)
    keep = ~reader.read_all("skipped").astype(bool)
    if keep.sum() == 0:
        raise CacheError(f"{reader.path}: no usable rows to fit {name} on")
    labels = reader.read_all("labels")[keep]
    k = int(reader.attrs["num_classes"])
    if (labels >= k).any() or (labels < -1).any():
        bad = int(((labels >= k) | (labels < -1)).sum())
        raise CacheError(f"{reader.path}: {bad} row(s) have labels a {k}-class head cannot have (e.g. "
                         f"{int(labels[(labels >= k) | (labels < -1)][0])}); {name} cannot be fitted on "
                         "them: check --num-classes and the labels of that set")
    data = CacheData(reader, 0, reader.n_samples, keep=keep, needs=e.needs_for(params),
                     passes=e.passes, score=name)
    try:
        est = e.make(params).fit(data)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted while fitting {name} on {reader.path}; no table or "
                                "fit of this run was written") from None
    except Exception as err:
        raise _wrap(name, reader.path, err) from err
    if est is None:
        raise ScoreError(f"{name}.fit must return self (scikit-learn convention)")
    return est


def fitted_state(estimator):
    """The fitted attributes (names ending in ``_``) of an estimator, flattened for ``np.savez``
    (a dict attribute ``a_`` = {k: array} becomes keys ``a_/k``)."""
    out = {}
    for key, value in vars(estimator).items():
        if not key.endswith("_") or key.startswith("_"):
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{k}": np.asarray(v) for k, v in value.items()})
        else:
            out[key] = value if isinstance(value, np.memmap) else np.asarray(value)
    return out


def restore(name, params, state):
    """An estimator of ``name`` with ``params`` and the fitted attributes of ``state``."""
    est = entry(name).make(params)
    nested = {}
    for key, value in state.items():
        attr, slash, sub = key.partition("/")
        if slash:
            nested.setdefault(attr, {})[sub] = value
        else:
            setattr(est, key, value)
    for attr, value in nested.items():
        setattr(est, attr, value)
    return est


class FitStore:
    """Fitted attributes kept as ``folder/<score>/`` (``key.json`` and one ``.npy`` per
    attribute; a dict attribute ``a_`` becomes ``a_/<key>.npy``), reused while the fitting
    cache (path, rows, what the score reads) and the fit parameters are the same. Arrays
    are memory-mapped when reused, so a large fit (a covariance, a bank's row index) is
    read from disk as the score touches it instead of loaded whole."""

    def __init__(self, folder=None):
        self.folder = folder

    def get(self, reader, name, params=None):
        """A fitted estimator of ``name``: loaded when a matching fit is stored, else fitted
        (and stored when the store has a folder)."""
        e = entry(name)
        key = json.dumps({"score": name, "cache": os.path.abspath(reader.path), "n": reader.n_samples,
                          "reads": comparable(reader.attrs, e.needs_for(params), e.passes),
                          "fit": e.fit_key(params)}, sort_keys=True, default=str)
        where = os.path.join(self.folder, name) if self.folder else None
        if where:
            state = _load_fit(where, key)
            if state is not None:
                return restore(name, params, state)
        est = fit_estimator(reader, name, params)
        if where:
            _save_fit(where, key, fitted_state(est))
        return est


def _load_fit(where, key):
    """The saved state at folder ``where`` when its key is ``key``, else None."""
    try:
        with open(os.path.join(where, "key.json")) as f:
            if f.read() != key:
                return None
    except OSError:
        return None
    state = {}
    for root, _, files in os.walk(where):
        for file in files:
            if file.endswith(".npy"):
                path = os.path.join(root, file)
                name = os.path.relpath(path, where)[:-4].replace(os.sep, "/")
                value = np.load(path, mmap_mode="r", allow_pickle=False)
                state[name] = value if value.ndim else value[()]
    return state


def _npy_file(value):
    """True when ``value`` is a writable memory map of a whole ``.npy`` file."""
    return (isinstance(value, np.memmap) and value.mode == "w+" and str(value.filename or "").endswith(".npy")
            and value.offset == os.path.getsize(value.filename) - value.nbytes)


def _save_fit(where, key, state):
    """Write ``state`` ({attribute: array}) and ``key`` to folder ``where``, replacing what
    was there only once the new fit is whole (written to ``<where>.tmp`` first)."""
    tmp = where + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for name, value in state.items():
        path = os.path.join(tmp, *name.split("/")) + ".npy"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if _npy_file(value):            # an array on disk (streaming.disk_array): copy its file
            value.flush()
            shutil.copyfile(value.filename, path)
        else:
            np.save(path, np.asarray(value), allow_pickle=False)
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, "key.json"), "w") as f:
        f.write(key)
    shutil.rmtree(where, ignore_errors=True)
    os.replace(tmp, where)
