"""ODIN (Liang et al., ICLR 2018): temperature scaling and input preprocessing.

The input is moved by epsilon against the sign of the gradient of the cross-entropy of
z / T at the predicted class, then the maximum softmax of the perturbed input's logits at
temperature T is the score. The perturbed forward pass is recorded at extraction
(``--odin T,EPS`` or ``--odin T,EPS,std``), one per pass. Two versions exist in the field,
and the cache records which ran:

* ``std``: the sign gradient is divided by the normalisation std per channel before the
  step, as the original ODIN code (facebookresearch/odin ``calData.py``) and OpenOOD
  (``odin_postprocessor.py``) do: the step is epsilon in [0, 1] pixel units;
* no ``std``: the GradNorm release's ``iterate_data_odin`` steps epsilon in normalised
  units.

Parameters select a recorded pass: ``temperature``, ``epsilon``, ``std`` (true/false);
left out, the first recorded pass that fits the given ones.
"""
import numpy as np

from gradood.analyze.logits import log_softmax
from gradood.analyze.registry import register_score
from gradood.store.schema import CacheError, odin_label, odin_pairs


def choose_pass(passes, temperature=None, epsilon=None, std=None, where="cache"):
    """The recorded pass ``(T, eps, std_divided)`` matching the given values (None = any)."""
    fits = [p for p in passes
            if (temperature is None or p[0] == float(temperature))
            and (epsilon is None or p[1] == float(epsilon))
            and (std is None or p[2] == bool(std))]
    if not fits:
        recorded = "; ".join(odin_label(*p) for p in passes) or "none"
        raise CacheError(f"{where}: no recorded ODIN pass with temperature={temperature}, "
                         f"epsilon={epsilon}, std={std}; recorded: {recorded} "
                         "(extract with --odin T,EPS[,std])")
    return fits[0]


def describe(params, attrs):
    t, e, s = choose_pass(odin_pairs(attrs), params["temperature"], params["epsilon"], params["std"])
    how = "sign gradient / std (original ODIN, OpenOOD)" if s else "sign gradient, no / std (GradNorm release)"
    return f"T={t:g}, epsilon={e:g}, {how}"


@register_score("odin", title="ODIN", family="logits", default=True, passes=("odin",),
                reference="Liang et al., ICLR 2018; facebookresearch/odin; GradNorm release iterate_data_odin",
                paper={"ODIN (recorded pair)": {}}, describe=describe)
def odin(data, temperature=None, epsilon=None, std=None):
    """(n,) float64 max softmax at temperature T of the perturbed input's logits."""
    t, e, s = choose_pass(data.odin_passes, temperature, epsilon, std, data.path)
    z = data.odin_logits(t, e, s)
    return np.exp(log_softmax(z, t)).max(axis=1)
