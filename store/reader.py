"""Reading and validating caches, in row blocks so memory does not grow with N."""
import json
import os

import h5py
import numpy as np

from .schema import JSON_ATTRS, STRING_DATASETS, CacheError, check_values, has_linear_head, validate
from .writer import contiguous_rows, covered_rows, list_parts, parts_dir

BLOCK_ROWS = 4096


def cache_path(cache_dir, dataset):
    """Path of the cache file of ``dataset`` inside ``cache_dir``."""
    return os.path.join(cache_dir, f"{dataset}.h5")


def default_cache_dir(bench, arch):
    """The default cache folder ``caches/<benchmark or custom>-<arch>``, the ``:`` and
    ``/`` of ``torchvision:NAME``-style names written as ``-``."""
    name = f"{bench or 'custom'}-{arch}".replace(":", "-").replace("/", "-")
    return os.path.join("caches", name)


def _decode_attrs(raw, where="cache"):
    attrs = {}
    for key, value in raw.items():
        if isinstance(value, bytes):
            value = value.decode()
        if key in JSON_ATTRS and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as err:
                raise CacheError(f"{where}: root attribute {key!r} is not valid JSON ({err}); the file "
                                 "was edited or damaged: re-extract it") from None
        elif isinstance(value, np.generic):
            value = value.item()
        attrs[key] = value
    return attrs


class CacheReader:
    """Read-only view of one cache.

    path: the ``.h5`` file. allow_partial: when the run has not finished, read the rows
    written so far from its parts folder instead of refusing.
    Use as a context manager. ``attrs``: decoded root attributes; ``n_samples``: rows;
    ``read(name, start, stop)``: an array of rows; ``blocks(rows=BLOCK_ROWS)``: the
    ``(start, stop)`` row ranges covering the cache, at most ``rows`` each.
    """

    def __init__(self, path, allow_partial=False):
        self.path = path
        self.partial = False
        self._parts = []
        self._file = None
        if os.path.exists(path):
            self._file = self._open(path)
            self.attrs = _decode_attrs(self._file.attrs, path)
            self._validate()
            if not self.attrs["complete"]:
                raise CacheError(f"{path}: cache is not marked complete; rerun the extract "
                                 "command that made it")
            self.n_samples = int(self.attrs["n_samples"])
        elif os.path.isdir(parts_dir(path)):
            self._open_partial(path, allow_partial)
        else:
            raise CacheError(f"cache not found: {path} (run `pipeline.py extract` for this dataset first)")

    def _open(self, path):
        try:
            return h5py.File(path, "r")
        except OSError as err:
            raise CacheError(f"{path}: not a readable HDF5 cache (truncated or corrupted: {err})") from None

    def _open_partial(self, path, allow_partial):
        pdir = parts_dir(path)
        if not os.path.exists(os.path.join(pdir, "run.json")):
            raise CacheError(f"{path}: its unfinished extraction's folder {pdir} holds no run.json (the "
                             f"run was cut off while starting, or the folder was not made by gradood); "
                             f"remove {pdir} and extract again")
        with open(os.path.join(pdir, "run.json")) as f:
            run = json.load(f)
        parts = list_parts(pdir)
        done = contiguous_rows(parts)
        if not allow_partial:
            raise CacheError(
                f"{path} is incomplete: {covered_rows(parts)} of {run['n_samples']} samples "
                "extracted. Rerun the same extract command to resume, or pass --allow-partial "
                f"to analyse the finished part (the first {done} rows)")
        if done == 0:
            raise CacheError(f"{path}: no finished rows to analyse yet")
        meta_file = os.path.join(pdir, "attrs.json")
        with open(meta_file) as f:
            self.attrs = json.load(f)
        self.partial = True
        self.n_samples = done
        self._parts = [p for p in parts if p[1] <= done]
        self._constants = np.load(os.path.join(pdir, "head.npz"))

    def _validate(self):
        shapes = {}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                dtype = "str" if h5py.check_string_dtype(obj.dtype) else obj.dtype.name
                shapes[name] = (obj.shape, dtype)
        try:
            self._file.visititems(visit)
        except (OSError, RuntimeError) as err:
            raise CacheError(f"{self.path}: damaged cache ({err})") from None
        validate(self.attrs, shapes, self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def has(self, name):
        if self._file is not None:
            return name in self._file
        with h5py.File(self._parts[0][2], "r") as f:
            return name in f or (name.startswith("head/") and name[5:] in self._constants)

    def head(self):
        """Head weight (K, D) and bias (K,) as float64 arrays. Raises CacheError for a
        model without a linear head."""
        if not has_linear_head(self.attrs):
            raise CacheError(f"{self.path}: the model has no linear head (its logits are not W x + b of "
                             "the features), so the cache holds no head weight")
        if self._file is not None:
            return self.read("head/weight").astype(np.float64), self.read("head/bias").astype(np.float64)
        return (self._constants["weight"].astype(np.float64), self._constants["bias"].astype(np.float64))

    def read(self, name, start=0, stop=None):
        """Rows ``[start, stop)`` of dataset ``name`` (whole constant datasets ignore the range)."""
        stop = self.n_samples if stop is None else stop
        try:
            if self._file is not None:
                ds = self._file[name]
                if name.startswith("head/"):
                    return ds[...]
                out = ds[start:stop]
            else:
                out = self._read_parts(name, start, stop)
        except KeyError:
            raise CacheError(f"{self.path}: has no dataset {name!r}") from None
        except OSError as err:
            raise CacheError(f"{self.path}: damaged data in {name!r} rows {start}-{stop} ({err})") from None
        if name in STRING_DATASETS:
            out = np.array([p.decode() if isinstance(p, bytes) else p for p in out], dtype=object)
        else:
            check_values(name, out, self.attrs, self.path)
        return out

    def _read_parts(self, name, start, stop):
        pieces = []
        for p_start, p_stop, path in self._parts:
            if p_stop <= start or p_start >= stop:
                continue
            with h5py.File(path, "r") as f:
                pieces.append(f[name][max(start, p_start) - p_start:min(stop, p_stop) - p_start])
        return np.concatenate(pieces)

    def blocks(self, rows=BLOCK_ROWS):
        """Row ranges ``(start, stop)`` covering all samples, at most ``rows`` each."""
        for start in range(0, self.n_samples, rows):
            yield start, min(start + rows, self.n_samples)

    def read_all(self, name):
        """Whole dataset ``name``, assembled block by block."""
        return np.concatenate([self.read(name, a, b) for a, b in self.blocks()]) if self.n_samples else np.empty(0)
