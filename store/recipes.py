"""What each score reads from a cache, and the storage plan derived from it.

``SCORE_NEEDS[score]`` lists ``(hook_set, source, stat)`` triples, ``source`` being
``"act"`` or a backward objective. Scores that need only logits, features and the head
list nothing. The extraction stage turns the requested scores and policies into a plan
(``build_plan``); the analysis stage checks a cache holds what a score needs
(``missing_for``).
"""
from .schema import STATS

SCORE_NEEDS = {
    "gaia_a": [("before_head", "log_softmax_sum", "mean"), ("before_head", "feature_sum", "mean")],
    "gaia_z": [("bn", "max_logit", "nonzero")],
    "gradnorm": [], "msp": [], "maxlogit": [], "energy": [],
    "nac": [("nac", "act", "mean"), ("nac", "log_softmax_sum", "mean")],
    "odin": [], "mahalanobis": [], "react": [], "knn": [], "vim": [],
    "ash": [("penultimate", "act", "map")],
    "tracking": [], "mahalanobis_ens": [],
}

# Extra passes at extraction, stored outside ``layers/``: ODIN's perturbed forward pass
# (``odin/<pair>/logits``, root attribute ``odin``) and the per-sample weight-gradient
# norms of gradient tracking (``tracking/norms``, root attribute ``tracked_parameters``),
# the multi-layer Mahalanobis scores (``mahalanobis/...``, root attribute ``mahalanobis``).
SCORE_PASSES = {"odin": "odin", "tracking": "tracking", "mahalanobis_ens": "mahalanobis"}

# Scores fitted on the ID training cache (``<id>_train``) before scoring.
FITTED_SCORES = ("mahalanobis", "react", "knn", "vim", "nac")
# Fitted on validation data (the ID test cache by default): the Mahalanobis ensemble.
VALIDATION_FITTED_SCORES = ("mahalanobis_ens",)


def objectives_for(scores):
    """Ordered list of backward objectives the ``scores`` need."""
    found = []
    for score in scores:
        for _, source, _ in SCORE_NEEDS[score]:
            if source != "act" and source not in found:
                found.append(source)
    return found


def build_plan(hook_sets, scores, policies, objectives):
    """Storage plan ``{layer: {source: [stat, ...]}}``.

    hook_sets: ``{set name: [layer, ...]}`` as resolved on the model.
    scores: requested score names; their needs (SCORE_NEEDS) are always stored.
    policies: ``{layer: policy}``; ``pooled`` adds ``mean``, ``stats`` every statistic,
    ``raw`` every statistic plus ``map``, for the activation and every recorded objective.
    objectives: every objective recorded in this run.
    """
    plan = {}
    for set_name, layers in hook_sets.items():
        for layer in layers:
            plan.setdefault(layer, {})
    for score in scores:
        for set_name, source, stat in SCORE_NEEDS[score]:
            for layer in hook_sets.get(set_name, []):
                stats = plan[layer].setdefault(source, [])
                if stat not in stats:
                    stats.append(stat)
    extra = {"pooled": ["mean"], "stats": list(STATS), "raw": list(STATS) + ["map"]}
    for layer, policy in policies.items():
        for source in ["act", *objectives]:
            stats = plan.setdefault(layer, {}).setdefault(source, [])
            for stat in extra.get(policy, []):
                if stat not in stats:
                    stats.append(stat)
    return {layer: {s: sorted(v, key=_stat_order) for s, v in src.items() if v}
            for layer, src in plan.items()}


def _stat_order(stat):
    return (list(STATS) + ["map"]).index(stat)


def missing_for(score, attrs):
    """Human-readable list of what a cache (its decoded root ``attrs``) lacks for ``score``
    (empty when it has all)."""
    hook_sets, plan = attrs["hook_sets"], attrs["plan"]
    problems = []
    if SCORE_PASSES.get(score) == "odin" and not attrs.get("odin"):
        problems.append("no ODIN pass was recorded (extract with --score odin, --odin T,EPS)")
    if SCORE_PASSES.get(score) == "tracking" and not attrs.get("tracked_parameters"):
        problems.append("no gradient-tracking norms were recorded (extract with --score tracking)")
    if SCORE_PASSES.get(score) == "mahalanobis" and not attrs.get("mahalanobis"):
        problems.append("no multi-layer Mahalanobis scores were recorded (extract with "
                        "--maha-fit TRAIN_CACHE; the validation set also with --maha-adversarial)")
    for set_name, source, stat in SCORE_NEEDS[score]:
        layers = hook_sets.get(set_name)
        if not layers:
            problems.append(f"hook set {set_name!r} was not extracted")
            continue
        absent = [l for l in layers if stat not in plan.get(l, {}).get(source, [])]
        if absent:
            problems.append(f"{source}/{stat} missing for {len(absent)} layer(s) of {set_name!r}, "
                            f"e.g. {absent[0]}")
    return problems
