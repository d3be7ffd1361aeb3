"""iODIN's perturbed forward pass (Regmi et al., ASCOOD; OpenOOD ``iodin_postprocessor.py``,
``configs/postprocessors/iodin.yml``), recorded at extraction.

ODIN's step, at one input entry only: with g the gradient of the cross-entropy of z / T
at the predicted class with respect to the normalised input x, in each image the entry of
largest |g| (over channels and positions, ``argmax``) moves by epsilon against sign(g)
(``g >= 0`` counts as +1, as OpenOOD's ``torch.ge``) divided by that channel's
normalisation std; the logits of the moved input are stored as ``iodin/logits`` (N, K),
not divided by T. OpenOOD's defaults T = 1000, epsilon = 0.0014 are the recipe
(``RECIPE``, the root attribute ``iodin``). Cost: the ODIN backward at T (shared with an
ODIN pass of the same T) and one forward per batch.
"""
import torch

from gradood.store.recipes import ODIN_DEFAULT

RECIPE = {"temperature": ODIN_DEFAULT[0], "epsilon": ODIN_DEFAULT[1]}


def perturbed(x, grad, std, epsilon=RECIPE["epsilon"]):
    """x moved by epsilon against the std-divided sign of ``grad`` at each image's entry of
    largest |grad|; std: (1, C, 1, 1)."""
    flat = grad.abs().reshape(x.shape[0], -1)
    mask = torch.zeros_like(flat).scatter_(1, flat.argmax(dim=1, keepdim=True), 1.0).view_as(x)
    step = ((grad >= 0).to(x.dtype) * 2 - 1) / std
    return x - epsilon * step * mask
