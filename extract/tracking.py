"""Per-sample weight-gradient norms for gradient tracking (repository gengandrew/Open_OOD).

For each sample n and each class k used as the cross-entropy label, the L2 norm of the
gradient of every tracked weight tensor. The release loops over samples at batch size 1;
here one forward pass and K backward passes per batch give the same numbers exactly:
in eval mode samples do not interact, so the gradient of ``sum_n CE(z_n, k)`` w.r.t. a
module output holds every sample's own output gradient, and per-sample weight gradients
factorise through the module input:

* ``nn.Linear``: dW_n = g_n a_n^T, so ||dW_n|| = ||g_n|| ||a_n||; on token inputs
  (N, T, D) dW_n = sum_t g_nt a_nt^T, formed per sample.
* ``nn.Conv2d``: dW_n = G_n U_n^T with U_n the unfolded input patches (C_in k k, L)
  and G_n the output gradient (C_out, L); ||dW_n||^2 is computed either directly
  (batched matrix product) or as sum((G_n^T G_n) * (U_n^T U_n)) over L x L, whichever
  holds fewer numbers. A grouped (or depthwise) convolution is the same per group g
  (its C_out / G output channels against its C_in / G input channels), summed over groups.
* BatchNorm weight (eval mode): dgamma_n,c = sum over the positions of g * x_hat with
  x_hat the input normalised by the running statistics.
* ``nn.LayerNorm`` weight: dgamma_n = sum over the leading positions of g * x_hat with
  x_hat the input normalised over its last ``normalized_shape`` axes.

Pruned weights (a 0/1 buffer ``mask_<name>`` on the model, ``extract.checkpoint``): the
release takes the norm of ``grad * mask`` (``track_gradient_gmm.py``
``extract_gradients``); so do we, with ||(g a^T) * M||^2 = (g^2)^T M (a^2) for a Linear
and the masked per-sample gradient formed directly for a Conv2d.

The release's name rule (no 'bn', no 'bias') keeps the weights of norm layers whose names
lack 'bn', such as a CIFAR ResNet's ``shortcut.1`` or torchvision's ``downsample.1``; so
do we. Weights of other modules (a ViT's ``class_token``, a Swin's position-bias tables)
are refused by name.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import mask_name

def tracked_parameters(model, trace=None):
    """Names (``named_parameters`` order) of the tracked tensors, by the release's rule:
    every parameter whose name contains neither 'bn' nor 'bias'. Raises ValueError naming
    the first tensor that is not the weight of a supported module (``_modules_of``) or
    whose module runs more than once per forward (``trace``: ``adapters.trace.Trace``)."""
    names = [n for n, _ in model.named_parameters() if "bias" not in n and "bn" not in n]
    for owner, _ in _modules_of(model, names):
        call = trace.calls.get(owner) if trace is not None else None
        if trace is not None and call is None:
            raise ValueError(f"gradient tracking: module {owner} never runs as a module (its "
                             "weight is used functionally, e.g. by an attention block), so its "
                             "input and output cannot be hooked")
        if trace is not None and call.folded:
            raise ValueError(f"gradient tracking: module {owner} outputs rows that are not images (its input's "
                             "axes are folded into the batch axis), so per-sample weight gradients cannot be "
                             "factorised from its input and output")
        if trace is not None and call.calls != 1:
            raise ValueError(f"gradient tracking: module {owner} runs {call.calls} times per "
                             "forward pass; its per-sample weight gradients cannot be factorised "
                             "from one input and output")
    return names


def _modules_of(model, names):
    modules = []
    for name in names:
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if leaf != "weight" or not _supported(module):
            raise ValueError(f"gradient tracking supports the weights of nn.Linear, nn.Conv2d, "
                             f"BatchNorm and nn.LayerNorm modules; {name} belongs to "
                             f"{type(module).__name__}{'' if owner else ' (the model itself)'}")
        modules.append((owner, module))
    return modules


def _supported(module):
    if type(module) in (nn.Conv2d, nn.Linear, nn.LayerNorm):
        return True
    # a BatchNorm whose forward is the plain one (not timm's BatchNormAct2d)
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and \
        type(module).forward is nn.modules.batchnorm._BatchNorm.forward


def _conv_sq_norms(module, a, g, patches_cache, mask=None):
    """(N,) squared Frobenius norms of the per-sample weight gradients of a Conv2d (times
    ``mask``, the weight's shape, when given)."""
    key = id(module)
    if key not in patches_cache:
        u = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)  # (N, P, L)
        n, p, length = u.shape
        c_out = module.out_channels
        if mask is not None or module.groups != 1 or c_out * p <= length * length:
            patches_cache[key] = ("direct", u)
        else:
            patches_cache[key] = ("gram", torch.bmm(u.transpose(1, 2).double(), u.double()))
    mode, u = patches_cache[key]
    gm = g.flatten(2)                                       # (N, C_out, L)
    if module.groups != 1:
        return _grouped_sq_norms(module, u, gm, mask)
    if mask is not None:
        per_sample = torch.bmm(gm, u.transpose(1, 2)) * mask.reshape(mask.shape[0], -1)
        return per_sample.pow(2).sum(dim=(1, 2)).double()
    if mode == "direct":
        return torch.bmm(gm, u.transpose(1, 2)).pow(2).sum(dim=(1, 2)).double()
    gram_g = torch.bmm(gm.transpose(1, 2).double(), gm.double())
    return (gram_g * u).sum(dim=(1, 2))


def _grouped_sq_norms(module, u, gm, mask=None):
    """(N,) squared norms of a grouped convolution's per-sample weight gradients: u (N,
    C_in k k, L) patches, gm (N, C_out, L) output gradients; per group g the block
    (C_out / G, C_in / G k k) is G_g U_g^T."""
    groups = module.groups
    n, p, length = u.shape
    ug = u.reshape(n, groups, p // groups, length)
    gg = gm.reshape(n, groups, gm.shape[1] // groups, length)
    per_sample = torch.einsum("ngcl,ngpl->ngcp", gg, ug)
    if mask is not None:
        per_sample = per_sample * mask.reshape(groups, gm.shape[1] // groups, p // groups)
    return per_sample.pow(2).sum(dim=(1, 2, 3)).double()


def per_sample_grad_norms(model, x, names):
    """L2 norms (N, K, P) float32 of the weight gradients of ``names`` for every sample of
    ``x`` (N, C, H, W) and every class k as the cross-entropy label.

    model: eval mode, on x's device; parameters may be frozen (nothing is changed on it).
    names: from ``tracked_parameters``.
    """
    modules = _modules_of(model, names)
    masks = {owner: getattr(model, mask_name(f"{owner}.weight"), None) for owner, _ in modules}
    inputs, outputs = {}, {}

    def hook(owner):
        # the rest of the network gets a copy, so an in-place op after the module (a ReLU)
        # changes neither the input kept nor the output the gradient is taken w.r.t.
        def record(module, args, output):
            inputs[owner] = args[0].detach().clone()
            outputs[owner] = output
            return output.clone()
        return record

    handles = [m.register_forward_hook(hook(owner)) for owner, m in modules]
    try:
        with torch.enable_grad():
            logits = model(x.detach().requires_grad_(True))
    finally:
        for h in handles:
            h.remove()
    k_classes = logits.shape[1]
    targets = [outputs[owner] for owner, _ in modules]
    out = torch.empty(x.shape[0], k_classes, len(modules), dtype=torch.float32, device=x.device)
    cache = {}
    for k in range(k_classes):
        label = torch.full((x.shape[0],), k, dtype=torch.long, device=x.device)
        loss = F.cross_entropy(logits, label, reduction="sum")
        grads = torch.autograd.grad(loss, targets, retain_graph=k < k_classes - 1)
        for j, ((owner, module), g) in enumerate(zip(modules, grads)):
            a = inputs[owner]
            mask = masks[owner]
            if isinstance(module, nn.Linear) and a.dim() > 2:
                dw = torch.einsum("ntc,ntd->ncd", g.flatten(1, -2), a.flatten(1, -2))
                sq = (dw if mask is None else dw * mask).double().pow(2).sum(dim=(1, 2))
            elif isinstance(module, nn.Linear) and mask is not None:
                sq = ((g.double().pow(2) @ mask.double()) * a.double().pow(2)).sum(1)
            elif isinstance(module, nn.Linear):
                sq = g.flatten(1).double().pow(2).sum(1) * a.flatten(1).double().pow(2).sum(1)
            elif isinstance(module, nn.LayerNorm):
                axes = tuple(range(a.dim() - len(module.normalized_shape), a.dim()))
                ad = a.double()
                mean = ad.mean(dim=axes, keepdim=True)
                var = ad.var(dim=axes, keepdim=True, unbiased=False)
                x_hat = (ad - mean) / torch.sqrt(var + module.eps)
                lead = tuple(range(1, a.dim() - len(module.normalized_shape)))
                dgamma = (g.double() * x_hat).sum(dim=lead) if lead else g.double() * x_hat
                sq = dgamma.flatten(1).pow(2).sum(1)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                shape = (1, -1) + (1,) * (a.dim() - 2)
                x_hat = (a.double() - module.running_mean.double().view(shape)) / torch.sqrt(
                    module.running_var.double().view(shape) + module.eps)
                sq = (g.double() * x_hat).sum(dim=tuple(range(2, a.dim()))).pow(2).sum(1)
            else:
                sq = _conv_sq_norms(module, a, g, cache, mask)
            out[:, k, j] = sq.clamp_min(0).sqrt().float()
    return out
