"""Loading released checkpoints into the model zoo, and hashing them for provenance.

Accepted formats (all read with ``torch.load(..., weights_only=True)``):
a bare state dict; ``{'state_dict': sd}``; ``{'model': sd}``; any of them with keys
prefixed by ``module.`` (saved from ``nn.DataParallel``), e.g. GradNorm's
``BiT-S-R101x1-flat-finetune.pth.tar``.
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


def unwrap_state_dict(obj):
    """Return the tensor dict inside a released checkpoint object, ``module.`` prefixes removed."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointMismatch(
            "checkpoint holds no state dict (expected a dict of tensors, or one under "
            "'state_dict' or 'model')")
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


def _read(path):
    """The object in a checkpoint file, loaded weights-only; one-line errors for the usual faults."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointMismatch(f"checkpoint {path} is empty (0 bytes)")
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


def load_checkpoint(model, path):
    """Load the checkpoint at ``path`` into ``model`` strictly; returns ``(file SHA-256,
    weights SHA-256)`` (``weights_sha256``).

    Raises ``FileNotFoundError`` naming the path, or ``CheckpointMismatch`` for a file that
    is not a weights checkpoint, whose keys or shapes do not fit (listing the missing,
    unexpected and mis-shaped keys), or whose tensors hold NaN or infinite values (naming
    them).
    """
    state_dict = unwrap_state_dict(_read(path))
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
    return sha256_of(path), weights_sha256(model)
