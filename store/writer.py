"""Crash-safe cache writing: atomic per-batch part files, assembled into one HDF5 file.

While extraction runs, ``<cache>.h5.parts/`` holds ``run.json`` (the run's identity) and
one ``rows-<start>-<stop>.h5`` file per batch (rows numbered in dataset order, so ranks
of a sharded run share the folder). Each part is written under a temporary name, fsynced
and renamed, so after a crash (even ``kill -9``) every part present is whole; a rerun of
the same command extracts only the rows no part holds. When all
rows are present, ``assemble`` streams the parts into ``<cache>.h5.tmp``, writes the
attributes, sets ``complete`` last and renames the file to ``<cache>.h5``: the final name
only ever holds a complete cache. Write errors (disk full included) leave the parts in
place for a resume and never produce a file marked complete.
"""
import json
import os
import re
import shutil

import h5py
import numpy as np

from .schema import STRING_DATASETS, CacheError, differing, dumps, feature_source

PART_RE = re.compile(r"rows-(\d{9})-(\d{9})\.h5$")
ROWS_PER_CHUNK = 64


def parts_dir(cache_path):
    return cache_path + ".parts"


def run_identity(attrs):
    """What makes two extractions of one dataset the same: the fingerprint (model, weights,
    preprocessing, layers, plan, passes) and the data (name, root, split, subset, rows)."""
    return {"fingerprint": attrs["fingerprint"], "features": feature_source(attrs), "dataset": attrs["dataset"],
            "dataset_root": attrs.get("dataset_root"), "split": attrs.get("split"),
            "subset": attrs.get("subset"), "n_samples": attrs.get("n_samples")}


class CacheLock:
    """An exclusive lock on one cache (``<cache>.h5.lock``, holding the owner's pid).

    ``acquire`` raises CacheError naming the process that holds it; the operating system
    releases it when that process ends, however it ends.
    """

    def __init__(self, cache_path):
        self.path = cache_path + ".lock"
        self._fd = None

    def acquire(self):
        import fcntl
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CacheError(f"{self.path[:-5]} is being written by another extraction (pid "
                             f"{holder}); wait for it to finish or stop it, then rerun") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self):
        if self._fd is not None:
            import fcntl
            try:
                os.remove(self.path)
            except OSError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _fsync_file(path):
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _atomic_write(path, write):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_parts(directory):
    """Sorted ``[(start, stop, path)]`` of the whole part files in ``directory``."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = PART_RE.match(name)
        if m:
            found.append((int(m.group(1)), int(m.group(2)), os.path.join(directory, name)))
    return sorted(found)


def missing_intervals(parts, lo, hi):
    """Row ranges ``[(start, stop)]`` inside ``[lo, hi)`` that no part covers."""
    out, at = [], lo
    for start, stop, _ in parts:
        if stop <= at or start >= hi:
            continue
        if start > at:
            out.append((at, start))
        at = max(at, stop)
    if at < hi:
        out.append((at, hi))
    return out


def covered_rows(parts):
    """Number of rows held by the parts (they never overlap)."""
    return sum(stop - start for start, stop, _ in parts)


def contiguous_rows(parts):
    """Number of rows covered from row 0 without a gap."""
    done = 0
    for start, stop, _ in parts:
        if start != done:
            break
        done = stop
    return done


class CacheWriter:
    """Writes one cache: ``write_rows`` per batch, then ``assemble``.

    cache_path: final ``.h5`` path. attrs: root attributes (JSON-able values; dicts and
    lists are stored as JSON strings). layout: ``{dataset path: (row shape, dtype name)}``
    for every per-sample dataset (``store.schema.layout``). constants: ``{dataset path: array}`` written once
    (the head). n_samples: total rows.
    """

    def __init__(self, cache_path, attrs, layout, constants, n_samples):
        self.cache_path = cache_path
        self.dir = parts_dir(cache_path)
        self.attrs = attrs
        self.layout = layout
        self.constants = constants
        self.n_samples = n_samples
        self.identity = {**run_identity(attrs), "n_samples": n_samples,
                         "batch_size": attrs.get("batch_size")}
        self._lock = None

    def start(self, prepare=True):
        """Prepare the parts folder; returns the rows written from row 0 without a gap.

        Refuses to resume a run whose identity (model, data, hooks, plan) differs, naming
        the differing fields. prepare=False (ranks other than 0 of a sharded run, after
        rank 0 prepared the folder) only checks the identity and touches nothing.
        """
        run_file = os.path.join(self.dir, "run.json")
        if prepare and self._lock is None:
            self._lock = CacheLock(self.cache_path).acquire()
        if not prepare:
            if not os.path.exists(run_file):
                raise CacheError(f"{run_file} is missing: rank 0 did not prepare {self.dir} "
                                 "(on several nodes the cache folder must be on a shared file system)")
        else:
            os.makedirs(self.dir, exist_ok=True)
        if os.path.exists(run_file):
            with open(run_file) as f:
                before = json.load(f)
            now = json.loads(dumps(self.identity))
            diff = differing(before, now)
            if diff == ["batch_size"]:
                self.release()
                raise CacheError(
                    f"{self.dir} holds an unfinished run with --batch-size {before['batch_size']}; "
                    f"resume it with --batch-size {before['batch_size']} (rows are computed in "
                    "fixed batches), or delete the folder to start over")
            if diff:
                self.release()
                raise CacheError(
                    f"{self.dir} holds an unfinished run with different settings "
                    f"({', '.join(diff)}); rerun it with the same settings to resume, or "
                    f"delete {self.dir} to start over")
        else:
            # attrs.json and head.npz let ``--allow-partial`` read an unfinished run.
            _atomic_write(os.path.join(self.dir, "attrs.json"),
                          lambda f: f.write(dumps({**self.attrs, "complete": False}).encode()))
            _atomic_write(os.path.join(self.dir, "head.npz"),
                          lambda f: np.savez(f, **{k.rpartition("/")[2]: v for k, v in self.constants.items()}))
            _atomic_write(run_file, lambda f: f.write(dumps(self.identity).encode()))
        if prepare:
            for name in os.listdir(self.dir):
                if name.endswith(".tmp"):
                    os.remove(os.path.join(self.dir, name))
        return contiguous_rows(list_parts(self.dir))

    def write_direct(self, blocks):
        """Write the cache in one go from ``blocks`` (``(start, stop, {path: array})`` in
        row order, covering every row), without part files: for generated data that is
        cheaper to make again than to resume (``store.synthetic``). Returns the path."""
        tmp = self.cache_path + ".tmp"
        os.makedirs(os.path.dirname(os.path.abspath(tmp)), exist_ok=True)
        failure = self._write_final(tmp, ((a, b, arrays.__getitem__) for a, b, arrays in blocks))
        if failure is not None:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise CacheError(f"could not write {self.cache_path}: {failure}")
        os.replace(tmp, self.cache_path)
        return self.cache_path

    def discard(self):
        """Remove the parts folder of a run that wrote no row (a refused start), then release
        the lock."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.release()

    def release(self):
        """Release the cache lock (``assemble`` does it; call it after a failed run)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def missing(self, lo=0, hi=None):
        """Row ranges of ``[lo, hi)`` (default: all rows) that are still to write."""
        return missing_intervals(list_parts(self.dir), lo, self.n_samples if hi is None else hi)

    def write_rows(self, start, arrays):
        """Commit rows ``[start, start + n)``; ``arrays`` maps dataset path to (n, ...) arrays."""
        n = len(next(iter(arrays.values())))
        name = os.path.join(self.dir, f"rows-{start:09d}-{start + n:09d}.h5")
        tmp = name + ".tmp"
        try:
            with h5py.File(tmp, "w") as f:
                for path, value in arrays.items():
                    if path in STRING_DATASETS:
                        f.create_dataset(path, data=np.asarray(value, dtype=object),
                                         dtype=h5py.string_dtype())
                    else:
                        f.create_dataset(path, data=value, compression="lzf")
            _fsync_file(tmp)
            os.replace(tmp, name)
        except OSError as err:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise CacheError(f"could not write {name}: {err}. The rows before {start} are "
                             "kept; free space or fix the error, then rerun the same command "
                             "to resume") from err

    def assemble(self):
        """Stream all parts into the final file, mark it complete, remove the parts.

        An interrupt (Ctrl-C) during assembly is held until the file is complete (or the
        assembly failed), then raised, so the run stops and no half-written file remains.
        On a write error every HDF5 object is closed in order before the error is raised.
        """
        parts = list_parts(self.dir)
        if contiguous_rows(parts) != self.n_samples:
            raise CacheError(f"{self.dir}: only {covered_rows(parts)} of {self.n_samples} rows "
                             "written; rerun the extract command to finish")
        tmp = self.cache_path + ".tmp"
        with _interrupts_deferred() as interrupted:
            failure = self._write_final(tmp, _part_blocks(parts))
            if failure is None:
                os.replace(tmp, self.cache_path)
                shutil.rmtree(self.dir)
            elif os.path.exists(tmp):
                os.remove(tmp)
        self.release()
        if failure is not None:
            raise CacheError(f"could not assemble {self.cache_path}: {failure}. The parts in "
                             f"{self.dir} are kept; free space or fix the error, then rerun the "
                             "same command to retry")
        if interrupted:
            raise KeyboardInterrupt
        return self.cache_path

    def _write_final(self, tmp, blocks):
        """Write the final file at ``tmp`` from ``blocks``, an iterable of ``(start, stop,
        rows)`` with ``rows(path)`` the (stop - start, ...) array of a dataset; returns None,
        or the error text of a failure."""
        out = None
        try:
            out = h5py.File(tmp, "w")
            for key, value in self.attrs.items():
                out.attrs[key] = _attr_value(value)
            out.attrs["complete"] = False
            for path, value in self.constants.items():
                out.create_dataset(path, data=value, fletcher32=True)
            for path, (row_shape, dtype) in self.layout.items():
                _create_rows_dataset(out, path, self.n_samples, row_shape, dtype)
            for start, stop, rows in blocks:
                for path in self.layout:
                    out[path][start:stop] = rows(path)
            if "skipped" in self.layout:
                out.attrs["n_skipped"] = int(np.count_nonzero(out["skipped"][...]))
            out.flush()
            out.attrs["complete"] = True
            out.close()
            out = None
            _fsync_file(tmp)
            return None
        except (OSError, RuntimeError, ValueError) as err:
            text = str(err)
            err.__traceback__ = None
            del err
            if out is not None:
                try:
                    out.close()
                except Exception:
                    pass
            import gc
            gc.collect()      # drop every h5py object of the failed file before it is removed
            return text


class _interrupts_deferred:
    """Context manager: SIGINT sets a flag instead of raising (main thread only)."""

    def __enter__(self):
        import signal
        import threading
        self.flag = []
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, lambda *a: self.flag.append(True))
        return self.flag

    def __exit__(self, *exc):
        import signal
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class BackgroundWriter:
    """Commits parts on a thread, so compression and fsync overlap the next batch's compute.

    writer: a started ``CacheWriter``. ``put(start, arrays)`` queues rows (blocking while
    ``depth`` parts wait). The first write error stops the thread: later parts are not
    written (so the rows on disk stay a clean prefix of the queue) and the error is
    raised by the next ``put`` or by ``close``. ``close`` writes what is queued, then
    returns; use it in a ``finally`` so no computed batch is lost.
    """

    def __init__(self, writer, depth=2):
        import queue
        import threading
        self.writer = writer
        self.error = None
        self.queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.writer.write_rows(*item)
                except BaseException as err:   # handed to the main thread
                    self.error = err

    def put(self, start, arrays):
        """Queue rows ``[start, start + n)``; raises the writer's error if one happened."""
        if self.error is not None:
            raise self.error
        self.queue.put((start, arrays))

    def close(self):
        """Write what is queued, stop the thread, raise the first write error if any."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def _part_blocks(parts):
    """``(start, stop, rows)`` of each part file, read one at a time."""
    for start, stop, part in parts:
        with h5py.File(part, "r") as src:
            yield start, stop, lambda path: src[path][...]


def _attr_value(value):
    """HDF5-storable form of an attribute: JSON for containers, plain str for str subclasses."""
    if isinstance(value, (dict, list, tuple)):
        return dumps(value)
    if isinstance(value, str):
        return str(value)
    return value


def _create_rows_dataset(f, path, n, row_shape, dtype):
    """A per-row dataset: chunks of whole rows (at most ROWS_PER_CHUNK, about 1 MiB), with
    fletcher32 checksums. Float arrays (logits, features, statistics, maps) are stored
    uncompressed: gzip decoded them at about 140 MB/s and lzf at 265 MB/s where plain
    chunks read at 1.1 GB/s (45k x 2048 ReLU features, ``bench/scale.py``), for 1.4x less
    disk. Integer, bool and string datasets stay gzip-compressed (small, and they compress
    well). Caches written with gzip floats (schema v3 before this layout) read unchanged:
    HDF5 records each dataset's filters."""
    if path in STRING_DATASETS:
        return f.create_dataset(path, shape=(n,), dtype=h5py.string_dtype())
    rows = max(1, min(n, ROWS_PER_CHUNK, (1 << 20) // max(1, int(np.prod(row_shape)) * 4)))
    packed = {} if np.dtype(dtype).kind == "f" else {"compression": "gzip", "compression_opts": 1, "shuffle": True}
    return f.create_dataset(path, shape=(n, *row_shape), dtype=dtype, chunks=(rows, *row_shape),
                            fletcher32=True, **packed)
