"""What a score sees of a cache: ``CacheData``, one block of rows read lazily.

This is the one thin layer between the HDF5 cache and the score math. Each array is read
from the file at most once per block, on first use, and returned as a numpy array with
one row per sample of the block. A score entry's declared ``needs`` bound what it may
read: reading an undeclared statistic raises, so the declaration stays the truth that
extraction plans and cache comparisons rely on.
"""
import numpy as np

from gradood.store.recipes import holds, layers_of
from gradood.store.schema import ADASCALE_FEATURES, GRAM_STATS, IODIN_LOGITS, odin_label, MAHA_ADVERSARIAL, MAHA_SCORES, MAP, STATS, TRACKING_PATH, CacheError, odin_pairs, odin_path, stat_path


class CacheData:
    """Rows ``[start, stop)`` of one open cache (``store.reader.CacheReader``), optionally
    restricted to the rows where ``keep`` (bool, length stop - start) is True.

    needs: the ``(hook set, source, stat)`` triples the reading score declared (None: no
    restriction). passes: its declared extra passes.

    Arrays (n rows; float64 unless said): ``logits`` (n, K), ``features`` (n, D),
    ``labels`` (n,) int64, ``skipped`` (n,) bool, ``paths`` (n,) str, ``head_weight``
    (K, D), ``head_bias`` (K,). Layers: ``layers(hook_set)``, ``area(layer)`` (H*W),
    ``shape(layer)`` (C, H, W), ``stat(layer, source, stat)`` (n, C),
    ``map(layer, source)`` (n, C, H, W) float32, ``count_above(layer, source, tau)`` (n, C).
    Extra passes: ``odin_logits(T, eps, std_divided)`` (n, K), ``odin_passes``,
    ``tracking_norms`` (n, K, P), ``tracked_parameters``, ``maha_scores`` /
    ``maha_adversarial`` (n, M, L) float32, ``adascale_features`` (n, D),
    ``iodin_logits`` (n, K).
    """

    def __init__(self, reader, start=0, stop=None, keep=None, needs=None, passes=None, score=None):
        self.reader = reader
        self.start = start
        self.stop = reader.n_samples if stop is None else stop
        self.keep = None if keep is None else np.asarray(keep, dtype=bool)
        self.attrs = reader.attrs
        self.path = reader.path
        self.score_name = score
        self._needs = None if needs is None else [tuple(n) for n in needs]
        self._passes = None if passes is None else tuple(passes)
        self._memo = {}

    # ------------------------------------------------------------------------ blocks
    def blocks(self, rows=None):
        """The rows of this block in consecutive sub-blocks: CacheData objects with the same
        ``keep``, ``needs`` and ``passes``, each read lazily. ``rows`` (cache rows per
        sub-block) defaults to ``fit_block_rows``: about FIT_BLOCK_BYTES of float64 per
        sub-block, so a fit that keeps only per-block temporaries and its accumulators
        runs in memory bounded independently of the fitting set's size. A block that fits
        whole is yielded as one sub-block holding every row (the same arrays as ``self``)."""
        rows = fit_block_rows(self) if rows is None else int(rows)
        for a in range(self.start, self.stop, rows):
            b = min(a + rows, self.stop)
            keep = None if self.keep is None else self.keep[a - self.start:b - self.start]
            yield CacheData(self.reader, a, b, keep=keep, needs=self._needs, passes=self._passes,
                            score=self.score_name)

    # ----------------------------------------------------------------- plain arrays
    def _rows(self, name):
        if name not in self._memo:
            value = self.reader.read(name, self.start, self.stop)
            self._memo[name] = value if self.keep is None else value[self.keep]
        return self._memo[name]

    @property
    def n(self):
        """Number of rows of the block."""
        return int(self.stop - self.start if self.keep is None else self.keep.sum())

    @property
    def rows(self):
        """(n,) int64 row indices in the cache (the same for a row in any block)."""
        rows = np.arange(self.start, self.stop, dtype=np.int64)
        return rows if self.keep is None else rows[self.keep]

    @property
    def num_classes(self):
        return int(self.attrs["num_classes"])

    @property
    def logits(self):
        """(n, K) float64 logits."""
        return self._rows("logits").astype(np.float64)

    @property
    def features(self):
        """(n, D) float64 pooled penultimate features (the head input)."""
        return self._rows("features").astype(np.float64)

    @property
    def labels(self):
        """(n,) int64 labels, -1 where the dataset has none."""
        return self._rows("labels")

    @property
    def skipped(self):
        """(n,) bool, True for unreadable images (their rows are zeros)."""
        return self._rows("skipped").astype(bool)

    @property
    def paths(self):
        """(n,) source paths."""
        return self._rows("paths")

    def _head(self):
        if "head" not in self._memo:
            self._memo["head"] = self.reader.head()
        return self._memo["head"]

    @property
    def head_weight(self):
        """(K, D) float64 weight of the classifier head."""
        return self._head()[0]

    @property
    def head_bias(self):
        """(K,) float64 bias of the classifier head."""
        return self._head()[1]

    # ------------------------------------------------------------------ hooked layers
    def layers(self, hook_set):
        """Layer names of ``hook_set`` in module order; raises when it was not extracted."""
        layers = layers_of(self.attrs["hook_sets"], hook_set)
        if not layers:
            raise CacheError(f"{self.path}: hook set {hook_set!r} was not extracted (extracted: "
                             f"{', '.join(self.attrs['hook_sets']) or 'none'})")
        return list(layers)

    def shape(self, layer):
        """(C, H, W) of ``layer``'s output."""
        if layer not in self.attrs["layer_shapes"]:
            raise CacheError(f"{self.path}: layer {layer!r} was not hooked")
        return tuple(self.attrs["layer_shapes"][layer])

    def area(self, layer):
        """H * W of ``layer``'s output (1 for a vector)."""
        c, h, w = self.shape(layer)
        return int(h * w)

    def _allowed(self, layer, source, stat):
        if self._needs is None:
            return True
        for set_name, src, st in self._needs:
            if src == source and (st == stat or st == MAP) and layer in (layers_of(self.attrs["hook_sets"], set_name) or [set_name]):
                return True
        return False

    def _check(self, layer, source, stat):
        if not self._allowed(layer, source, stat):
            raise CacheError(f"score {self.score_name or '?'} read {stat_path(layer, source, stat)} "
                             "without declaring it: add (hook set, source, stat) to its needs")
        if not holds(self.attrs, layer, source, stat):
            stored = self.attrs["plan"].get(layer, {})
            have = "; ".join(f"{s}: {','.join(v)}" for s, v in stored.items()) or "nothing"
            how = ("maps are stored only under the raw policy: re-extract with --store "
                   f"{layer}=raw (or --policy raw)") if stat == MAP else (
                   f"re-extract with --store {layer}=stats (or --policy stats), or store maps "
                   f"(--store {layer}=raw) to compute any statistic")
            raise CacheError(f"{self.path} has no {stat_path(layer, source, stat)} (stored at "
                             f"{layer}: {have}); {how}")

    def stat(self, layer, source, stat):
        """(n, C) float64 per-channel ``stat`` (``store.schema.STATS``) of ``source``
        ("act" or an objective) at ``layer``; computed from the stored maps when only
        those are stored (float64 arithmetic on the float32 map: equal to the stored
        statistic up to float32 rounding, exact for ``nonzero``)."""
        if stat not in STATS:
            raise CacheError(f"unknown statistic {stat!r}; choose one of {', '.join(STATS)}")
        self._check(layer, source, stat)
        if stat in self.attrs["plan"].get(layer, {}).get(source, []):
            return self._rows(stat_path(layer, source, stat)).astype(np.float64)
        return map_stat(self.map(layer, source, _checked=True), stat)

    def map(self, layer, source, _checked=False):
        """(n, C, H, W) float32 map of ``source`` at ``layer`` (``raw`` policy only)."""
        if not _checked:
            self._check(layer, source, MAP)
        return self._rows(stat_path(layer, source, MAP))

    def count_above(self, layer, source, tau):
        """(n, C) float64 count of entries with |v| > ``tau`` per channel, from the stored maps.

        With ``tau`` = 0 this is the ``nonzero`` count; a small positive ``tau`` counts
        entries that rounding (e.g. a GPU kernel) may have moved off exact zero.
        """
        if float(tau) == 0 and "nonzero" in self.attrs["plan"].get(layer, {}).get(source, []):
            return self.stat(layer, source, "nonzero")
        m = self.map(layer, source)
        return (np.abs(m) > float(tau)).sum(axis=(2, 3)).astype(np.float64)

    # ------------------------------------------------------------------- extra passes
    def _check_pass(self, name):
        if self._passes is not None and name not in self._passes:
            raise CacheError(f"score {self.score_name or '?'} read the {name} pass without "
                             f"declaring it: add passes=({name!r},)")

    @property
    def odin_passes(self):
        """Recorded ODIN passes ``[(T, epsilon, std_divided)]``."""
        return odin_pairs(self.attrs)

    def odin_logits(self, temperature, epsilon, std_divided=False):
        """(n, K) float64 logits of the ODIN-perturbed input (not divided by T)."""
        self._check_pass("odin")
        key = (float(temperature), float(epsilon), bool(std_divided))
        if key not in self.odin_passes:
            raise CacheError(f"{self.path}: no ODIN pass {odin_label(*key)}; recorded: "
                             f"{_describe_odin(self.odin_passes)} (extract with --odin T,EPS[,std])")
        return self._rows(odin_path(*key)).astype(np.float64)

    @property
    def tracked_parameters(self):
        """Names of the tensors in ``tracking_norms`` (last axis)."""
        return list(self.attrs.get("tracked_parameters") or [])

    @property
    def tracking_norms(self):
        """(n, K, P) float64 per-label weight-gradient norms (gradient tracking)."""
        self._check_pass("tracking")
        return self._rows(TRACKING_PATH).astype(np.float64)

    @property
    def maha_scores(self):
        """(n, M, L) float32 multi-layer Mahalanobis scores per magnitude and layer."""
        self._check_pass("mahalanobis")
        return self._rows(MAHA_SCORES)

    @property
    def adascale_features(self):
        """(n, D) float64 features of the AdaScale-perturbed input (``extract.adascale``)."""
        self._check_pass("adascale")
        if not self.attrs.get("adascale"):
            raise CacheError(f"{self.path}: no AdaScale perturbed features were recorded "
                             "(extract with --score adascale_a)")
        return self._rows(ADASCALE_FEATURES).astype(np.float64)

    @property
    def iodin_logits(self):
        """(n, K) float64 logits of the iODIN-perturbed input (``extract.iodin``; not divided by T)."""
        self._check_pass("iodin")
        if not self.attrs.get("iodin"):
            raise CacheError(f"{self.path}: no iODIN pass was recorded (extract with --score iodin)")
        return self._rows(IODIN_LOGITS).astype(np.float64)

    @property
    def maha_adversarial(self):
        """(n, M, L) float32 the same for each row's pseudo-OOD copy."""
        self._check_pass("mahalanobis")
        return self._rows(MAHA_ADVERSARIAL)


FIT_BLOCK_BYTES = 256 << 20


def fit_block_rows(data):
    """Cache rows per sub-block of ``CacheData.blocks``: FIT_BLOCK_BYTES over the float64
    bytes of one row's features and logits (and the maps its score declared), e.g. 10,900
    rows of a 2048-d, 1000-class cache, 62,000 of a 512-d, 10-class one."""
    attrs = data.attrs
    dim = attrs.get("feature_dim") or data.head_weight.shape[1]
    per_row = 8 * (int(dim) + int(attrs["num_classes"]))
    for set_name, _, stat in data._needs or []:
        if stat == MAP:
            for layer in layers_of(attrs["hook_sets"], set_name) or []:
                per_row += 8 * int(np.prod(attrs["layer_shapes"][layer]))
    return max(1, FIT_BLOCK_BYTES // per_row)


def _describe_odin(pairs):
    return "; ".join(odin_label(*p) for p in pairs) or "none"


def map_stat(m, stat):
    """(n, C) float64 statistic ``stat`` over H x W of maps ``m`` (n, C, H, W)."""
    flat = m.reshape(m.shape[0], m.shape[1], -1).astype(np.float64)
    if stat == "nonzero":
        return (flat != 0).sum(axis=2).astype(np.float64)
    if stat == "mean":
        return flat.mean(axis=2)
    if stat == "abs_mean":
        return np.abs(flat).mean(axis=2)
    if stat == "sq_mean":
        return (flat ** 2).mean(axis=2)
    if stat == "abs_max":
        return np.abs(flat).max(axis=2)
    if stat in GRAM_STATS:
        t = flat ** int(stat[4:])
        s = (t * t.sum(axis=1, keepdims=True)).sum(axis=2)
        return np.sign(s) * np.abs(s) ** (1.0 / int(stat[4:]))
    raise CacheError(f"unknown statistic {stat!r}; choose one of {', '.join(STATS)}")
