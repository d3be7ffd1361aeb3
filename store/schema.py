"""Cache schema (``SCHEMA_VERSION``): the one place that defines what a cache file holds.

The schema is data (``ROOT_ATTRS``, ``DATASETS``): the writer's layout is built from it
(``layout``), the reader validates every file against it (``validate``), and two caches
are compared by one function (``differing``). Everything else in this docstring restates
those tables for readers of the file with plain h5py or h5dump.

One HDF5 file per (model, dataset), ``<cache_dir>/<dataset>.h5``. N samples, K classes,
D penultimate features; C, H, W channels and spatial size of a hooked layer's output.
Rows are samples in dataset order everywhere. Dataset paths may contain placeholders:
``{layer}`` a hooked module name, ``{objective}`` a backward objective (``OBJECTIVES``),
``{stat}`` a statistic (``STATS``), ``{pair}`` an ODIN pass name (``odin_name``).

Per-channel statistics over the H x W positions (STATS):
    nonzero   int32, count of entries != 0 (exact: computed before any storage)
    mean      spatial mean; the spatial sum is ``mean * H * W``
    abs_mean  mean of |v|;   sq_mean  mean of v**2;   abs_max  max of |v|
    gram1 .. gram10  GRAM's p-th order Gram row sums (Sastry & Oore, ICML 2020): with
              t = v**p over the H x W positions of one sample, s_c = sum_c' <t_c, t_c'>,
              stored as sign(s_c) |s_c|^(1/p); computed in float64 before storage. Only
              what a score asks for is recorded: the policies store the five above.
The gradient recorded is what a tensor hook registered on the module's output receives;
where an in-place ReLU follows the module, that is the gradient w.r.t. the pre-ReLU
tensor (as in the authors' hooks). Activations are likewise taken before in-place ops.

Layouts: a hooked output may be a map (N, C, H, W), a channels-last map (N, H, W, C), a
token sequence (N, T, C) or a vector (N, C). Every statistic and stored map is of its
channels-first form, (N, C, H, W), with a token sequence as (N, C, T, 1);
``layer_layouts`` records each layer's own layout (``NCHW``, ``NHWC``, ``NTC``, ``NC``).

Versions: 4 allows a model without a linear head: ``head`` is "" and the cache holds no
``head/weight`` or ``head/bias``; ``features`` is then the vector the adapter found
(``extract.adapters.trace.FeatureSource``). 3 added ``layer_layouts``, ``layer_types``, ``head``, ``feature_dim``, the
model file of ``--model-file`` and ``content_hash``; caches without them are channels first throughout. 2 added ``weights_sha256`` (the fingerprint of the loaded tensors), ``family``
and ``subset`` as declared attributes and ODIN passes with the original ODIN's division
by the normalisation std. Version 1 caches are still read (their ODIN passes are the
GradNorm release's, their weights are identified by the checkpoint file's hash).
"""
import json
from typing import Callable, NamedTuple

SCHEMA_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)

CHANNEL_STATS = ("nonzero", "mean", "abs_mean", "sq_mean", "abs_max")
GRAM_POWERS = tuple(range(1, 11))
GRAM_STATS = tuple(f"gram{p}" for p in GRAM_POWERS)
STATS = CHANNEL_STATS + GRAM_STATS
MAP = "map"

# Backward objectives (all summed over the batch; per-sample gradients are exact because
# the model is in eval mode and no sample influences another).
OBJECTIVES = {
    "max_logit": "sum_n max_k z[n, k]  (GAIA-Z)",
    "log_softmax_sum": "sum_n sum_k log_softmax(z)[n, k]  (GAIA-A pass 1; NAC-UE up to -1/K)",
    "feature_sum": "sum_n sum_d x[n, d], x the head input  (GAIA-A pass 2)",
}
SOURCES = ("act", *OBJECTIVES)

# A module output's own layout, as the tracer found it; stored maps and statistics are
# always channels first, [C, H, W] (``layer_shapes``).
LAYOUTS = ("NC", "NCHW", "NHWC", "NTC")

# Storage policies per hooked layer.
POLICIES = {
    "scores": "only the statistics the requested scores read (the default)",
    "pooled": "spatial means of activation and of every recorded gradient",
    "stats": "every statistic in CHANNEL_STATS of activation and every recorded gradient",
    "raw": "every statistic plus the full maps, losslessly compressed",
}


class Attr(NamedTuple):
    """A root attribute: its Python type after decoding, JSON-encoded or not, required or not."""
    kind: type
    json: bool
    required: bool
    doc: str


ROOT_ATTRS = {
    "schema_version": Attr(int, False, True, "SCHEMA_VERSION of the writer"),
    "complete": Attr(bool, False, True, "set True last, after every dataset is written"),
    "n_samples": Attr(int, False, True, "N"),
    "dataset": Attr(str, False, True, "dataset name"),
    "dataset_root": Attr(str, False, False, "folder (or list file) the images came from"),
    "benchmark": Attr(str, False, False, "benchmark preset of the extraction, empty for custom sets"),
    "split": Attr(str, False, False, "test or train"),
    "subset": Attr(dict, True, False, '{"limit": int or null, "balanced": bool}'),
    "arch": Attr(str, False, True, "architecture name (extract.models): NAME, torchvision:NAME, timm:NAME, file:FILE:FUNC"),
    "family": Attr(str, False, False, "model adapter that defined the hook sets: generic, wrn, bit"),
    "head": Attr(str, False, False, 'module name of the linear head; "" when the model has none (no head/ datasets)'),
    "features": Attr(str, False, False, 'without a linear head: where the features are taken, "MODULE input" or '
                     '"MODULE output", "averaged" when pooled over positions (extract.adapters.trace.FeatureSource)'),
    "output": Attr(str, False, False, "--output: index or key of the logits in the model's tuple, dict or dataclass output"),
    "model_file": Attr(str, False, False, "the user's model file (--model-file)"),
    "model_file_sha256": Attr(str, False, False, "SHA-256 of that file"),
    "num_classes": Attr(int, False, True, "K"),
    "feature_dim": Attr(int, False, False, "D, the head input's size"),
    "checkpoint": Attr(str, False, False, "checkpoint path at extraction"),
    "checkpoint_sha256": Attr(str, False, True, "SHA-256 of the checkpoint file"),
    "weights_sha256": Attr(str, False, False, "SHA-256 of the loaded tensors (names, shapes, float32 values)"),
    "preprocess": Attr(dict, True, True, "the evaluation transform: name and steps"),
    "objectives": Attr(list, True, True, "backward objectives recorded (OBJECTIVES)"),
    "layers": Attr(list, True, True, "hooked module names, in module order"),
    "layer_shapes": Attr(dict, True, True, "{layer: [C, H, W]} of each hooked module's output, channels first"),
    "layer_layouts": Attr(dict, True, False, "{layer: NCHW | NHWC | NTC | NC}: the module's own output layout"),
    "layer_types": Attr(dict, True, False, "{layer: module class name}"),
    "layer_activations": Attr(dict, True, False, "{layer: class of the activation module applied to its output, or ''}"),
    "hook_sets": Attr(dict, True, True, "{set name: [layer, ...]}, e.g. bn, before_head"),
    "plan": Attr(dict, True, True, '{layer: {"act" | objective: [stat, ...]}}: what was stored'),
    "policies": Attr(dict, True, False, "{layer: policy} (POLICIES)"),
    "fingerprint": Attr(dict, True, True, "the identity fields (FINGERPRINT_FIELDS) at extraction"),
    "odin": Attr(list, True, False, "ODIN passes: [[T, epsilon, std_divided], ...]"),
    "odin_std": Attr(list, True, False, "per-channel normalisation std the ODIN gradient is divided by"),
    "tracked_parameters": Attr(list, True, False, "parameter names in tracking/norms"),
    "mahalanobis": Attr(dict, True, False, "multi-layer Mahalanobis recipe (extract.mahalanobis)"),
    "adascale": Attr(dict, True, False, "AdaScale's input perturbation {o, step} (extract.adascale)"),
    "iodin": Attr(dict, True, False, "iODIN's perturbation {temperature, epsilon} (extract.iodin)"),
    "batch_size": Attr(int, False, False, "rows per batch: batches are rows [k*B, (k+1)*B)"),
    "world_size": Attr(int, False, False, "processes of the (last) extraction run"),
    "n_skipped": Attr(int, False, False, "images that could not be read (--skip-bad)"),
    "torch_version": Attr(str, False, False, ""), "torchvision_version": Attr(str, False, False, ""),
    "device": Attr(str, False, False, ""), "created": Attr(str, False, False, "UTC time of assembly"),
    "tool_version": Attr(str, False, False, ""),
}
JSON_ATTRS = tuple(k for k, a in ROOT_ATTRS.items() if a.json)
REQUIRED_ROOT_ATTRS = tuple(k for k, a in ROOT_ATTRS.items() if a.required)


class Dataset(NamedTuple):
    """A dataset: row shape in symbols (``per_row`` False: the whole shape), dtype, meaning,
    and the values it may hold (``VALUE_RULES``; checked by the reader on every read)."""
    shape: tuple
    dtype: str
    per_row: bool
    doc: str
    values: str = ""


# What a dataset's values may be: "finite" (no NaN or inf), "count" (an integer in
# [0, H * W] of its layer). Statistics of a layer's own values may be anything finite.
VALUE_RULES = {"finite": "finite floats", "count": "counts in [0, H*W] of the layer"}


DATASETS = {
    "logits": Dataset(("K",), "float32", True, "logits", "finite"),
    "features": Dataset(("D",), "float32", True, "pooled penultimate vector, the input of the head (without a "
                        "linear head: where the features attribute says)", "finite"),
    "labels": Dataset((), "int64", True, "class label, -1 where the dataset has none"),
    "paths": Dataset((), "str", True, "source file, or <set>:<index> for array datasets"),
    "content_hash": Dataset((), "str", True, "SHA-1 of the preprocessed image tensor's bytes (16 hex digits): "
                            "the same image gives the same hash in every cache of one preprocessing"),
    "skipped": Dataset((), "bool", True, "True where the image was unreadable (row values are zeros)"),
    "skip_reasons": Dataset((), "str", True, "the decoder's error for skipped rows, empty elsewhere"),
    "head/weight": Dataset(("K", "D"), "float32", False, "head weight (a 1x1 conv head is reshaped)"),
    "head/bias": Dataset(("K",), "float32", False, "head bias"),
    "layers/{layer}/act/{stat}": Dataset(("C",), "float32", True, "statistic of the forward output", "finite"),
    "layers/{layer}/act/map": Dataset(("C", "H", "W"), "float32", True, "forward output (raw policy)"),
    "layers/{layer}/grad/{objective}/{stat}": Dataset(("C",), "float32", True,
                                                      "statistic of d objective / d output", "finite"),
    "layers/{layer}/grad/{objective}/map": Dataset(("C", "H", "W"), "float32", True,
                                                   "d objective / d output (raw policy)"),
    "odin/{pair}/logits": Dataset(("K",), "float32", True,
                                  "logits of the ODIN-perturbed input (not divided by T)"),
    "tracking/norms": Dataset(("K", "P"), "float32", True,
                              "L2 norm of the weight gradient of tracked tensor p for the "
                              "cross-entropy with class k as the label"),
    "mahalanobis/scores": Dataset(("M", "L"), "float32", True,
                                  "input-preprocessed Mahalanobis score of layer l at magnitude m"),
    "mahalanobis/adversarial_scores": Dataset(("M", "L"), "float32", True,
                                              "the same for the row's pseudo-OOD copy"),
    "adascale/features": Dataset(("D",), "float32", True,
                                 "pooled penultimate vector of the AdaScale-perturbed input", "finite"),
    "iodin/logits": Dataset(("K",), "float32", True, "logits of the iODIN-perturbed input (not divided by T)",
                            "finite"),
}
REQUIRED_DATASETS = ("logits", "features", "labels", "paths", "skipped")
HEAD_DATASETS = ("head/weight", "head/bias")     # required unless the ``head`` attribute is ""
STRING_DATASETS = ("paths", "skip_reasons", "content_hash")
TRACKING_PATH = "tracking/norms"
MAHA_SCORES = "mahalanobis/scores"
MAHA_ADVERSARIAL = "mahalanobis/adversarial_scores"
ADASCALE_FEATURES = "adascale/features"
IODIN_LOGITS = "iodin/logits"

# What two caches must share to be compared, by what a score reads. ``model`` fields
# apply to every comparison; the rest only when the score reads that part of the cache.
MODEL_FIELDS = ("arch", "num_classes", "weights", "preprocess", "features")
FINGERPRINT_FIELDS = ("schema_version", "arch", "num_classes", "checkpoint_sha256", "weights_sha256",
                      "preprocess", "objectives", "layers", "plan", "odin", "tracked_parameters")


class CacheError(Exception):
    """A cache file is missing, damaged, incomplete or does not fit the request."""


def stat_path(layer, source, stat):
    """HDF5 path of a per-channel statistic (or ``map``); ``source`` is ``"act"`` or an objective."""
    if source == "act":
        return f"layers/{layer}/act/{stat}"
    return f"layers/{layer}/grad/{source}/{stat}"


def odin_name(temperature, epsilon, std_divided=False):
    """Name of one ODIN pass: ``T<T>_eps<epsilon>`` (+ ``_std`` when the input gradient was
    divided by the normalisation std, as the original ODIN code and OpenOOD do)."""
    return f"T{float(temperature):g}_eps{float(epsilon):g}" + ("_std" if std_divided else "")


def odin_path(temperature, epsilon, std_divided=False):
    """HDF5 path of the perturbed logits of one ODIN pass."""
    return f"odin/{odin_name(temperature, epsilon, std_divided)}/logits"


def odin_pass(p):
    """One ODIN pass ``(T, epsilon[, std_divided])`` as ``(float, float, bool)``."""
    return float(p[0]), float(p[1]), bool(p[2]) if len(p) > 2 else False


def odin_label(temperature, epsilon, std_divided=False):
    """A pass for people: ``T=1000, eps=0.0014`` (+ ``, std``)."""
    return f"T={float(temperature):g}, eps={float(epsilon):g}" + (", std" if std_divided else "")


def odin_pairs(attrs):
    """Recorded ODIN passes of a cache as ``[(T, epsilon, std_divided)]`` (version 1: no std)."""
    return [odin_pass(p) for p in attrs.get("odin") or []]


class ExtraPass(NamedTuple):
    """An extraction pass beside the forward pass and the backward objectives, declared
    once: everything the store knows of it.

    name: what scores declare (``register_score(passes=(name,))``). attr: the root
    attribute recording its recipe; a cache holds the pass where that attribute is set.
    describe: what it computes. how: what a cache lacking it needs (``recipes.missing``).
    datasets: ``recipe -> {dataset path: (DATASETS key, {symbol: size})}``, the per-row
    datasets it writes for the recorded recipe (``layout``, ``validate``). optional: the
    paths older caches may lack."""
    name: str
    attr: str
    describe: str
    how: str
    datasets: Callable
    optional: tuple = ()


def _maha_datasets(recipe):
    dims = {"M": len(recipe.get("magnitudes", [])), "L": len(recipe.get("layers", []))}
    out = {MAHA_SCORES: (MAHA_SCORES, dims)}
    if recipe.get("adversarial"):
        out[MAHA_ADVERSARIAL] = (MAHA_ADVERSARIAL, dims)
    return out


EXTRA_PASSES = {p.name: p for p in (
    ExtraPass("odin", "odin", "ODIN's perturbed forward pass (--odin T,EPS[,std])",
              "no ODIN pass was recorded (extract with --score odin, --odin T,EPS)",
              lambda recipe: {odin_path(*odin_pass(p)): ("odin/{pair}/logits", {}) for p in recipe}),
    ExtraPass("tracking", "tracked_parameters",
              "K backward passes for the per-sample weight-gradient norms (gradient tracking)",
              "no gradient-tracking norms were recorded (extract with --score tracking)",
              lambda names: {TRACKING_PATH: (TRACKING_PATH, {"P": len(names)})}),
    ExtraPass("mahalanobis", "mahalanobis",
              "multi-layer input-preprocessed Mahalanobis scores (--maha-fit TRAIN_CACHE)",
              "no multi-layer Mahalanobis scores were recorded (extract with --maha-fit TRAIN_CACHE; the "
              "validation set also with --maha-adversarial)", _maha_datasets, optional=(MAHA_ADVERSARIAL,)),
    ExtraPass("adascale", "adascale",
              "AdaScale's perturbed forward (the least max-logit-sensitive pixels moved; its features)",
              "no AdaScale perturbed features were recorded (extract with --score adascale_a)",
              lambda recipe: {ADASCALE_FEATURES: (ADASCALE_FEATURES, {})}),
    ExtraPass("iodin", "iodin",
              "iODIN's perturbed forward (ODIN's std-divided step at the one most sensitive input entry)",
              "no iODIN pass was recorded (extract with --score iodin)",
              lambda recipe: {IODIN_LOGITS: (IODIN_LOGITS, {})}),
)}


def pass_recipes(attrs):
    """``{root attribute: recipe}`` of the extra passes a cache's root ``attrs`` record."""
    return {p.attr: attrs[p.attr] for p in EXTRA_PASSES.values() if attrs.get(p.attr)}


def layout(num_classes, feature_dim, plan, layer_shapes, recipes=None):
    """``{dataset path: (row shape, numpy dtype name)}`` of every per-row dataset a cache
    with this plan holds, resolved from ``DATASETS``. ``recipes``: ``{root attribute:
    recipe}`` of the extra passes run (``EXTRA_PASSES``; as ``pass_recipes`` reads them
    back), e.g. ``{"odin": [[T, eps, std_divided]], "tracked_parameters": [name, ...]}``."""
    sym = {"K": num_classes, "D": feature_dim}

    def entry(key, **dim):
        spec = DATASETS[key]
        return tuple(int({**sym, **dim}[s]) for s in spec.shape), spec.dtype

    out = {name: entry(name) for name, spec in DATASETS.items()
           if spec.per_row and "{" not in name and "/" not in name}
    for layer, sources in plan.items():
        c, h, w = layer_shapes[layer]
        for source, stats in sources.items():
            for stat in stats:
                key = ("layers/{layer}/act/" if source == "act" else "layers/{layer}/grad/{objective}/")
                key += "map" if stat == MAP else "{stat}"
                shape, dtype = entry(key, C=c, H=h, W=w)
                out[stat_path(layer, source, stat)] = (shape, "int32" if stat == "nonzero" else dtype)
    for extra in EXTRA_PASSES.values():
        recipe = (recipes or {}).get(extra.attr)
        if recipe:
            for path, (key, dims) in extra.datasets(recipe).items():
                out[path] = entry(key, **dims)
    return out


def validate(attrs, datasets, where):
    """Check decoded root ``attrs`` and ``datasets`` ({path: (shape, dtype name)}, whole
    shapes) against the schema; raises CacheError naming the first problems."""
    missing = [a for a in REQUIRED_ROOT_ATTRS if a not in attrs]
    if missing:
        raise CacheError(f"{where}: not a cache of this tool (missing attributes: {', '.join(missing)})")
    version = attrs["schema_version"]
    if version > SCHEMA_VERSION:
        raise CacheError(f"{where}: written with cache schema version {version}, newer than this "
                         f"tool reads ({SCHEMA_VERSION}); upgrade gradood (pip install -U gradood "
                         "or pull the newest version) to read it")
    if version not in READABLE_VERSIONS:
        raise CacheError(f"{where}: cache schema version {version} is no longer read (this tool "
                         f"reads {', '.join(map(str, READABLE_VERSIONS))}); re-extract it")
    for name, value in attrs.items():
        spec = ROOT_ATTRS.get(name)
        if spec is not None and value is not None and not isinstance(value, spec.kind):
            raise CacheError(f"{where}: attribute {name!r} should be {spec.kind.__name__}, "
                             f"got {type(value).__name__}; the file was not written by this tool")
    for name, (what, problem) in ATTR_VALUES.items():
        value = attrs.get(name)
        found = problem(value, attrs) if value is not None else ""
        if found:
            raise CacheError(f"{where}: attribute {name!r} should be {what}: {found}; the file was edited "
                             "or not written by this tool (re-extract it)")
    linear = has_linear_head(attrs)
    if linear and "head/weight" not in datasets:
        raise CacheError(f"{where}: damaged cache, datasets missing: head/weight")
    if not linear and (version < 4 or "feature_dim" not in attrs or any(p in datasets for p in HEAD_DATASETS)):
        raise CacheError(f"{where}: head \"\" (no linear head) needs schema version 4, a feature_dim attribute "
                         "and no head/ datasets; the file was edited or not written by this tool (re-extract it)")
    k = attrs["num_classes"]
    d = datasets["head/weight"][0][1] if linear else attrs["feature_dim"]
    want = layout(k, d, attrs["plan"], attrs["layer_shapes"], pass_recipes(attrs))
    optional = [o for p in EXTRA_PASSES.values() for o in p.optional]
    for optional in ("skip_reasons", "content_hash", *optional):
        if optional not in datasets:
            want.pop(optional, None)
    absent = [p for p in [*REQUIRED_DATASETS, *(HEAD_DATASETS if linear else ()), *want] if p not in datasets]
    if absent:
        raise CacheError(f"{where}: damaged cache, datasets missing: {', '.join(absent[:5])}")
    n = attrs["n_samples"]
    for path, (row_shape, dtype) in want.items():
        shape, got = datasets[path]
        if tuple(shape) != (n, *row_shape) or not _same_dtype(got, dtype):
            raise CacheError(f"{where}: dataset {path} is {got} {tuple(shape)}, the schema says "
                             f"{dtype} {(n, *row_shape)}; the file was not written by this tool "
                             "or is damaged")
    if not linear:
        return
    weight_shape = tuple(datasets["head/weight"][0])
    if weight_shape[0] != k or tuple(datasets.get("head/bias", ((),))[0]) != (k,):
        raise CacheError(f"{where}: head/weight {weight_shape} and head/bias do not fit "
                         f"num_classes = {k}; the file is damaged")


def has_linear_head(attrs):
    """True when a cache (its root ``attrs``) holds its model's linear head: every cache
    but those of a model without one (``head`` "", schema version 4)."""
    return attrs.get("head") != ""


def head_label(attrs):
    """How a cache (its root ``attrs``) names its model's head for people: the module, or
    "none (logits not a linear map)" for a model without a linear head."""
    return a if (a := attrs.get("head", "?")) else "none (logits not a linear map)"


def _names(value):
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _per_layer(value, attrs, check):
    """Problem of a ``{layer: value}`` attribute: keys other than the hooked layers, or the
    first value ``check(layer, value)`` finds wrong (it returns the problem or "")."""
    layers = attrs.get("layers") or []
    if set(value) != set(layers):
        odd = sorted(set(value) ^ set(layers))
        return f"its layers differ from 'layers' ({', '.join(odd[:3])})"
    for layer, v in value.items():
        problem = check(layer, v)
        if problem:
            return f"{layer}: {problem}"
    return ""


def _shape_problem(layer, shape):
    ok = isinstance(shape, list) and len(shape) == 3 and all(isinstance(x, int) and x > 0 for x in shape)
    return "" if ok else f"{shape!r} is not [C, H, W] of positive integers"


def _layout_problem(attrs):
    def check(layer, layout):
        if layout not in LAYOUTS:
            return f"{layout!r} is not one of {', '.join(LAYOUTS)}"
        c, h, w = (attrs.get("layer_shapes") or {}).get(layer, [0, 0, 0])
        if layout == "NC" and (h, w) != (1, 1) or layout == "NTC" and w != 1:
            return f"{layout} does not fit its stored shape {[c, h, w]}"
        return ""
    return check


def _plan_problem(layer, sources):
    if not isinstance(sources, dict):
        return f"{sources!r} is not {{source: [statistic, ...]}}"
    for source, stats in sources.items():
        if source not in SOURCES:
            return f"unknown source {source!r} (one of {', '.join(SOURCES)})"
        if not _names(stats) or any(st not in (*STATS, MAP) for st in stats):
            return f"{source}: {stats!r} are not statistics of {', '.join((*STATS, MAP))}"
    return ""


# Value rules of the root attributes the analysis reads: attribute -> (what it may hold,
# problem(value, attrs) -> "" when it is fine). Checked by ``validate`` on every open.
ATTR_VALUES = {
    "n_samples": ("an integer >= 0", lambda v, a: "" if v >= 0 else "negative"),
    "num_classes": ("an integer >= 1", lambda v, a: "" if v >= 1 else "below 1"),
    "feature_dim": ("an integer >= 1", lambda v, a: "" if v >= 1 else "below 1"),
    "split": ("test, train or val", lambda v, a: "" if v in ("test", "train", "val") else "unknown split"),
    "objectives": ("a list of OBJECTIVES", lambda v, a: "" if _names(v) and set(v) <= set(OBJECTIVES)
                   else "not a list of known objectives"),
    "layers": ("a list of distinct module names", lambda v, a: "" if _names(v) and len(set(v)) == len(v)
               else "not a list of distinct names"),
    "layer_shapes": ("{layer: [C, H, W]} for every layer", lambda v, a: _per_layer(v, a, _shape_problem)),
    "layer_layouts": ("{layer: one of LAYOUTS} for every layer, fitting its shape",
                      lambda v, a: _per_layer(v, a, _layout_problem(a))),
    "layer_activations": ("{layer: activation class name or ''} for every layer",
                          lambda v, a: _per_layer(v, a, lambda l, t: "" if isinstance(t, str) else "not a name")),
    "layer_types": ("{layer: module class name} for every layer",
                    lambda v, a: _per_layer(v, a, lambda l, t: "" if isinstance(t, str) and t else "not a name")),
    "hook_sets": ("{set: [hooked layer, ...]}", lambda v, a: next(
        (f"{k}: {l!r} is not a list of hooked layers" for k, l in v.items()
         if not _names(l) or not set(l) <= set(a.get("layers") or [])), "")),
    "plan": ("{layer: {source: [statistic, ...]}} over hooked layers", lambda v, a: next(
        (f"{k}: not a hooked layer" for k in v if k not in (a.get("layers") or [])), "")
        or next((f"{k}: {p}" for k, x in v.items() for p in [_plan_problem(k, x)] if p), "")),
    "policies": ("{layer: policy}", lambda v, a: next(
        (f"{k}: {x!r} is not a policy" for k, x in v.items() if x not in POLICIES), "")),
}


def value_rule(path):
    """``(rule, layer)`` for dataset ``path``: ``"finite"`` for logits, features and layer
    statistics, ``"count"`` for a layer's ``nonzero`` statistic, ``""`` otherwise (maps are
    not checked: too large to scan on every read); ``layer`` names the layer of a statistic."""
    if path in DATASETS:
        return DATASETS[path].values, None
    parts = path.split("/")           # layers/<layer>/act/<stat> or layers/<layer>/grad/<objective>/<stat>
    if parts[0] == "layers" and len(parts) in (4, 5):
        stat = parts[-1]
        return ("count" if stat == "nonzero" else "" if stat == MAP else "finite"), parts[1]
    return "", None


def check_values(path, value, attrs, where):
    """Raise CacheError when the array ``value`` read from dataset ``path`` breaks its
    value rule (``VALUE_RULES``), naming the file, dataset and the first bad row."""
    import numpy as np
    rule, layer = value_rule(path)
    if not rule or not isinstance(value, np.ndarray) or value.size == 0:
        return
    if rule == "finite":
        bad = ~np.isfinite(value)
        what = "NaN or infinite values"
    else:
        c, h, w = attrs["layer_shapes"][layer]
        bad = (value < 0) | (value > h * w)
        what = f"counts outside [0, {h * w}] (the layer's H*W)"
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise CacheError(f"{where}: dataset {path} holds {what} (first at row {row} of the rows "
                         "read); the file was edited or damaged: re-extract it")


def _same_dtype(got, want):
    if want == "str":
        return got in ("object", "str") or got.startswith("|S") or got.startswith("<U")
    return got == want


def identity(attrs):
    """The comparable identity of a cache: ``MODEL_FIELDS`` plus the extraction fields."""
    out = {k: attrs.get(k) for k in FINGERPRINT_FIELDS}
    out["weights"] = attrs.get("weights_sha256") or attrs.get("checkpoint_sha256")
    out["features"] = feature_source(attrs)
    return out


def feature_source(attrs):
    """Where a cache's features come from, as far as caches can differ in it: None for a
    model with a linear head (its input, in every schema version), else the ``features``
    attribute (a head-less model's source depends on the model and on ``--head``)."""
    return None if has_linear_head(attrs) else attrs.get("features")


def fingerprint(attrs):
    """The fingerprint stored in a cache, from its (decoded) root attributes."""
    return {k: attrs.get(k) for k in FINGERPRINT_FIELDS}


def differing(a, b, fields=None, prefix=""):
    """Dotted names of the fields that differ between two JSON-like dicts (only ``fields``
    at the top level when given). The one comparison used for resumes, fits and tables."""
    out = []
    keys = sorted(set(a) | set(b)) if fields is None else list(fields)
    for key in keys:
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differing(va, vb, None, f"{prefix}{key}.")
        elif _canonical(va) != _canonical(vb):
            out.append(prefix + key)
    return out


def _canonical(value):
    return json.loads(json.dumps(value, sort_keys=True)) if value is not None else None


def dumps(value):
    """Canonical JSON text of an attribute value."""
    return json.dumps(value, sort_keys=True)
