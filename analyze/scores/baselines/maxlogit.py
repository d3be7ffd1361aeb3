"""MaxLogit (Hendrycks et al., ICML 2022, "Scaling out-of-distribution detection for
real-world settings"): max_k z_k. OpenOOD calls it MLS."""
from gradood.analyze.registry import register_score


@register_score("maxlogit", title="MaxLogit", family="logits", default=True, aliases=("mls",),
                reference="Hendrycks et al., ICML 2022 (MLS in OpenOOD)")
def maxlogit(data):
    """(n,) float64 maximum logit."""
    return data.logits.max(axis=1)
