"""Loading released checkpoints into the model zoo, and hashing them for provenance.

Accepted formats (all read with ``torch.load(..., weights_only=True)``):
a bare state dict; ``{'state_dict': sd}``; ``{'model': sd}``; any of them with keys
prefixed by ``module.`` (saved from ``nn.DataParallel``), e.g. GradNorm's
``BiT-S-R101x1-flat-finetune.pth.tar``. Big Transfer's own ``.npz`` weights (e.g.
``BiT-S-R101x1.npz``) load into the BiT layouts through the model's
``state_dict_from_npz`` (``extract.models.bit_resnetv2``). Pruned checkpoints in the layout
of gradient tracking's release (``gengandrew/Open_OOD`` ``PrunedModel``: the weights under
``model.``, a 0/1 ``mask_<name with . as ___>`` buffer per pruned weight) load with the
masks multiplied into the weights, as its forward does, and kept as buffers of the same
names on the model, which gradient tracking reads (``extract.tracking``).
"""
import hashlib
import os
import pickle

import torch


class CheckpointMismatch(ValueError):
    """The checkpoint's keys or shapes do not fit the architecture."""


def sha256_of(path, block=1 << 20):
    """Hex SHA-256 of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def unwrap_state_dict(obj, path="checkpoint"):
    """Return the tensor dict inside a released checkpoint object (read from ``path``),
    ``module.`` prefixes removed."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise CheckpointMismatch(f"{path} holds a {type(obj).__name__}, not a state dict (expected a dict of "
                                 "tensors, or one under 'state_dict' or 'model')")
    other = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if other:
        raise CheckpointMismatch(
            f"{path} holds no state dict: {len(other)} of its {len(obj)} entries are not tensors ("
            + ", ".join(f"{k!r}: {type(obj[k]).__name__}" for k in other[:3]) + (" ..." if len(other) > 3 else "")
            + "); a state dict holds only tensors, at the top level or under 'state_dict' or 'model': "
            "re-save the weights alone")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def describe_mismatch(model, state_dict, limit=20):
    """Text listing missing, unexpected and mis-shaped keys; empty when the dict fits ``model``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    lines = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = items[:limit] + ([f"... and {len(items) - limit} more"] if len(items) > limit else [])
            lines.append(f"{len(items)} {title} key(s):\n    " + "\n    ".join(shown))
    return "\n".join(lines)


def weights_sha256(model):
    """Hex SHA-256 of a model's state dict as loaded: names, shapes and float32 values in
    order. Equal for the same weights whatever the file (fp16 copies of fp32 values,
    ``module.`` prefixes, another container)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu()
        t = t.float() if t.is_floating_point() else t
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _read_npz(path, model):
    """The state dict of a Big Transfer ``.npz`` for ``model``."""
    import numpy as np

    from .models.bit_resnetv2 import ResNetV2, state_dict_from_npz
    if not isinstance(model, ResNetV2):
        raise CheckpointMismatch(f"checkpoint {path} is a NumPy .npz archive, read only for the BiT "
                                 f"layouts (--arch BiT-S-R50x1, BiT-S-R101x1), not {type(model).__name__}")
    try:
        with np.load(path) as arrays:
            return state_dict_from_npz(model, arrays)
    except (OSError, ValueError) as err:
        raise CheckpointMismatch(f"checkpoint {path} is not a readable .npz archive ({err})") from None


def _read(path, model=None):
    """The object in a checkpoint file, loaded weights-only; one-line errors for the usual faults."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointMismatch(f"checkpoint {path} is empty (0 bytes)")
    if path.endswith(".npz"):
        return _read_npz(path, model)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err) or "weights_only" in str(err):
            raise CheckpointMismatch(
                f"checkpoint {path} holds Python objects besides tensors, which weights-only "
                "loading refuses (they could run code). If you trust the file, re-save just the "
                "weights: torch.save(torch.load(path, weights_only=False)['state_dict'], "
                "'weights.pt')") from None
        raise CheckpointMismatch(f"checkpoint {path} is not a PyTorch checkpoint ({err})") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, AttributeError, IndexError) as err:
        raise CheckpointMismatch(f"checkpoint {path} is not a readable PyTorch checkpoint "
                                 f"({type(err).__name__}: {err}); is it truncated or another "
                                 "kind of file?") from None


MASK_PREFIX = "mask_"


def mask_name(parameter):
    """The release's buffer name of the mask of ``parameter`` (``PrunedModel.to_mask_name``)."""
    return MASK_PREFIX + parameter.replace(".", "___")


def split_masks(state_dict):
    """``(weights, {parameter name: mask})`` of a pruned checkpoint (``model.``-prefixed
    weights and ``mask_*`` buffers); other state dicts come back unchanged with no masks."""
    masks = {k: v for k, v in state_dict.items() if k.startswith(MASK_PREFIX)}
    if not masks:
        return state_dict, {}
    rest = {k: v for k, v in state_dict.items() if k not in masks}
    if rest and all(k.startswith("model.") for k in rest):
        rest = {k[len("model."):]: v for k, v in rest.items()}
    return rest, {k[len(MASK_PREFIX):].replace("___", "."): v for k, v in masks.items()}


def apply_masks(model, masks, path):
    """Multiply each mask into its parameter and register it as a buffer ``mask_<name>``
    on ``model``; raises CheckpointMismatch for a mask of no parameter or another shape."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params or params[name].shape != mask.shape:
            what = "names no parameter" if name not in params else (
                f"has shape {tuple(mask.shape)}, the parameter {tuple(params[name].shape)}")
            raise CheckpointMismatch(f"checkpoint {path}: mask {mask_name(name)} {what}")
        with torch.no_grad():
            params[name].mul_(mask.to(params[name].dtype))
        model.register_buffer(mask_name(name), mask.detach().float().clone())


def load_checkpoint(model, path):
    """Load the checkpoint at ``path`` into ``model`` strictly; returns ``(file SHA-256,
    weights SHA-256)`` (``weights_sha256``).

    Masks of a pruned checkpoint are applied (``split_masks``, ``apply_masks``).
    Raises ``FileNotFoundError`` naming the path, or ``CheckpointMismatch`` for a file that
    is not a weights checkpoint, whose keys or shapes do not fit (listing the missing,
    unexpected and mis-shaped keys), or whose tensors hold NaN or infinite values (naming
    them).
    """
    state_dict, masks = split_masks(unwrap_state_dict(_read(path, model), path))
    problems = describe_mismatch(model, state_dict)
    if problems:
        raise CheckpointMismatch(
            f"checkpoint {path} does not fit architecture {type(model).__name__}:\n{problems}\n"
            "Check --arch and --num-classes.")
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointMismatch(f"checkpoint {path} holds non-finite values (NaN or inf) in "
                                 f"{len(bad)} tensor(s): {', '.join(bad[:5])}"
                                 + (" ..." if len(bad) > 5 else "") + "; it cannot give meaningful scores")
    model.load_state_dict(state_dict, strict=True)
    apply_masks(model, masks, path)
    return sha256_of(path), weights_sha256(model)
