"""The generic model adapter: every hook set of any image classifier, from one traced
forward pass (``extract.adapters.trace``).

What it finds, and how:
    head         the last ``nn.Linear`` / 1x1 ``nn.Conv2d`` whose output is the model's
                 output (``--head MODULE`` names another); its input is the cached
                 feature vector (D) and its weight the cached head (K, D). A model
                 without one (a cosine classifier, ``F.linear`` in ``forward``, SqueezeNet,
                 two averaged heads) has head "" and no cached head: it serves every
                 score but those that read the head or assume logits = W x + b, which
                 are refused by name. Its features are found as ``trace._feature_source``
                 says (the input of the module that makes the logits, averaged over
                 positions when it is a map).
    norms        the normalisation layers of the first kind the model has, in this order:
                 BatchNorm (any dimension), GroupNorm, LayerNorm (``LayerNorm2d`` too). A
                 norm with a fused activation (timm's ``BatchNormAct2d``: BN, then ``drop``,
                 then ``act``) is recorded at its ``drop`` child, i.e. before the activation.
    stages       the model's top-level blocks: from the root, descend into the child that
                 holds more than 90 % of the parameters (the head's excluded) or is the only
                 block; the blocks are then the children whose own children hold
                 parameters (``layer1..4``, ``features.0..8``,
                 ``encoder.layers.*``, ``blocks.*``).
    penultimate  the last module before the head whose output spans more than one
                 position: the input of the global pool (``layer4``, ``features``) or the
                 token sequence (a ViT's ``encoder``).

Hook sets built from these (``HOOK_SETS``; GAIA's and NAC-UE's names):
    bn           every norm layer
    before_head  the norm layers of the last two stages, then ``penultimate``
    nac          the stage outputs
    penultimate  the one map above
    gram         every ``nn.Conv2d`` and ``nn.ReLU`` module that runs once per forward, in
                 module order (GRAM's rule in OpenOOD's ``gram_postprocessor.py``: it hooks
                 every module of those two types; a ReLU module a block calls twice, as
                 torchvision's BasicBlock does, cannot be recorded per call and is left out)
Family adapters (one file each in this package) replace a set where an author defined it
otherwise. Any set may be replaced by module names or globs (``hook_sets`` overrides,
``--hook-set bn='features.*.norm*'``), and any module that runs once per forward and
returns a tensor can be hooked by name.
"""
import fnmatch
import re

import torch.nn as nn

from gradood.store.recipes import HOOK_SETS  # the names are data, shared with the torch-free CLI

from .trace import canonical_shape, feature_vector, head_features, named_head_problem, trace


_NORM_KINDS = (("BatchNorm", nn.modules.batchnorm._BatchNorm), ("GroupNorm", nn.GroupNorm),
               ("LayerNorm", nn.LayerNorm))


# Activation modules, by class name; those of ``EXACT_ZEROS`` give exact zeros (and so zero
# gradients) for part of their input, which GAIA-Z counts.
ACTIVATIONS = ("ReLU", "ReLU6", "Hardtanh", "Hardswish", "Hardsigmoid", "SiLU", "Swish", "GELU", "Mish", "ELU",
               "SELU", "CELU", "LeakyReLU", "PReLU", "Sigmoid", "Tanh", "Softplus", "GELUTanh", "QuickGELU")
EXACT_ZEROS = ("ReLU", "ReLU6", "Hardtanh", "Hardswish", "Hardsigmoid")


class HookSetError(ValueError):
    """A hook set or module cannot be hooked on this model; the message says why."""


def norm_kind(module):
    """``"BatchNorm"``, ``"GroupNorm"``, ``"LayerNorm"`` or None for ``module``."""
    for kind, cls in _NORM_KINDS:
        if isinstance(module, cls):
            return kind
    return None


def _fused_activation(module):
    act = getattr(module, "act", None)
    return isinstance(act, nn.Module) and not isinstance(act, nn.Identity)


class ModelAdapter:
    """What extraction needs to know of one ``nn.Module`` image classifier.

    model: in eval mode. image_shape: (C, H, W) of one preprocessed image. head: module
    name of the linear head (default: found by tracing). hook_sets: ``{set name: [module
    name or glob, ...]}`` replacing the adapter's definition of those sets.

    Attributes: ``trace`` (``Trace``), ``head_name`` ("" without a linear head),
    ``features`` (``trace.FeatureSource``: where the cached features are taken),
    ``num_classes`` (K), ``feature_dim`` (D), ``family`` (the adapter's name).
    """

    family = "generic"

    def __init__(self, model, image_shape, head=None, hook_sets=None):
        self.model = model
        self.modules = dict(model.named_modules())
        self.order = list(self.modules)
        try:
            self.trace = trace(model, image_shape)
        except RuntimeError as err:         # shapes that do not fit: another input size or channel count
            size = "x".join(map(str, image_shape))
            first = str(err).splitlines()[0]
            channels = re.search(r"to have (\d+) channels, but got (\d+) channels", first)
            if channels:
                want = int(channels.group(1))
                raise HookSetError(
                    f"{type(model).__name__} expects {want}-channel images, and the preprocessing gives "
                    f"{image_shape[0]} ({size}): give a --preprocess of {want} channel(s)"
                    + (" (grayscale presets: mnist, fashion_mnist)" if want == 1 else "")) from None
            raise HookSetError(f"{type(model).__name__} fails on a {size} input (channels x height x width): "
                               f"{first}; if it expects another input size, give --image-size (or a --preprocess "
                               "preset of its size)") from None
        self.overrides = {k: list(v) for k, v in (hook_sets or {}).items()}
        if head is not None:
            module = self.modules.get(head)
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                raise HookSetError(f"--head {head}: not an nn.Linear or nn.Conv2d of the model"
                                   + (f" (it is {type(module).__name__})" if module is not None else ""))
            problem = named_head_problem(head, module, self.trace)
            if problem:
                raise HookSetError(f"--head {head}: {problem}")
            self.head_name = head
            self.features = head_features(head, self.trace.input_shapes, self.trace.input_layouts)
        elif self.trace.num_classes == 0:
            raise HookSetError(f"{type(model).__name__}: {self.trace.head_problem}")
        elif self.trace.features is None:
            raise HookSetError(f"{type(model).__name__}: no linear head, and no features: "
                               f"{self.trace.features_problem}")
        else:
            self.head_name = self.trace.head or ""
            self.features = self.trace.features
        self.num_classes, self.feature_dim = self.trace.num_classes, self.features.dim
        # the module the hook sets end before: the head, else the module whose input is the
        # features (None: the model applies its own weights last, so only the root holds it)
        self._boundary = self.head_name or (self.features.module if self.features.side == "input" else None)

    # ------------------------------------------------------------------ the head
    @property
    def head(self):
        """The linear head module (``nn.Linear`` or 1x1 ``nn.Conv2d``), None without one."""
        return self.modules[self.head_name] if self.head_name else None

    def head_weight_bias(self):
        """Head weight (K, D) and bias (K,) tensors, detached, on the model's device (a
        head without bias gets zeros); None for a model without a linear head."""
        head = self.head
        if head is None:
            return None
        weight = head.weight.detach().reshape(head.weight.shape[0], -1)
        bias = head.bias.detach() if head.bias is not None else weight.new_zeros(weight.shape[0])
        return weight, bias

    def capture_features(self, captured):
        """Register the hook that puts the (N, D) features of each forward pass in
        ``captured["x"]`` (in the autograd graph, so objectives may read them); returns the
        handle, which the caller removes in a ``finally``."""
        source, module = self.features, self.modules[self.features.module]
        if source.side == "input":
            return module.register_forward_pre_hook(
                lambda m, args: captured.__setitem__("x", feature_vector(args[0], source)))
        return module.register_forward_hook(
            lambda m, args, out: captured.__setitem__("x", feature_vector(out, source)))

    # ------------------------------------------------------------------ layers
    def why_not_hookable(self, name):
        """Empty when module ``name`` can be hooked, else the reason."""
        if name not in self.modules or name == "":
            return f"the model has no module {name!r}"
        call = self.trace.calls.get(name)
        if call is None:
            return f"module {name} does not run in the forward pass"
        if call.shape is None:
            return f"module {name} returns no tensor ({type(self.modules[name]).__name__})"
        if call.calls != 1:
            return (f"module {name} runs {call.calls} times per forward pass (a shared module); "
                    "hook a module that runs once")
        if call.folded:
            return (f"module {name} outputs rows that are not images (its input's axes are folded into the "
                    "batch axis, as LeViT's BatchNorm1d over tokens); hook a module whose output is batch first")
        return ""

    def layout(self, name):
        """Layout of module ``name``'s output (``trace.LAYOUTS``)."""
        return self.trace.calls[name].layout

    def shape(self, name):
        """[C, H, W] of module ``name``'s output in channels-first form."""
        call = self.trace.calls[name]
        return canonical_shape(call.shape, call.layout)

    def module_type(self, name):
        """Class name of module ``name``."""
        return type(self.modules[name]).__name__

    def _in_order(self, names):
        wanted = set(names)
        return [n for n in self.order if n in wanted]

    def _end_order(self):
        """Completion order of the module the hook sets end before (the model itself when
        it applies its own weights last)."""
        return self.trace.calls[self._boundary if self._boundary is not None else ""].order

    def _is_ancestor_of_head(self, name):
        return name == "" or (self._boundary is not None and self._boundary.startswith(name + "."))

    def norms(self, under=None):
        """Recorded names of the norm layers of the model's first norm kind (see the
        module docstring), in module order; only those inside ``under`` (module names)
        when given. Raises HookSetError for a fused norm-activation without a ``drop``."""
        kinds = {}
        for name in self.order:
            kind = norm_kind(self.modules[name])
            if kind and name in self.trace.calls and not self.trace.calls[name].folded:
                kinds.setdefault(kind, []).append(name)
        kind = next((k for k, _ in _NORM_KINDS if k in kinds), None)
        out = []
        for name in kinds.get(kind, []):
            if under is not None and not any(name.startswith(u + ".") for u in under):
                continue
            module = self.modules[name]
            if _fused_activation(module):
                if f"{name}.drop" not in self.trace.calls:
                    raise HookSetError(f"norm layer {name} ({type(module).__name__}) applies its "
                                       "activation inside its forward and has no 'drop' child to "
                                       "record the normalised output at")
                name = f"{name}.drop"
            out.append(name)
        return out

    def stages(self):
        """Module names of the model's top-level blocks (see the module docstring)."""
        counts = {n: sum(p.numel() for p in m.parameters()) for n, m in self.modules.items()}
        head_params = (counts[self._boundary] if self._boundary is not None
                       else sum(p.numel() for p in self.model.parameters(recurse=False)))

        def size(name):
            return counts[name] - (head_params if self._is_ancestor_of_head(name) else 0)

        node = ""
        while True:
            prefix = f"{node}." if node else ""
            kids = [prefix + n for n, m in self.modules[node].named_children()]
            blocks = [k for k in kids if size(k) > 0 and not self._is_ancestor_of_head(k)
                      and k != self._boundary and self._has_parametric_children(k)
                      and k in self.trace.calls]
            if not blocks:
                return []
            biggest = max(blocks, key=size)
            if len(blocks) == 1 or size(biggest) > 0.9 * size(node):
                node = biggest
                continue
            return [b for b in blocks if not self.why_not_hookable(b)]

    def _has_parametric_children(self, name):
        return any(any(True for _ in c.parameters()) for c in self.modules[name].children())

    def penultimate(self):
        """Name of the last module before the head whose output spans more than one
        position: the input of the global pool, or the token sequence. Its channels are
        usually D; a model with a hidden layer in its classifier (MobileNetV3) has
        another count, which scores that pool this map into the head refuse."""
        head_order = self._end_order()
        best = None
        for call in self.trace.calls.values():
            if call.order >= head_order or self.why_not_hookable(call.name) or \
                    self._is_ancestor_of_head(call.name) or call.layout == "NC":
                continue
            c, h, w = canonical_shape(call.shape, call.layout)
            if h * w > 1 and (best is None or call.order > best.order):
                best = call
        if best is None:
            raise HookSetError(f"{type(self.model).__name__}: no module before the head "
                               f"{self._boundary or '(the model itself)'} outputs a map over more than one position "
                               "(the input of a global pool)")
        return best.name

    # ------------------------------------------------------------------ hook sets
    def hook_set(self, name):
        """Ordered module names of hook set ``name`` (``HOOK_SETS``, an override, or a
        plain module name). Raises HookSetError naming the set and the reason."""
        if name in self.overrides:
            return self._matching(name, self.overrides[name])
        if name in HOOK_SETS:
            override = f"; define it for this model with --hook-set {name}=MODULE[,MODULE...] (module names or globs)"
            try:
                layers = self.define(name)
            except HookSetError as err:
                raise HookSetError(f"{err}{override}") from None
            bad = [(l, self.why_not_hookable(l)) for l in layers if self.why_not_hookable(l)]
            if bad:
                raise HookSetError(f"hook set {name!r}: {bad[0][1]}{override}")
            return layers
        reason = self.why_not_hookable(name)
        if reason:
            examples = ", ".join(n for n in self.order[1:] if not self.why_not_hookable(n))
            raise HookSetError(f"unknown hook {name!r}: use a hook set ({', '.join(HOOK_SETS)}) or a "
                               f"module name that runs once ({reason}); e.g. {examples[:200]}")
        return [name]

    def define(self, name):
        """This adapter's definition of hook set ``name`` (family adapters override)."""
        what = type(self.model).__name__
        if name == "bn":
            norms = self.norms()
            if not norms:
                raise HookSetError(f"hook set 'bn' is not defined for {what}: it has no "
                                   "BatchNorm, GroupNorm or LayerNorm layer")
            return norms
        if name == "before_head":
            stages = self.stages()[-2:]
            norms = self.norms(under=stages)
            if not norms:
                raise HookSetError(f"hook set 'before_head' is not defined for {what}: no norm "
                                   f"layer in its last stages ({', '.join(stages) or 'none found'})")
            return norms + [self.penultimate()]
        if name == "nac":
            stages = self.stages()
            if not stages:
                raise HookSetError(f"hook set 'nac' is not defined for {what}: no stages found")
            return stages
        if name == "penultimate":
            return [self.penultimate()]
        if name == "gram":
            end = self._end_order()
            layers = [n for n in self.order if n and not self.why_not_hookable(n) and self.trace.calls[n].order < end
                      and isinstance(self.modules[n], (nn.Conv2d, nn.ReLU))]
            if not layers:
                raise HookSetError(f"hook set 'gram' is not defined for {what}: no nn.Conv2d or "
                                   "nn.ReLU module runs once per forward")
            return layers
        raise HookSetError(f"hook set {name!r} is not defined for {what} (it is "
                           "GAIA's BiT-only set); name its modules with --hook-set "
                           f"{name}=MODULES")

    def _matching(self, set_name, patterns):
        out = []
        for pattern in patterns:
            hits = [n for n in self.order if n and fnmatch.fnmatchcase(n, pattern)]
            hooks = [n for n in hits if not self.why_not_hookable(n)]
            if not hooks:
                why = f" ({self.why_not_hookable(hits[0])})" if hits else ""
                raise HookSetError(f"--hook-set {set_name}: {pattern!r} matches no module that can "
                                   f"be hooked{why}")
            out += [n for n in hooks if n not in out]
        return self._in_order(out)

    def describe(self, layers):
        """``({layer: layout}, {layer: module class})`` of ``layers``."""
        return ({l: self.layout(l) for l in layers}, {l: self.module_type(l) for l in layers})

    def activation_after(self, layer):
        """Class name of the activation applied to ``layer``'s output: a fused norm's
        ``act`` (timm), else the activation module that completes right after it in the
        traced forward; "" when none is seen (a functional activation, or none)."""
        if layer.endswith(".drop") and _fused_activation(self.modules.get(layer[:-len(".drop")])):
            return type(self.modules[layer[:-len(".drop")]].act).__name__
        call = self.trace.calls.get(layer)
        if call is None:
            return ""
        later = sorted((c.order, n) for n, c in self.trace.calls.items() if c.order > call.order)
        if not later:
            return ""
        kind = type(self.modules[later[0][1]]).__name__
        return kind if kind in ACTIVATIONS else ""
