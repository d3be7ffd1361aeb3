"""AdaScale's perturbed forward pass (Regmi et al., 2025; sudarshanregmi/adascale, as OpenOOD
runs it in ``adascale_postprocessor.py``), recorded at extraction.

For a batch x (the normalised input) with logits z: the gradient g of sum_n z[n, argmax z[n]]
with respect to x; in each image, the ``int(C H W o)`` entries with the smallest |g|
(``torch.topk(largest=False)``) move by ``step`` along sign(g) (sign 0 where g = 0):
x' = x + step * sign(g) * mask; the features of x' (the head input) are stored as
``adascale/features`` (N, D). OpenOOD fixes o = 0.05 and step = 0.5 (its sweep varies
neither), and so does this pass (``RECIPE``, recorded as the root attribute ``adascale``).
Cost: one backward to the input and one forward per batch.
"""
import torch

RECIPE = {"o": 0.05, "step": 0.5}


def max_logit_gradient(logits, x, retain_graph):
    """(N, C, H, W) d sum_n max_k z[n, k] / dx (x the graph's input leaf)."""
    top = logits.gather(1, logits.argmax(dim=1, keepdim=True)).sum()
    (grad,) = torch.autograd.grad(top, x, retain_graph=retain_graph)
    return grad


def perturbed(x, grad, o=RECIPE["o"], step=RECIPE["step"]):
    """x moved by ``step`` sign(grad) at the ``int(C H W o)`` entries of least |grad| per image."""
    n, flat = x.shape[0], grad.reshape(x.shape[0], -1)
    count = int(flat.shape[1] * o)
    mask = torch.zeros_like(flat)
    if count:
        mask.scatter_(1, torch.topk(flat.abs(), count, dim=1, largest=False).indices, 1.0)
    return x + grad.sign() * mask.view_as(x) * step
