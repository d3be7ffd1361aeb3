"""RankFeat (Song et al., NeurIPS 2022; code KingJamesSong/RankFeat): the rank-1 part
s1 u1 v1^T of each sample's last feature map, as a (C, H*W) matrix, is removed; the rest
is average-pooled, sent through the head, and the energy is the score. The release fuses
block 3 and block 4 (averaging their logits); a cache holds the map the head's pooling
reads (``penultimate``, stored for this score), so this is the paper's block-4 variant.
Needs the stored map: an opt-in, as ``ash_map``."""
import numpy as np

from gradood.analyze.logits import logsumexp
from gradood.analyze.registry import register_score
from gradood.analyze.scores.baselines.ash import pooled_map_defined


@register_score("rankfeat", linear_head=True, title="RankFeat (block 4)", family="features",
                reference="Song et al., NeurIPS 2022; KingJamesSong/RankFeat",
                needs=[("penultimate", "act", "map")], defined_on=pooled_map_defined)
def rankfeat(data):
    """(n,) float64 energy of the head on the pooled map without its rank-1 part."""
    layer = data.layers("penultimate")[0]
    maps = data.map(layer, "act").astype(np.float64)
    n, c = maps.shape[:2]
    m = maps.reshape(n, c, -1)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    rest = m - s[:, :1, None] * (u[:, :, :1] @ vt[:, :1, :])
    return logsumexp(rest.mean(axis=2) @ data.head_weight.T + data.head_bias)
