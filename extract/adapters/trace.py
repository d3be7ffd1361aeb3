"""One traced forward pass: which modules run, in which order, what each outputs, and in
which layout; which module is the head.

``trace(model, image_shape)`` runs the model once (eval mode, no gradient) on a seeded
random batch of two images, with a forward hook on every module. Each module that ran is
described by a ``Call``: its call position (post-order: a container after its children),
how often it ran, its output shape and its layout. The head is the last ``nn.Linear`` or
1x1 ``nn.Conv2d`` that ran once and whose output, flattened per sample, is exactly the
model's output. A model without one (a cosine classifier, ``F.linear`` in ``forward``,
SqueezeNet's conv-ReLU-pool classifier, two averaged heads) still has logits, and its
features are found by ``_feature_source`` (see ``FeatureSource``).

Layouts (of one module's output, batch first):
    NC    (N, C) vectors
    NCHW  channels first, one or more spatial axes (convolutions, batch/group norms,
          pools; also (N, C, L))
    NHWC  channels last over a 2-D grid (Swin blocks, ConvNeXt's inner LayerNorm)
    NTC   a token sequence, channels last (ViT encoder blocks; class token included)
A module's layout comes from what it is (``_own_layout``); a module returning a tensor
some other module produced takes that module's layout; a shape-preserving module takes
its input's; anything else (a block ending in a functional residual add) takes the layout
of the last module inside it with the same output shape. ``canonical`` turns any of them
into the channels-first (N, C, H, W) form every statistic and stored map uses.
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from gradood.store.schema import LAYOUTS  # noqa: F401 (the layouts a trace names, declared with the schema)

_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                   nn.modules.instancenorm._InstanceNorm, nn.modules.pooling._MaxPoolNd,
                   nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                   nn.modules.pooling._AdaptiveMaxPoolNd, nn.LocalResponseNorm)
_CHANNELS_LAST = (nn.Linear, nn.LayerNorm, nn.MultiheadAttention)


class Call(NamedTuple):
    """One module of a traced forward pass.

    name: module name (``named_modules``). order: position of its (last) completion.
    calls: how often it ran in one forward. shape: output shape without the batch axis
    (None when the output is not a tensor). layout: one of ``LAYOUTS`` (None: no tensor).
    folded: True when the output's first axis is not the batch (LeViT's BatchNorm1d over
    ``x.flatten(0, 1)``: N x T rows), so its rows are not samples.
    """
    name: str
    order: int
    calls: int
    shape: Optional[tuple]
    layout: Optional[str]
    folded: bool = False


class FeatureSource(NamedTuple):
    """Where the cached feature vector (D per image) is taken.

    module: module name. side: "input" (its first tensor input, captured by a forward
    pre-hook) or "output". layout: that tensor's layout (``LAYOUTS``). pooled: True when
    the tensor holds more than one position per image (a map or tokens), averaged over
    them in channels-first form; False when it is flattened per image. dim: D.
    """
    module: str
    side: str
    layout: str
    pooled: bool
    dim: int

    def describe(self):
        """``"MODULE input"`` / ``"MODULE output"``, with ``", averaged"`` when pooled (the
        cache's ``features`` attribute)."""
        return f"{self.module} {self.side}" + (", averaged" if self.pooled else "")


class Trace(NamedTuple):
    """What one forward pass showed. calls: ``{name: Call}`` of the modules that ran.
    head: name of the linear head module (None when none was found, see ``head_problem``).
    num_classes: K (0 when the output is not (N, K)).
    input_shapes: ``{name: shape of one sample of the module's first positional tensor
    input}``. input_layouts: ``{name: that input's layout}``. gives_logits: names of the
    modules whose output, reshaped, is the model's output. features: the
    ``FeatureSource`` (None when the output is not (N, K) or no feature vector is found,
    see ``features_problem``)."""
    calls: dict
    head: Optional[str]
    head_problem: str
    num_classes: int
    input_shapes: dict = {}
    input_layouts: dict = {}
    gives_logits: tuple = ()
    features: Optional[FeatureSource] = None
    features_problem: str = ""


def _layout_from_shape(ndim):
    return {2: "NC", 3: "NTC"}.get(ndim, "NCHW")


def _own_layout(module, ndim):
    """The layout a module's own computation gives its output, or None when it does not
    decide one (shape-preserving ops, containers)."""
    if ndim == 2:
        return "NC"
    kind = type(module).__name__
    if kind == "LayerNorm2d":          # torchvision / timm: normalises over channels of NCHW
        return "NCHW"
    if isinstance(module, _CHANNELS_FIRST):
        return "NCHW"
    if isinstance(module, _CHANNELS_LAST):
        return "NTC" if ndim == 3 else "NHWC"
    return None


def _permuted(module, layout):
    """Layout after a torchvision ``Permute`` of a 4-D tensor."""
    dims = list(getattr(module, "dims", []))
    if dims == [0, 2, 3, 1] and layout == "NCHW":
        return "NHWC"
    if dims == [0, 3, 1, 2] and layout == "NHWC":
        return "NCHW"
    return None


def trace(model, image_shape, device=None):
    """``Trace`` of one forward pass of ``model`` (eval mode) on two seeded random images of
    shape ``image_shape`` (C, H, W), on ``device`` (default: the model's)."""
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    names = {m: n for n, m in model.named_modules(remove_duplicate=False)}
    produced = {}      # id(tensor) -> layout; ``keep`` holds the tensors so ids stay unique
    keep = []
    seen = {}          # name -> [order, calls, shape, layout, folded]
    shapes = {}        # name -> shape of one sample of its first positional tensor input
    input_layouts = {}
    input_makers = {}  # name -> the innermost module that output its first input (None: a functional op)
    makers = {}        # id(tensor) -> the innermost module that output it
    outputs = {}
    last_inside = {}   # name -> [(order, shape, layout)] of tensors produced inside it
    counter = [0]

    def hook(module, args, output):
        name = names[module]
        counter[0] += 1
        x = args[0] if args and torch.is_tensor(args[0]) else None
        if not torch.is_tensor(output):
            seen[name] = [counter[0], seen.get(name, [0, 0])[1] + 1, None, None, False]
            return
        ndim = output.dim()
        layout = produced.get(id(output))
        if layout is None:
            layout = _own_layout(module, ndim)
        if layout is None and type(module).__name__ == "Permute" and x is not None:
            layout = _permuted(module, produced.get(id(x), _layout_from_shape(x.dim())))
        if layout is None and x is not None and tuple(x.shape) == tuple(output.shape) and id(x) in produced:
            layout = produced[id(x)]
        if layout is None:      # e.g. a block ending in a functional residual add
            inner = sorted((o, l) for n, (o, s, l) in last_inside.items()
                           if (name == "" or n.startswith(name + ".")) and s == tuple(output.shape))
            layout = inner[-1][1] if inner else _layout_from_shape(ndim)
        if id(output) not in produced:
            produced[id(output)] = layout
            keep.append(output)
        makers.setdefault(id(output), name)
        last_inside[name] = (counter[0], tuple(output.shape), layout)
        seen[name] = [counter[0], seen.get(name, [0, 0])[1] + 1, tuple(output.shape[1:]), layout,
                      ndim == 0 or output.shape[0] != batch]
        if x is not None:
            shapes[name] = tuple(x.shape[1:])
            # a tensor no module produced is read as its consumer reads it (a Linear: channels last)
            input_layouts[name] = produced.get(id(x)) or _own_layout(module, x.dim()) or _layout_from_shape(x.dim())
            input_makers[name] = makers.get(id(x))
        outputs[name] = output

    handles = [m.register_forward_hook(hook) for m in names]
    generator = torch.Generator().manual_seed(0)
    batch = 2
    x = torch.randn((batch, *image_shape), generator=generator).to(device)
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    calls = {n: Call(n, o, c, s, l, f) for n, (o, c, s, l, f) in seen.items()}
    if not torch.is_tensor(out) or out.dim() != 2:
        what = type(out).__name__ if not torch.is_tensor(out) else f"a tensor of shape {tuple(out.shape)}"
        return Trace(calls, None, f"the model's output is {what}, not (N, K) logits", 0, shapes)
    gives = tuple(n for n, y in outputs.items() if y.dim() and y.shape[0] == out.shape[0]
                  and y[0].numel() == out.shape[1] and torch.equal(y.reshape(out.shape), out))
    head, problem = _find_head(model, calls, gives)
    if head:
        source, lacking = head_features(head, shapes, input_layouts), ""
    else:
        source, lacking = _feature_source(model, calls, shapes, input_layouts, input_makers, gives, int(out.shape[1]))
    return Trace(calls, head, problem, int(out.shape[1]), shapes, input_layouts, gives, source, lacking)


def _feature_source(model, calls, input_shapes, input_layouts, input_makers, gives_logits, num_classes):
    """``(FeatureSource, "")`` of a model without a linear head, or ``(None, why not)``.

    When a module outputs the logits, take the innermost one and walk back over what is
    applied to the logits (a temperature, a norm, SqueezeNet's ReLU and pool: modules whose
    input has K channels, K the class count) to the module that makes them from fewer or
    more channels: a cosine classifier, SqueezeNet's 1x1 conv, a head whose weights are a
    buffer. When none does (two heads averaged in ``forward``, ``F.linear(x,
    self.weight)`` there), take the last submodule with parameters of its own that outputs
    K channels (the second head); without one, the last one-vector-per-image output of a
    submodule, else the last map. The features are that module's input (its output in the
    last two cases), as is when it is one vector per image, averaged over positions when it
    is a map or a token sequence. Features of exactly K dimensions cannot be told from
    logits this way: where no module made them the model is refused; where one did, the
    walk goes on past them (a known limit, written in docs/models.md)."""
    modules = dict(model.named_modules())

    def channels(shape, layout):
        return canonical_shape(shape, layout)[0] if len(shape) > 1 else math.prod(shape)

    def input_of(name):
        call, shape = calls[name], input_shapes.get(name)
        if call.calls != 1:
            return None, f"{name} makes the logits and runs {call.calls} times per forward pass"
        if shape is None:
            return None, f"{name} makes the logits and takes its input by keyword, which a hook cannot capture"
        layout = input_layouts[name]
        return FeatureSource(name, "input", layout, len(shape) > 1, channels(shape, layout)), ""

    inner = sorted((calls[n] for n in gives_logits if n), key=lambda c: c.order)
    if inner:
        name = inner[0].name
        while input_shapes.get(name) is not None and \
                channels(input_shapes[name], input_layouts[name]) == num_classes:
            before = input_makers.get(name)
            if before is None:
                return None, (f"{name} makes the logits from a {num_classes}-channel input that no module "
                              "outputs: features of as many dimensions as classes cannot be told from logits")
            name = before
        return input_of(name)
    own = [c for n, c in calls.items() if n and c.shape is not None and not c.folded
           and any(True for _ in modules[n].parameters(recurse=False))
           and channels(c.shape, c.layout) == num_classes]
    last = max(own, key=lambda c: c.order, default=None)
    if last is not None:
        return input_of(last.name)
    ran = sorted((c for c in calls.values() if c.name and c.calls == 1 and c.shape is not None and not c.folded),
                 key=lambda c: -c.order)
    vector = next((c for c in ran if c.layout == "NC"), None)
    if vector is not None:
        return FeatureSource(vector.name, "output", "NC", False, math.prod(vector.shape)), ""
    grid = next((c for c in ran if len(c.shape) > 1), None)
    if grid is not None:
        return FeatureSource(grid.name, "output", grid.layout, True, channels(grid.shape, grid.layout)), ""
    return None, "no module with parameters runs before its logits and no submodule outputs a feature vector or map"


def head_features(head, input_shapes, input_layouts):
    """The ``FeatureSource`` of the linear head ``head``: its input, flattened per image
    (``input_shapes`` and ``input_layouts`` as in ``Trace``)."""
    return FeatureSource(head, "input", input_layouts[head], False, math.prod(input_shapes[head]))


def feature_vector(t, source):
    """(N, D) feature vectors from the captured tensor ``t`` (batch first) of ``source``:
    averaged over positions in channels-first form when pooled, else flattened."""
    if source.pooled:
        return canonical(t, source.layout).flatten(2).mean(dim=2)
    return t.flatten(1)


def named_head_problem(name, module, trace):
    """Why module ``name`` (``--head``) cannot be the linear head the scores read, checked
    against the traced shapes before anything runs, or ""."""
    call = trace.calls.get(name)
    if call is None or call.shape is None:
        return "it does not run in the forward pass"
    if call.calls != 1:
        return f"it runs {call.calls} times per forward pass; the head runs once"
    if not _is_head_type(module):
        kernel = "x".join(map(str, module.kernel_size))
        return (f"a {kernel} nn.Conv2d{f' with {module.groups} groups' if module.groups != 1 else ''} is not a "
                "linear map of one feature vector; a head is an nn.Linear or a 1x1 nn.Conv2d")
    d = int(module.weight[0].numel())
    given = trace.input_shapes.get(name, ())
    if math.prod(given) != d:
        return (f"its input per image is {'x'.join(map(str, given))}, a map, not one {d}-vector: the scores "
                "that read the head (GradNorm, ReAct, ViM, ...) need the features it maps to the logits; "
                "name a linear layer that runs after the model's pooling")
    if trace.num_classes and math.prod(call.shape) != trace.num_classes:
        return (f"its output per image is {'x'.join(map(str, call.shape))}, not the model's "
                f"{trace.num_classes} logits")
    if trace.num_classes and name not in trace.gives_logits:
        return ("its output is not the model's logits: the model computes more after it (another head "
                "averaged in, a temperature, a norm), and the scores that read the head need logits = W x + b "
                "of its input")
    return ""


def _is_head_type(module):
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and module.groups == 1


def _find_head(model, calls, gives_logits):
    """``(name, "")`` of the last ``nn.Linear`` / 1x1 ``nn.Conv2d`` that runs once and
    whose output is the logits (``gives_logits``), else ``(None, why)``."""
    modules = dict(model.named_modules())
    heads = sorted((calls[n] for n in gives_logits if calls[n].calls == 1 and _is_head_type(modules[n])),
                   key=lambda c: -c.order)
    if heads:
        return heads[0].name, ""
    return None, ("no nn.Linear or 1x1 nn.Conv2d produces the model's output (N, K): the head "
                  "must be the last linear map, with nothing after it but reshapes; name it "
                  "with --head MODULE if another module is the linear head")


def canonical(t, layout):
    """``t`` in channels-first form: (N, C, H, W) for NCHW/NHWC, (N, C, T, 1) for NTC,
    (N, C, 1, 1) for NC, (N, C, L, 1) for a 3-D channels-first tensor."""
    if layout == "NHWC":
        return t.permute(0, 3, 1, 2)
    if layout == "NTC":
        return t.transpose(1, 2)[..., None]
    if t.dim() == 2:
        return t[:, :, None, None]
    if t.dim() == 3:
        return t[..., None]
    if t.dim() > 4:
        return t.flatten(3)
    return t


def canonical_shape(shape, layout):
    """[C, H, W] of one sample's output ``shape`` (no batch axis) in ``layout``."""
    shape = list(shape)
    if layout == "NHWC":
        return [shape[2], shape[0], shape[1]]
    if layout == "NTC":
        return [shape[1], shape[0], 1]
    if len(shape) == 1:
        return [shape[0], 1, 1]
    if len(shape) == 2:
        return [shape[0], shape[1], 1]
    rest = 1
    for s in shape[2:]:
        rest *= s
    return [shape[0], shape[1], rest]
