"""Independent re-implementations of the authors' score procedures, for the tests only.

Written from the facts in METHODS.md and the authors' code: tensor hooks registered on
module outputs by forward hooks (GAIA ``hook.py``), their forward passes (the head input
``before_head_data``), GAIA ``cal_zero`` / ``cal_grad_value``, GradNorm at batch size 1
(``iterate_data_gradnorm``), and both metric codes as loops.
"""
import copy

import numpy as np
import torch
import torch.nn.functional as F


class OutputGradHook:
    """Forward hook that registers a tensor hook on the output, keeping the last grad."""

    def __init__(self, module):
        self.data = None
        self.handle = module.register_forward_hook(self._fwd)

    def _fwd(self, module, inp, out):
        def keep(grad):
            self.data = grad.detach()
        out.register_hook(keep)

    def close(self):
        self.handle.remove()


def authors_forward(model, x):
    """Logits and ``before_head_data`` as the authors' forward computes them."""
    kind = type(model).__name__
    if kind == "CifarResNet":
        out = F.relu(model.bn1(model.conv1(x)))
        out = model.layer4(model.layer3(model.layer2(model.layer1(out))))
        feat = F.avg_pool2d(out, 4).view(out.size(0), -1)
        return model.linear(feat), feat
    if kind == "WideResNet":
        out = model.block3(model.block2(model.block1(model.conv1(x))))
        out = model.AdaptAvgPool(model.relu(model.bn1(out)))
        feat = out.view(-1, model.nChannels)
        return model.fc(feat), feat
    if kind == "ResNetV2":
        feat = model.before_head(model.body(model.root(x)))
        return model.head(feat)[..., 0, 0], feat
    # Architectures the GAIA release does not ship (OpenOOD, torchvision): the plain forward,
    # with the head input taken where the head receives it.
    captured = {}
    handle = model.get_submodule(model.head_name).register_forward_pre_hook(
        lambda m, a: captured.__setitem__("x", a[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, captured["x"]


def _fresh(model):
    m = copy.deepcopy(model).eval()
    m.requires_grad_(True)
    return m


def gaia_z(model, x, module_names):
    """-(mean over channels of all hooked modules of (fraction of non-zero grads)^2)."""
    m = _fresh(model)
    hooks = [OutputGradHook(m.get_submodule(n)) for n in module_names]
    m.zero_grad()
    y, _ = authors_forward(m, x)
    y.max(dim=1).values.sum().backward()
    fractions = [(h.data != 0).float().mean(dim=(-1, -2)) for h in hooks]
    counts = [(h.data != 0).sum(dim=(-1, -2)) for h in hooks]
    for h in hooks:
        h.close()
    value = torch.cat(fractions, dim=1).pow(2).mean(dim=-1)
    return (-value).numpy(), [c.numpy() for c in counts]


def gaia_a(model, x, module_names):
    """GAIA's cal_grad_value, negated: two backward passes on one forward."""
    m = _fresh(model)
    hooks = [OutputGradHook(m.get_submodule(n)) for n in module_names]
    m.zero_grad()
    y, feat = authors_forward(m, x)
    torch.log_softmax(y, dim=-1).sum().backward(retain_graph=True)
    last = hooks[-1].data.mean(dim=(-1, -2))
    out = torch.sqrt(torch.abs(last).mean(dim=1)).unsqueeze(1)
    feat.sum().backward()
    inner = torch.abs(torch.cat([h.data.mean(dim=(-1, -2)) for h in hooks[:-1]], dim=1))
    for h in hooks:
        h.close()
    return (-(inner / out).pow(2).mean(dim=1)).detach().numpy()


def gradnorm(model, x, temperature=1.0):
    """GradNorm at batch size 1: L1 norm of the head weight's gradient."""
    m = _fresh(model)
    head = m.get_submodule(m.head_name)
    scores = []
    for i in range(len(x)):
        inp = x[i:i + 1].clone().requires_grad_(True)
        m.zero_grad()
        y, _ = authors_forward(m, inp)
        k = y.shape[1]
        loss = torch.mean(torch.sum(-torch.ones(1, k) * torch.log_softmax(y / temperature, dim=-1), dim=-1))
        loss.backward()
        scores.append(head.weight.grad.abs().sum().item())
    return np.array(scores)


def gaia_metrics(known, novel):
    """GAIA metrics.py cal_metric/get_curve as straight loops."""
    known, novel = np.sort(np.array(known, float)), np.sort(np.array(novel, float))
    allv = np.sort(np.concatenate([known, novel]))
    nk, nn = len(known), len(novel)
    threshold = known[round(0.05 * nk)]
    tp = -np.ones(nk + nn + 1, dtype=int)
    fp = -np.ones(nk + nn + 1, dtype=int)
    tp[0], fp[0] = nk, nn
    k = n = 0
    for l in range(nk + nn):
        if k == nk:
            tp[l + 1:] = tp[l]
            fp[l + 1:] = np.arange(fp[l] - 1, -1, -1)
            break
        if n == nn:
            tp[l + 1:] = np.arange(tp[l] - 1, -1, -1)
            fp[l + 1:] = fp[l]
            break
        if novel[n] < known[k]:
            n += 1
            tp[l + 1], fp[l + 1] = tp[l], fp[l] - 1
        else:
            k += 1
            tp[l + 1], fp[l + 1] = tp[l] - 1, fp[l]
    j = nk + nn - 1
    for _ in range(nk + nn - 1):
        if allv[j] == allv[j - 1]:
            tp[j], fp[j] = tp[j + 1], fp[j + 1]
        j -= 1
    res = {"FPR95": np.sum(novel > threshold) / nn}
    tpr = np.concatenate([[1.], tp / tp[0], [0.]])
    fpr = np.concatenate([[1.], fp / fp[0], [0.]])
    res["AUROC"] = -np.trapezoid(1. - fpr, tpr)
    res["DetErr"] = ((tp[0] - tp + fp) / (tp[0] + fp[0])).min()
    denom = (tp + fp).astype(float)
    denom[denom == 0.] = -1.
    ind = np.concatenate([[True], denom > 0., [True]])
    pin = np.concatenate([[.5], tp / denom, [0.]])
    res["AUPR-In"] = -np.trapezoid(pin[ind], tpr[ind])
    denom = (tp[0] - tp + fp[0] - fp).astype(float)
    denom[denom == 0.] = -1.
    ind = np.concatenate([[True], denom > 0., [True]])
    pout = np.concatenate([[0.], (fp[0] - fp) / denom, [.5]])
    res["AUPR-Out"] = np.trapezoid(pout[ind], 1. - fpr[ind])
    return res


def gradnorm_fpr95(known, novel, recall_level=0.95):
    """GradNorm's fpr_and_fdr_at_recall, written out."""
    y_true = np.concatenate([np.ones(len(known)), np.zeros(len(novel))]) == 1
    y_score = np.concatenate([known, novel]).astype(float)
    desc = np.argsort(y_score, kind="mergesort")[::-1]
    y_score, y_true = y_score[desc], y_true[desc]
    distinct = np.where(np.diff(y_score))[0]
    idx = np.r_[distinct, y_true.size - 1]
    tps = np.cumsum(y_true)[idx]
    fps = 1 + idx - tps
    recall = tps / tps[-1]
    last = tps.searchsorted(tps[-1])
    sl = slice(last, None, -1)
    recall, fps = np.r_[recall[sl], 1], np.r_[fps[sl], 0]
    cutoff = np.argmin(np.abs(recall - recall_level))
    return fps[cutoff] / np.sum(~y_true)


def gaia_bn_modules(model, bit=False):
    """GAIA get_bn_hooks: every BatchNorm2d, or BiT's GroupNorms inside body.block4."""
    if bit:
        root = model.body.block4
        return ["body.block4." + n for n, m in root.named_modules() if isinstance(m, torch.nn.GroupNorm)]
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]


def gaia_before_head_modules(model, kind, textures_gn=False):
    """GAIA get_beforehead_hooks for resnet / wrn_40_2 / BiT-S-R101x1."""
    if kind == "resnet":
        names = [f"layer3.{n}" for n, m in model.layer3.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
        names += [f"layer4.{n}" for n, m in model.layer4.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
        return names + ["layer4"]
    if kind == "wrn":
        return [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)] + ["AdaptAvgPool"]
    return gaia_bn_modules(model, bit=True) + ["before_head.gn" if textures_gn else "before_head"]
