"""The built-in scores. Each module registers its entries with ``gradood.analyze.register_score``,
the same public mechanism plugins use; importing this package loads them all, in table
order (gradient scores first, then the logit and feature baselines)."""
from . import gaia, gradnorm, nac, tracking, gradients  # noqa: F401
from .baselines import (msp, maxlogit, energy, odin, mahalanobis, react, ash, knn, vim,  # noqa: F401
                        mahalanobis_ens, entropy, gen, scale, dice, fdbd, nnguide, rmds, klm, she,
                        neco, relation, nusa, tempscale, rankfeat, nci, pnml, lts, multimahalanobis, openmax, vra, cfood,
                        mcdropout, gram, adascale, webo, iodin)
