"""Per-sample weight-gradient norms for gradient tracking (repository gengandrew/Open_OOD).

For each sample n and each class k used as the cross-entropy label, the L2 norm of the
gradient of every tracked weight tensor. The release loops over samples at batch size 1;
here one forward pass and K backward passes per batch give the same numbers exactly:
in eval mode samples do not interact, so the gradient of ``sum_n CE(z_n, k)`` w.r.t. a
module output holds every sample's own output gradient, and per-sample weight gradients
factorise through the module input:

* ``nn.Linear``: dW_n = g_n a_n^T, so ||dW_n|| = ||g_n|| ||a_n||.
* ``nn.Conv2d`` (groups 1): dW_n = G_n U_n^T with U_n the unfolded input patches
  (C_in k k, L) and G_n the output gradient (C_out, L); ||dW_n||^2 is computed either
  directly (batched matrix product) or as sum((G_n^T G_n) * (U_n^T U_n)) over L x L,
  whichever holds fewer numbers.
* ``nn.BatchNorm2d`` weight (eval mode): dgamma_n,c = sum over H x W of g * x_hat with
  x_hat the input normalised by the running statistics. The release's name rule (no
  'bn', no 'bias') keeps the weights of norm layers whose names lack 'bn', such as a
  CIFAR ResNet's ``shortcut.1`` or torchvision's ``downsample.1``; so do we.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

def tracked_parameters(model):
    """Names (``named_parameters`` order) of the tracked tensors, by the release's rule:
    every parameter whose name contains neither 'bn' nor 'bias'."""
    return [n for n, _ in model.named_parameters() if "bias" not in n and "bn" not in n]


def _modules_of(model, names):
    modules = []
    for name in names:
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if leaf != "weight" or type(module) not in (nn.Conv2d, nn.Linear, nn.BatchNorm2d):
            raise ValueError(f"gradient tracking supports the weights of plain nn.Conv2d, "
                             f"nn.Linear and nn.BatchNorm2d modules; {name} belongs to "
                             f"{type(module).__name__}")
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise ValueError(f"gradient tracking: grouped convolution {owner} is not supported")
        modules.append((owner, module))
    return modules


def _conv_sq_norms(module, a, g, patches_cache):
    """(N,) squared Frobenius norms of the per-sample weight gradients of a Conv2d."""
    key = id(module)
    if key not in patches_cache:
        u = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)  # (N, P, L)
        n, p, length = u.shape
        c_out = module.out_channels
        if c_out * p <= length * length:
            patches_cache[key] = ("direct", u)
        else:
            patches_cache[key] = ("gram", torch.bmm(u.transpose(1, 2).double(), u.double()))
    mode, u = patches_cache[key]
    gm = g.flatten(2)                                       # (N, C_out, L)
    if mode == "direct":
        return torch.bmm(gm, u.transpose(1, 2)).pow(2).sum(dim=(1, 2)).double()
    gram_g = torch.bmm(gm.transpose(1, 2).double(), gm.double())
    return (gram_g * u).sum(dim=(1, 2))


def per_sample_grad_norms(model, x, names):
    """L2 norms (N, K, P) float32 of the weight gradients of ``names`` for every sample of
    ``x`` (N, C, H, W) and every class k as the cross-entropy label.

    model: eval mode, on x's device; parameters may be frozen (nothing is changed on it).
    names: from ``tracked_parameters``.
    """
    modules = _modules_of(model, names)
    inputs, outputs = {}, {}

    def hook(owner):
        def record(module, args, output):
            inputs[owner] = args[0].detach()
            outputs[owner] = output
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
            if isinstance(module, nn.Linear):
                sq = g.flatten(1).double().pow(2).sum(1) * a.flatten(1).double().pow(2).sum(1)
            elif isinstance(module, nn.BatchNorm2d):
                x_hat = (a.double() - module.running_mean.double()[:, None, None]) / torch.sqrt(
                    module.running_var.double()[:, None, None] + module.eps)
                sq = (g.double() * x_hat).sum(dim=(2, 3)).pow(2).sum(1)
            else:
                sq = _conv_sq_norms(module, a, g, cache)
            out[:, k, j] = sq.clamp_min(0).sqrt().float()
    return out
