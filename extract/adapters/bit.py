"""GAIA's hook sets for BiT ResNetV2 (``JGEthanChen/GAIA-OOD`` ``hook.py``).

``bn`` is the GroupNorms of ``body.block4`` only; ``before_head`` those, then the
``before_head`` module (GroupNorm, ReLU, average pool: its pooled output);
``before_head_gn`` ends at ``before_head.gn`` instead (GAIA's choice for GAIA-Z on
Textures; never applied implicitly). ``nac`` (``body.block1..4``) and ``penultimate``
(``before_head.relu``, the map the pool reads) are generic.
"""
from ..models.bit_resnetv2 import ResNetV2
from . import register_adapter
from .generic import ModelAdapter


@register_adapter(ResNetV2)
class BiTAdapter(ModelAdapter):
    family = "bit"

    def define(self, name):
        if name == "bn":
            return self.norms(under=["body.block4"])
        if name == "before_head":
            return self.norms(under=["body.block4"]) + ["before_head"]
        if name == "before_head_gn":
            return self.norms(under=["body.block4"]) + ["before_head.gn"]
        return super().define(name)
