"""NuSA, null-space analysis (Cook et al., 2020, "Outlier detection through null space
analysis of neural networks"; as the ViM paper states it): the share of the feature that
lies in the row space of the head's weight W, sqrt(||x||^2 - ||x_null||^2) / ||x||, with
x_null the projection of x on the null space of W. Needs only the head."""
import numpy as np

from gradood.analyze.registry import register_score


@register_score("nusa", linear_head=True, title="NuSA", family="features", default=True,
                reference="Cook et al., 2020 (null space analysis), as stated in the ViM paper",
                paper={"NuSA": {}})
def nusa(data):
    """(n,) float64 ||P_row x|| / ||x||."""
    x = data.features
    row = np.linalg.pinv(data.head_weight) @ data.head_weight        # (D, D) projector on W's row space
    x_null = x - x @ row.T
    sq = np.maximum((x ** 2).sum(axis=1) - (x_null ** 2).sum(axis=1), 0.0)
    return np.sqrt(sq) / np.linalg.norm(x, axis=1)
