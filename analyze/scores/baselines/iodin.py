"""iODIN (Regmi et al., ASCOOD; sudarshanregmi/ASCOOD) as OpenOOD runs it
(``iodin_postprocessor.py``, ``configs/postprocessors/iodin.yml``): ODIN's input step,
taken at the single input entry where the gradient is largest in magnitude, then the
maximum softmax of the moved input's logits divided by T.

Reads the ``iodin`` extraction pass (``extract.iodin``: T = 1000, epsilon = 0.0014, the
step divided by the normalisation std, OpenOOD's defaults; its sweep over T in {1, 10,
100, 1000} and epsilon in {0.0014, 0.0028} would need one pass each and is not offered).
Cost at extraction: the ODIN backward at T = 1000 (shared with an ODIN pass at that T)
and one forward. Unfitted.
"""
import numpy as np

from gradood.analyze.logits import log_softmax
from gradood.analyze.registry import register_score


def _describe(params, attrs):
    recipe = attrs.get("iodin") or {}
    return f"T={recipe.get('temperature', 1000):g}, epsilon={recipe.get('epsilon', 0.0014):g}, one entry, / std"


@register_score("iodin", title="iODIN", family="logits", passes=("iodin",), describe=_describe,
                reference="Regmi et al. (ASCOOD); OpenOOD iodin_postprocessor.py")
def iodin(data):
    """(n,) float64 maximum softmax of the iODIN-perturbed logits over T."""
    t = float(data.attrs["iodin"]["temperature"])
    return np.exp(log_softmax(data.iodin_logits, T=t)).max(axis=1)
