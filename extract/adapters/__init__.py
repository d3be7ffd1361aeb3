"""Model adapters: what extraction knows of a classifier (head, features, norm layers,
stages, hook sets, layouts), found on the ``nn.Module`` itself.

``adapter_for(model, image_shape)`` returns the adapter registered for the model's class
(a family adapter, one file each here, where an author defines a hook set differently)
or the generic one (``generic.ModelAdapter``), which serves every other model. A family
adapter is a subclass of ``ModelAdapter`` registered with ``@register_adapter(ModelClass)``
that overrides ``define`` for the sets it changes.
"""
from .generic import HOOK_SETS, HookSetError, ModelAdapter

_ADAPTERS = []


def register_adapter(*model_classes):
    """Class decorator: use the decorated adapter for instances of ``model_classes``."""
    def decorate(adapter):
        _ADAPTERS.append((tuple(model_classes), adapter))
        return adapter
    return decorate


def adapter_for(model, image_shape, head=None, hook_sets=None):
    """The ``ModelAdapter`` of ``model`` (eval mode) for inputs of ``image_shape`` (C, H, W).

    head: the linear head's module name (default: traced). hook_sets: ``{set: [module
    name or glob]}`` overrides.
    """
    from . import bit, wrn  # noqa: F401  (register the family adapters)
    for classes, adapter in _ADAPTERS:
        if isinstance(model, classes):
            return adapter(model, image_shape, head, hook_sets)
    return ModelAdapter(model, image_shape, head, hook_sets)


__all__ = ["HOOK_SETS", "HookSetError", "ModelAdapter", "adapter_for", "register_adapter"]
