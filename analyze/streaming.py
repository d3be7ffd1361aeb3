"""Statistics of a fitting cache computed block by block, in memory that does not grow
with the number of rows: sums and means, the exact percentile of every entry, Gram
matrices, and the k-th nearest neighbour distance over a bank read chunk by chunk.

Every function takes ``data`` (an ``analyze.data.CacheData``, iterated with
``data.blocks()``) or arrays; math only, no file format. Where the whole fitting set fits
in one block the results are exactly those of the in-memory formula (the same numpy
operations on the same array); over several blocks they differ only by the order of
floating-point sums (documented per function).
"""
import os
import shutil
import tempfile
import weakref

import numpy as np

_HIGH = 1 << 16
DENSE_MERGE = 0.02     # kth_nearest merges a chunk whole when over 2 % of its entries qualify


def block_sum(data, get):
    """``(sum over rows of get(block), rows)``: the float64 column sums (axis 0) of the
    arrays ``get(block)`` (n_b, ...) returns for the blocks of ``data``; ``sum / rows`` is
    the mean (equal to ``get(data).mean(axis=0)`` on one block: numpy's mean is that sum
    divided by n)."""
    total, rows = None, 0
    for block in data.blocks():
        if block.n == 0:
            continue
        part = np.asarray(get(block), dtype=np.float64).sum(axis=0)
        total = part if total is None else total + part
        rows += block.n
    return total, rows


def gram(data, get):
    """``(sum over rows of v v^T, rows)`` (D, D) float64 of the vectors ``get(block)``
    (n_b, D): a block at a time (on one block ``v.T @ v``)."""
    total, rows = None, 0
    for block in data.blocks():
        if block.n == 0:
            continue
        v = np.asarray(get(block), dtype=np.float64)
        part = v.T @ v
        total = part if total is None else total + part
        rows += block.n
    return total, rows


def _order_keys(values):
    """uint32 keys ordered as the float32 values (negative floats reversed, sign bit flipped)."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return np.where(u & np.uint32(0x80000000), ~u, u | np.uint32(0x80000000))


def _from_key(key):
    key = np.uint32(key)
    u = key & np.uint32(0x7FFFFFFF) if key & np.uint32(0x80000000) else ~key
    return float(np.array([u], dtype=np.uint32).view(np.float32)[0])


def exact_percentile(chunks, q):
    """``np.percentile(all values, q)`` (linear interpolation) of the float32-representable
    values that ``chunks()`` yields (arrays of any shape; ``chunks`` is called twice), in
    O(65,536) memory: an exact radix selection of the two order statistics the
    interpolation needs, in two passes (pass 1 histograms the high 16 bits of each value's
    order key, pass 2 the low 16 bits inside the bins holding those ranks), then numpy's
    own interpolation formula on them. Equal to ``np.percentile`` of the concatenated
    values bit for bit (tested). Values that are not exactly float32 raise ValueError."""
    hist, n = np.zeros(_HIGH, np.int64), 0
    for values in chunks():
        values = np.asarray(values).ravel()
        if values.dtype != np.float32 and np.any(values.astype(np.float32) != values):
            raise ValueError("exact_percentile needs float32 values (features and statistics are stored so)")
        hist += np.bincount(_order_keys(values) >> 16, minlength=_HIGH)
        n += len(values)
    if n == 0:
        raise ValueError("exact_percentile of no values")
    # numpy's linear method: virtual index q/100 * (n - 1), lerp between its neighbours
    virtual = np.true_divide(np.asarray(q, dtype=np.float64), 100) * (n - 1)
    lo = int(np.floor(virtual))
    hi = min(lo + 1, n - 1)
    gamma = virtual - np.floor(virtual)
    cum = np.cumsum(hist)
    wanted = sorted({lo, hi})
    bins = {r: int(np.searchsorted(cum, r, side="right")) for r in wanted}
    low_hist = {b: np.zeros(_HIGH, np.int64) for b in set(bins.values())}
    for values in chunks():
        keys = _order_keys(np.asarray(values).ravel())
        high = keys >> 16
        for b, h in low_hist.items():
            h += np.bincount(keys[high == b] & np.uint32(0xFFFF), minlength=_HIGH)
    found = {}
    for r, b in bins.items():
        before = int(cum[b - 1]) if b else 0
        low = int(np.searchsorted(np.cumsum(low_hist[b]), r - before, side="right"))
        found[r] = _from_key((b << 16) | low)
    a, b = np.float64(found[lo]), np.float64(found[hi])
    diff = b - a
    out = a + diff * gamma
    if gamma >= 0.5:
        out = b - diff * (1 - gamma)
    return np.float64(out)


def kth_nearest(queries, bank_chunks, k):
    """(n,) float64 distance from each row of ``queries`` (n, D) to its k-th nearest row
    among the chunks ``bank_chunks`` yields (arrays (m_i, D)); the bank is never held whole.

    Float32 arithmetic as faiss's ``IndexFlatL2`` (which the KNN release uses):
    ||q||^2 + ||b||^2 - 2 q.b by one GEMM per chunk, clipped at 0, then the square root of
    the k-th smallest. Per chunk only the entries below each query's current k-th distance
    are merged into its running k best (``np.partition``; the whole chunk while more than
    DENSE_MERGE of its entries qualify), so after the first chunks the merge costs little
    beside the GEMM. Memory: the queries, one chunk and a (n, m_i)
    distance block.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    qq = np.einsum("nd,nd->n", q, q)
    best = np.full((len(q), k), np.inf, np.float32)
    kth = np.full(len(q), np.inf, np.float32)
    seen = 0
    for chunk in bank_chunks:
        b = np.ascontiguousarray(chunk, dtype=np.float32)
        if not len(b):
            continue
        seen += len(b)
        d2 = q @ b.T
        d2 *= np.float32(-2)
        d2 += qq[:, None]
        d2 += np.einsum("nd,nd->n", b, b)[None, :]
        below = d2 < kth[:, None]
        hits = int(np.count_nonzero(below))
        if not hits:
            continue
        if hits > DENSE_MERGE * below.size:      # the first chunks: merge every entry
            best = np.partition(np.concatenate([best, d2], axis=1), k - 1, axis=1)[:, :k]
            kth = best.max(axis=1)
            continue
        rows, cols = np.nonzero(below)
        counts = np.bincount(rows, minlength=len(q))
        width = int(counts.max())
        starts = np.cumsum(counts) - counts
        cand = np.full((len(q), width), np.inf, np.float32)
        cand[rows, np.arange(len(rows)) - starts[rows]] = d2[rows, cols]
        touched = np.flatnonzero(counts)
        merged = np.concatenate([best[touched], cand[touched]], axis=1)
        best[touched] = np.partition(merged, k - 1, axis=1)[:, :k]
        kth[touched] = best[touched].max(axis=1)
    if seen < k:
        raise ValueError(f"k={k} nearest neighbours asked of a bank of {seen} rows")
    return np.sqrt(np.maximum(kth, 0)).astype(np.float64)


def class_moments(data, get=lambda block: block.features):
    """``store.gaussian.ClassMoments`` of the vectors ``get(block)`` (n_b, D) labelled by the
    blocks' labels, accumulated block by block."""
    from gradood.store.gaussian import ClassMoments
    moments = ClassMoments()
    for block in data.blocks():
        if block.n:
            moments.update(get(block), block.labels)
    return moments


def group_means(data, get, group, size):
    """``(means (size, ...), counts (size,))``: per group g in [0, size) the mean of the rows
    of ``get(block)`` whose ``group(block)`` is g (a negative group: no group), NaN rows for
    empty groups; summed block by block in float64 (on one block exactly
    ``v[group == g].mean(axis=0)``)."""
    sums, counts = None, np.zeros(size, np.int64)
    for block in data.blocks():
        if block.n == 0:
            continue
        v, g = np.asarray(get(block), dtype=np.float64), np.asarray(group(block))
        if sums is None:
            sums = np.zeros((size, *v.shape[1:]))
        for c in np.unique(g[g >= 0]):
            rows = g == c
            sums[c] += v[rows].sum(axis=0)
            counts[c] += np.count_nonzero(rows)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts.reshape(-1, *([1] * (sums.ndim - 1))), counts


def feature_mean(data):
    """(D,) float64 mean training feature, streamed (``block_sum``; on one block exactly
    ``data.features.mean(axis=0)``)."""
    total, rows = block_sum(data, lambda b: b.features)
    return total / rows


def gather(data, rows, get):
    """``get(block)`` (n_b, ...) at the usable rows ``rows`` (sorted indices into the
    concatenation of the blocks), concatenated in that order, read block by block; memory
    is the gathered rows only."""
    parts, at = [], 0
    for block in data.blocks():
        mine = rows[(rows >= at) & (rows < at + block.n)] - at
        if len(mine):
            parts.append(get(block)[mine])
        at += block.n
    return np.concatenate(parts)


def disk_array(shape, dtype):
    """A zero-filled ``np.memmap`` of ``shape`` and ``dtype`` backed by a ``.npy`` file in a
    temporary folder that is removed with the array: an array as large as the disk allows,
    filled block by block, of which only the touched pages stay in memory. A fit that keeps
    one (KNN's bank) is saved by copying that file (``analyze.fitting.FitStore``)."""
    folder = tempfile.mkdtemp(prefix="gradood-")
    array = np.lib.format.open_memmap(os.path.join(folder, "array.npy"), mode="w+", dtype=dtype, shape=shape)
    weakref.finalize(array, shutil.rmtree, folder, True)
    return array
