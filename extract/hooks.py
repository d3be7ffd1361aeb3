"""The recorder that captures hooked modules' activations and gradients per batch.

Which modules to hook (hook sets such as ``bn``, ``before_head``, ``nac``,
``penultimate``) is the model adapter's business (``extract.adapters``). Every output and
gradient is turned into channels-first (N, C, H, W) form (``adapters.trace.canonical``)
before any statistic is taken, so a token sequence (N, T, C) or a channels-last map
(N, H, W, C) gives per-channel statistics over its T tokens or H x W positions.
Statistics are taken when the module returns, so an in-place op applied later in
``forward()`` (DenseNet's ``F.relu(features, inplace=True)`` after ``features.norm5``)
changes neither them nor the gradient, which a tensor hook registered on that output
receives as the gradient w.r.t. the value the module produced.
"""
import torch
import torch.nn as nn

from .adapters.trace import canonical


def graph_start(model, layers):
    """Module whose input becomes the autograd leaf: nothing below it is backpropagated.

    The earliest hooked module (module order) may sit in a residual block whose shortcut
    is hooked too, so the leaf is placed at the input of the deepest enclosing module
    that is an element of an ``nn.Sequential`` (e.g. ``layer3.0`` for ``layer3.0.bn1``);
    a module with no such ancestor is its own start.
    """
    order = [n for n, _ in model.named_modules()]
    first = min(layers, key=order.index)
    parts = first.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        parent = model.get_submodule(".".join(parts[:depth - 1])) if depth > 1 else model
        if isinstance(parent, nn.Sequential):
            return ".".join(parts[:depth])
    return first


def objective_depth(plan, objective, order):
    """Index in ``order`` (module order) of the earliest layer whose ``plan`` records
    ``objective``: how deep its backward pass goes."""
    layers = [l for l in plan if objective in plan[l]]
    return min((order.index(l) for l in layers), default=len(order))


def channel_stats(t, stats):
    """Per-channel statistics of ``t`` (N, C, H, W) or (N, C): ``{stat: (N, C) tensor}``."""
    if t.dim() == 2:
        t = t[:, :, None, None]
    flat = t.flatten(2)
    out = {}
    for stat in stats:
        if stat == "nonzero":
            out[stat] = torch.count_nonzero(flat, dim=2).to(torch.int32)
        elif stat == "mean":
            out[stat] = t.mean(dim=(-1, -2))   # the authors' reduction, same op
        elif stat == "abs_mean":
            out[stat] = flat.abs().mean(2)
        elif stat == "sq_mean":
            out[stat] = flat.pow(2).mean(2)
        elif stat == "abs_max":
            out[stat] = flat.abs().amax(2)
        elif stat == "map":
            out[stat] = t.clone()
    grams = sorted(int(s[4:]) for s in stats if s.startswith("gram"))
    if grams:
        out.update({f"gram{p}": v for p, v in gram_row_sums(flat, grams).items()})
    return out


def gram_row_sums(flat, powers):
    """``{p: (N, C) float64}`` sign(s) |s|^(1/p) of s_c = sum_c' <t_c, t_c'>, t = flat**p,
    for ``flat`` (N, C, H*W) and ascending ``powers``: the row sums of GRAM's p-th order Gram
    matrix, as the sum over positions of t_c times the channel sum of t (the same sum, in
    O(C H W)); t is raised by repeated multiplication in float64."""
    x = flat.double()
    t, at, out = torch.ones_like(x), 0, {}
    for p in powers:
        while at < p:
            t, at = t * x, at + 1
        s = (t * t.sum(dim=1, keepdim=True)).sum(dim=2)
        out[p] = s.sign() * s.abs() ** (1.0 / p)
    return out


class Recorder:
    """Captures activation and gradient statistics of hooked modules during one batch.

    plan: ``{layer: {"act" | objective: [stat, ...]}}`` (store.recipes.build_plan).
    layouts: ``{layer: layout}`` (``adapters.trace.LAYOUTS``; default channels first).
    start_module: the module whose input becomes the autograd leaf (None: the caller's
    input already requires grad, or no gradient is recorded).
    After ``model(x)`` the activations are in ``self.records``; ``backward(objective,
    value)`` then files that objective's gradients. Records are tensors on the model's
    device with leading dimension N.
    """

    def __init__(self, model, plan, start_module, layouts=None):
        self.plan = plan
        self.layouts = dict(layouts or {})
        self.enabled = True   # off during extra passes (ODIN, gradient tracking)
        self.objective = None
        self.records = {}
        self.shapes = {}
        self.inputs = {}
        self.leaf = None
        self._handles = ([model.get_submodule(start_module).register_forward_pre_hook(self._make_leaf)]
                         if start_module else [])
        for layer in plan:
            self._handles.append(model.get_submodule(layer).register_forward_hook(self._hook(layer)))

    def _make_leaf(self, module, args):
        if not self.enabled:
            return None
        self.leaf = args[0].detach().requires_grad_()
        # a clone of the leaf, so an in-place first module (a ReLU) may overwrite it
        return (self.leaf.clone(),) + tuple(args[1:])

    def _hook(self, layer):
        def forward_hook(module, args, output):
            if not self.enabled:
                return
            self.shapes[layer] = list(output.shape[1:])
            act_stats = self.plan[layer].get("act", [])
            if act_stats:
                value = canonical(output.detach(), self.layouts.get(layer))
                for stat, value in channel_stats(value, act_stats).items():
                    self.records[("act", layer, stat)] = value
            if output.requires_grad and any(s != "act" for s in self.plan[layer]):
                output.register_hook(self._grad_hook(layer))
                if args and torch.is_tensor(args[0]) and args[0].requires_grad:
                    self.inputs[layer] = (args[0], args[0]._version)
        return forward_hook

    def _grad_hook(self, layer):
        def tensor_hook(grad):
            stats = self.plan[layer].get(self.objective, [])
            value = canonical(grad.detach(), self.layouts.get(layer))
            for stat, value in channel_stats(value, stats).items():
                self.records[(self.objective, layer, stat)] = value
        return tensor_hook

    def backward(self, objective, value, retain_graph, truncate=True):
        """Back-propagate ``value`` (the objective, a 0-dim tensor) and file the gradients
        of the layers whose plan records ``objective``.

        truncate: autograd computes only what leads to those layers' inputs (the tensor
        hooks on their outputs fire on the way), so the pass stops at the earliest of
        them; it falls back to the full graph when an input was modified in place after
        the module read it (its gradient edge would then not lead through the hook).
        """
        self.objective = objective
        layers = [l for l in self.plan if objective in self.plan[l]]
        inputs = [self.inputs.get(l) for l in layers]
        if truncate and inputs and all(i is not None and i[0]._version == i[1] for i in inputs):
            targets = list({id(t): t for t, _ in inputs}.values())
        else:
            targets = [self.leaf] if self.leaf is not None else [t for t, _ in filter(None, inputs)]
        torch.autograd.grad(value, targets, retain_graph=retain_graph, allow_unused=True)
        absent = [l for l in layers if not any((objective, l, s) in self.records for s in self.plan[l][objective])]
        if absent:
            raise RuntimeError(f"no gradient of {objective} reached {', '.join(absent[:3])}; "
                               "these layers do not depend on the graph's start")

    def reset(self):
        self.records = {}
        self.inputs = {}
        self.objective = None
        self.leaf = None

    def close(self):
        for h in self._handles:
            h.remove()
