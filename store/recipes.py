"""What an extraction must record for a set of needs, and whether a cache holds it.

A *need* is a triple ``(hook_set, source, stat)``: the statistic ``stat`` (one of
``schema.STATS`` or ``"map"``) of ``source`` (``"act"`` or a backward objective) at every
layer of ``hook_set`` (a hook set name such as ``bn`` or a module name). Scores declare
their needs and extra passes (``analyze.registry``); the extraction stage turns needs and
storage policies into a plan (``build_plan``), the analysis stage checks that a cache
holds what a score reads (``missing``) and compares two caches on exactly those parts
(``comparable``).
"""
from .schema import CHANNEL_STATS, EXTRA_PASSES, MAP, MODEL_FIELDS, OBJECTIVES, SOURCES, STATS, identity

# Extra passes at extraction, stored outside ``layers/``: declared once, as data, in
# ``schema.EXTRA_PASSES`` (root attribute, datasets, what a cache lacking them needs).
PASSES = EXTRA_PASSES


# Images per extraction batch when none is given (CLI, Python config, Makefile).
BATCH_SIZE = 64
# The ODIN pass (temperature, epsilon) of the ODIN paper's CIFAR setting: the default of the
# extraction, the CIFAR presets and the iODIN pass.
ODIN_DEFAULT = (1000.0, 0.0014)

# The named hook sets every model adapter defines (``extract.adapters.generic``).
HOOK_SETS = ("bn", "before_head", "before_head_gn", "nac", "penultimate", "gram")

# Selectors on a hook set: ``before_head:last`` is its last layer, ``before_head:inner`` the
# others (GAIA-A reads one objective at each part, so each backward stops where it must).
SELECTORS = {"last": lambda layers: layers[-1:], "inner": lambda layers: layers[:-1]}


def split_selector(name):
    """``(hook set, selector or None)`` of a need's hook-set name."""
    base, sep, sel = name.partition(":")
    if sep and sel not in SELECTORS:
        raise ValueError(f"unknown hook-set selector {sel!r} in {name!r}; choose from {', '.join(SELECTORS)}")
    return base, (sel if sep else None)


def layers_of(hook_sets, name):
    """Layers of hook set ``name`` (``set`` or ``set:selector``) in a cache's ``hook_sets``;
    None when the set was not extracted."""
    if name in hook_sets:
        return list(hook_sets[name])
    base, sel = split_selector(name)
    if sel and base in hook_sets:
        return SELECTORS[sel](list(hook_sets[base]))
    return None


def check_needs(needs, where="needs"):
    """Raise ValueError when a need is not a valid ``(hook_set, source, stat)`` triple."""
    for need in needs:
        if len(tuple(need)) != 3:
            raise ValueError(f"{where}: a need is (hook_set, source, stat), got {need!r}")
        hook_set, source, stat = need
        split_selector(hook_set)
        if source not in SOURCES:
            raise ValueError(f"{where}: source {source!r} in {need!r} is not one of {', '.join(SOURCES)}")
        if stat not in (*STATS, MAP):
            raise ValueError(f"{where}: statistic {stat!r} in {need!r} is not one of {', '.join((*STATS, MAP))}")


def objectives_for(needs):
    """Ordered list of the backward objectives ``needs`` read (``schema.OBJECTIVES`` order)."""
    found = {source for _, source, _ in needs if source != "act"}
    return [o for o in OBJECTIVES if o in found]


def hook_names(needs):
    """Hook sets (or module names) named by ``needs``, in first-use order; a selected set
    (``set:selector``) brings its whole set first."""
    out = []
    for hook_set, _, _ in needs:
        base, sel = split_selector(hook_set)
        for name in ([base, hook_set] if sel else [hook_set]):
            if name not in out:
                out.append(name)
    return out


def build_plan(hook_sets, needs, policies, objectives):
    """Storage plan ``{layer: {source: [stat, ...]}}``.

    hook_sets: ``{set name: [layer, ...]}`` as resolved on the model.
    needs: ``(hook_set, source, stat)`` triples, always stored.
    policies: ``{layer: policy}``; ``pooled`` adds ``mean``, ``stats`` every statistic,
    ``raw`` every statistic plus ``map``, for the activation and every recorded objective.
    objectives: every objective recorded in this run.
    """
    plan = {}
    for set_name, layers in hook_sets.items():
        for layer in layers:
            plan.setdefault(layer, {})
    for set_name, source, stat in needs:
        for layer in layers_of(hook_sets, set_name) or []:
            stats = plan[layer].setdefault(source, [])
            if stat not in stats:
                stats.append(stat)
    extra = {"pooled": ["mean"], "stats": list(CHANNEL_STATS), "raw": list(CHANNEL_STATS) + [MAP]}
    for layer, policy in policies.items():
        for source in ["act", *objectives]:
            stats = plan.setdefault(layer, {}).setdefault(source, [])
            for stat in extra.get(policy, []):
                if stat not in stats:
                    stats.append(stat)
    return {layer: {s: sorted(v, key=_stat_order) for s, v in src.items() if v}
            for layer, src in plan.items()}


def _stat_order(stat):
    return (list(STATS) + [MAP]).index(stat)


def holds(attrs, layer, source, stat):
    """True when the cache stores ``stat`` of ``source`` at ``layer`` (or the map it is
    computed from, for a statistic)."""
    stored = attrs["plan"].get(layer, {}).get(source, [])
    return stat in stored or (stat != MAP and MAP in stored)


def missing(needs, passes, attrs):
    """Human-readable list of what a cache (its decoded root ``attrs``) lacks for ``needs``
    and ``passes`` (empty when it has all)."""
    problems = [EXTRA_PASSES[p].how for p in passes if not attrs.get(EXTRA_PASSES[p].attr)]
    hook_sets = attrs["hook_sets"]
    for set_name, source, stat in needs:
        layers = layers_of(hook_sets, set_name)
        if not layers:
            problems.append(f"hook set {set_name!r} was not extracted")
            continue
        absent = [l for l in layers if not holds(attrs, l, source, stat)]
        if absent:
            how = (f"maps are stored only under the raw policy, --store {absent[0]}=raw" if stat == MAP
                   else f"stored by the score's extraction, or --store {absent[0]}=stats")
            problems.append(f"{source}/{stat} missing for {len(absent)} layer(s) of {set_name!r}, "
                            f"e.g. {absent[0]} ({how})")
    return list(dict.fromkeys(problems))      # one line per distinct problem


def comparable(attrs, needs=(), passes=()):
    """The parts of a cache's identity that a reader of ``needs`` and ``passes`` depends on:
    the model (``schema.MODEL_FIELDS``), the layers and shapes of the hook sets read, and
    the recipe of the Mahalanobis pass. Two caches may be compared by a score when these
    agree (``schema.differing``)."""
    ident = identity(attrs)
    out = {k: ident[k] for k in MODEL_FIELDS}
    for set_name, _, _ in needs:
        layers = layers_of(attrs["hook_sets"], set_name) or []
        out[f"hook set {set_name}"] = {l: attrs["layer_shapes"].get(l) for l in layers}
    if "mahalanobis" in passes:
        recipe = attrs.get("mahalanobis") or {}
        out["mahalanobis recipe"] = {k: v for k, v in recipe.items() if k not in ("adversarial", "adv_noise")}
    return out

