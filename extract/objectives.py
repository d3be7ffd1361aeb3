"""Backward objectives: scalar functions of a batch whose gradients the scores read.

Each takes logits z (N, K) and the head input x (N, D) and returns a 0-dim tensor; the
sum over the batch makes the gradient at any hooked activation the stack of the
per-sample gradients (eval mode: samples do not interact). Definitions: store.schema.OBJECTIVES.
"""
import torch


def objective_value(name, logits, head_input):
    """Scalar objective ``name`` of a batch (see store.schema.OBJECTIVES)."""
    if name == "max_logit":
        return logits.max(dim=1).values.sum()
    if name == "log_softmax_sum":
        return torch.log_softmax(logits, dim=-1).sum()
    if name == "feature_sum":
        return head_input.sum()
    raise ValueError(f"unknown objective {name!r}")
