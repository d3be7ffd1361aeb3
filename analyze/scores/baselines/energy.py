"""Energy score (Liu et al., NeurIPS 2020): the negative free energy T * logsumexp(z / T)
(T = 1 in the paper and in OpenOOD's ``ebo``)."""
from gradood.analyze.logits import energy as free_energy
from gradood.analyze.registry import register_score


@register_score("energy", title="Energy", family="logits", default=True,
                reference="Liu et al., NeurIPS 2020", paper={"Energy (T=1)": {}},
                grid=[{"temperature": [1, 10, 100, 1000]}])
def energy(data, temperature=1.0):
    """(n,) float64 T * logsumexp(z / T)."""
    if temperature <= 0:
        raise ValueError(f"energy.temperature must be > 0, got {temperature}")
    return free_energy(data.logits, temperature)
