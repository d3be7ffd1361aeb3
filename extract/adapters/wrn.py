"""GAIA's hook sets for its Wide ResNets (``JGEthanChen/GAIA-OOD`` ``hook.py``).

``before_head`` is every BatchNorm2d of the network, then the ``AdaptAvgPool`` module (the
pooled output of the final BN + ReLU), not the generic last-two-stages rule. The other
sets are generic (``nac``: ``block1..3``; ``penultimate``: the final in-place ``relu``).
"""
from ..models.wide_resnet import WideResNet
from . import register_adapter
from .generic import ModelAdapter


@register_adapter(WideResNet)
class WideResNetAdapter(ModelAdapter):
    family = "wrn"

    def define(self, name):
        if name == "before_head":
            return self.norms() + ["AdaptAvgPool"]
        return super().define(name)
