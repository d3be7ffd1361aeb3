"""Cache schema, version 1: the one place that defines what a cache file holds.

One HDF5 file per (model, dataset), ``<cache_dir>/<dataset>.h5``. N samples, K classes,
D penultimate features; C_l channels of hooked layer l with spatial size H_l x W_l.
Rows are samples in dataset order everywhere.

Root attributes (JSON strings where marked; plain h5py/h5dump can read them all):
    schema_version  int, ``SCHEMA_VERSION``
    complete        bool, set True last, after every dataset is written
    n_samples       int N
    dataset         str, dataset name;  dataset_root  str;  split  str
    arch, num_classes, checkpoint (path), checkpoint_sha256
    preprocess      JSON, the evaluation transform (name and parameters)
    objectives      JSON list of backward objectives recorded (see OBJECTIVES)
    layers          JSON list of hooked module names, in module order
    layer_shapes    JSON {layer: [C, H, W]} of each hooked module's output
    hook_sets       JSON {set name: [layer, ...]}; e.g. ``bn``, ``before_head``
    plan            JSON {layer: {"act": [stat...], objective: [stat...]}}: what was stored
    policies        JSON {layer: policy}; policies in POLICIES
    fingerprint     JSON, the fields two caches must share to be compared (FINGERPRINT_FIELDS)
    torch_version, torchvision_version, device, created, tool_version
    batch_size      int, rows per batch (batches are rows [k*batch_size, (k+1)*batch_size))
    world_size      int, processes of the (last) extraction run; 1 unless run under torchrun
    n_skipped       int, images that could not be read (``--skip-bad``)
    odin            JSON [[T, epsilon], ...], ODIN passes recorded (may be empty)
    tracked_parameters  JSON list of parameter names in ``tracking/norms`` (may be empty)
    mahalanobis     JSON or absent: the multi-layer Mahalanobis recipe (``--maha-fit``):
                    {"layers": [L names], "magnitudes": [M], "fit_cache": path,
                    "fit_fingerprint": {...}, "fit_n": int, "adversarial": bool,
                    "adv_noise": float}

Datasets (float32 unless said; chunked along rows, gzip + shuffle + fletcher32):
    logits              (N, K)
    features            (N, D)     pooled penultimate vector, the input of the head
    labels              (N,) int64 (-1 where the dataset has no labels)
    paths               (N,) UTF-8 str, the source file, or ``<set>:<index>`` for array datasets
    skipped             (N,) bool, True where the image was unreadable (row values are zeros)
    skip_reasons        (N,) UTF-8 str, the decoder's error for skipped rows, "" elsewhere
    head/weight         (K, D)     head weight (a 1x1 conv head is reshaped)
    head/bias           (K,)
    layers/<layer>/act/<stat>               (N, C)  statistic of the forward output
    layers/<layer>/grad/<objective>/<stat>  (N, C)  statistic of d objective / d output
    layers/<layer>/act/map                  (N, C, H, W)  ``raw`` policy only
    layers/<layer>/grad/<objective>/map     (N, C, H, W)  ``raw`` policy only
    odin/T<T>_eps<epsilon>/logits  (N, K)  logits of the ODIN-perturbed input for one
                        (temperature, epsilon) pair (root attribute ``odin`` lists the pairs);
                        not divided by T
    tracking/norms      (N, K, P)  gradient tracking: L2 norm of the weight gradient of
                        tracked parameter tensor p (root attribute ``tracked_parameters``)
                        for the cross-entropy with class k as the label
    mahalanobis/scores  (M, L) per row: input-preprocessed Mahalanobis score of layer l at
                        noise magnitude m (root attribute ``mahalanobis``; extract.mahalanobis)
    mahalanobis/adversarial_scores  (M, L) the same for the row's pseudo-OOD copy
                        (``--maha-adversarial``; validation caches of the ensemble)
    (``layers/<penultimate>/act/map`` is the last feature map ASH prunes: the score ``ash``
    stores it whatever the policy)

Per-channel statistics over the H x W positions (STATS):
    nonzero   int32, count of entries != 0 (exact: computed before any storage)
    mean      spatial mean; the spatial sum is ``mean * H * W``
    abs_mean  mean of |v|;   sq_mean  mean of v**2;   abs_max  max of |v|
The gradient recorded is what a tensor hook registered on the module's output receives;
where an in-place ReLU follows the module, that is the gradient w.r.t. the pre-ReLU
tensor (as in the authors' hooks). Activations are likewise taken before in-place ops.
"""
import json

SCHEMA_VERSION = 1

STATS = ("nonzero", "mean", "abs_mean", "sq_mean", "abs_max")

# Backward objectives (all summed over the batch; per-sample gradients are exact because
# the model is in eval mode and no sample influences another).
OBJECTIVES = {
    "max_logit": "sum_n max_k z[n, k]  (GAIA-Z)",
    "log_softmax_sum": "sum_n sum_k log_softmax(z)[n, k]  (GAIA-A pass 1; NAC-UE up to -1/K)",
    "feature_sum": "sum_n sum_d x[n, d], x the head input  (GAIA-A pass 2)",
}

# Storage policies per hooked layer.
POLICIES = {
    "scores": "only the statistics the requested scores read (the default)",
    "pooled": "spatial means of activation and of every recorded gradient",
    "stats": "every statistic in STATS of activation and every recorded gradient",
    "raw": "every statistic plus the full maps, losslessly compressed",
}

FINGERPRINT_FIELDS = ("schema_version", "arch", "num_classes", "checkpoint_sha256",
                      "preprocess", "objectives", "layers", "plan", "odin", "tracked_parameters")

REQUIRED_ROOT_ATTRS = ("schema_version", "complete", "n_samples", "dataset", "arch",
                       "checkpoint_sha256", "preprocess", "objectives", "layers",
                       "layer_shapes", "hook_sets", "plan", "fingerprint")
REQUIRED_DATASETS = ("logits", "features", "labels", "paths", "skipped", "head/weight", "head/bias")
JSON_ATTRS = ("preprocess", "objectives", "layers", "layer_shapes", "hook_sets", "plan",
              "policies", "fingerprint", "odin", "tracked_parameters", "mahalanobis")
TRACKING_PATH = "tracking/norms"
MAHA_SCORES = "mahalanobis/scores"
MAHA_ADVERSARIAL = "mahalanobis/adversarial_scores"
STRING_DATASETS = ("paths", "skip_reasons")


class CacheError(Exception):
    """A cache file is missing, damaged, incomplete or does not fit the request."""


def stat_path(layer, source, stat):
    """HDF5 path of a per-channel statistic; ``source`` is ``"act"`` or an objective name."""
    if source == "act":
        return f"layers/{layer}/act/{stat}"
    return f"layers/{layer}/grad/{source}/{stat}"


def odin_path(temperature, epsilon):
    """HDF5 path of the perturbed logits of one ODIN (temperature, epsilon) pair."""
    return f"odin/T{float(temperature):g}_eps{float(epsilon):g}/logits"


def fingerprint(attrs):
    """The comparable identity of a cache, from its (decoded) root attributes."""
    return {k: attrs.get(k) for k in FINGERPRINT_FIELDS}


def dumps(value):
    return json.dumps(value, sort_keys=True)
