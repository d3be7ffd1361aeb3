"""Whether a model can serve a score: its hook sets and extra passes resolved on the
model's adapter, before anything is extracted (``pipeline.py scores --arch``)."""
from gradood.store.recipes import SELECTORS, split_selector

from .generic import HookSetError


def unserved(adapter, needs, passes):
    """Reasons (empty list: served) the model of ``adapter`` cannot record ``needs``
    (``(hook set, source, stat)`` triples) and ``passes``."""
    reasons = []
    for hook_set, _, _ in needs:
        base, sel = split_selector(hook_set)
        try:
            layers = adapter.hook_set(base)
        except HookSetError as err:
            reasons.append(str(err))
            continue
        if sel and not SELECTORS[sel](layers):
            reasons.append(f"hook set {base!r} has {len(layers)} layer(s) on this model; "
                           f"{hook_set} selects none (--hook-set {base}=MODULE,MODULE,... redefines it)")
    if "tracking" in passes:
        from ..tracking import tracked_parameters
        try:
            tracked_parameters(adapter.model, adapter.trace)
        except ValueError as err:
            reasons.append(str(err))
    if "mahalanobis" in passes:
        try:
            adapter.hook_set("nac")
        except HookSetError as err:
            reasons.append(str(err))
    return list(dict.fromkeys(reasons))


def model_attrs(adapter, needs):
    """The root attributes a cache of this model would hold for the hook sets of ``needs``
    (``(hook set, source, stat)`` triples) that resolve on it (what a score's
    ``defined_on`` reads)."""
    sets = {}
    for name in dict.fromkeys(split_selector(h)[0] for h, _, _ in needs):
        try:
            sets[name] = adapter.hook_set(name)
        except HookSetError:
            pass
    layers = [l for ls in sets.values() for l in ls]
    layouts, types = adapter.describe(layers)
    return {"hook_sets": sets, "layer_shapes": {l: adapter.shape(l) for l in layers},
            "layer_layouts": layouts, "layer_types": types, "feature_dim": adapter.feature_dim,
            "layer_activations": {l: adapter.activation_after(l) for l in layers},
            "num_classes": adapter.num_classes, "family": adapter.family, "head": adapter.head_name}
