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


def head_of(model):
    """The head as the authors' code names it (``head_name`` of the zoo's layouts), else
    the last ``nn.Linear`` in module order (torchvision's and timm's classifiers), else the
    last ``nn.Conv2d`` (a 1x1 conv head: timm's BiT ``head.fc``)."""
    if hasattr(model, "head_name"):
        return model.get_submodule(model.head_name)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return linear[-1] if linear else [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]


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
    if kind == "ResNetV2" and hasattr(model, "before_head"):      # the release's layout, not timm's ResNetV2
        feat = model.before_head(model.body(model.root(x)))
        return model.head(feat)[..., 0, 0], feat
    # Architectures the GAIA release does not ship (OpenOOD, torchvision): the plain forward,
    # with the head input taken where the head receives it.
    captured = {}
    handle = head_of(model).register_forward_pre_hook(
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
    return (-value).cpu().numpy(), [c.cpu().numpy() for c in counts]


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
    return (-(inner / out).pow(2).mean(dim=1)).detach().cpu().numpy()


def gradnorm(model, x, temperature=1.0):
    """GradNorm at batch size 1: L1 norm of the head weight's gradient."""
    m = _fresh(model)
    head = head_of(m)
    scores = []
    for i in range(len(x)):
        inp = x[i:i + 1].clone().requires_grad_(True)
        m.zero_grad()
        y, _ = authors_forward(m, inp)
        k = y.shape[1]
        loss = torch.mean(torch.sum(-torch.ones(1, k, device=y.device) * torch.log_softmax(y / temperature, dim=-1), dim=-1))
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


# --------------------------------------------------------------------------- baselines
def _head(model):
    return head_of(model)


def penultimate(model, images):
    """(features, logits) float32 tensors: the head's input vector and the model output."""
    captured = {}
    h = _head(model).register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
    with torch.no_grad():
        z = model(images)
    h.remove()
    return captured["x"].flatten(1).clone(), z


def penultimate_map(model, images, module):
    """Output (N, C, H, W) of ``module`` (the map global average pooling reads)."""
    captured = {}
    h = model.get_submodule(module).register_forward_hook(lambda m, a, o: captured.__setitem__("o", o.clone()))
    with torch.no_grad():
        model(images)
    h.remove()
    return captured["o"]


def ash(x, percentile, variant):
    """ASH-S / ASH-B / ASH-P on (N, C, H, W) maps, as the ASH release defines them: keep the
    k = n - round(n * p / 100) largest entries (torch.topk); ASH-B fills them with s1 / k;
    ASH-S multiplies the pruned map by exp(s1 / s2)."""
    b, c, h, w = x.shape
    n = c * h * w
    k = n - int(np.round(n * percentile / 100.0))
    s1 = x.sum(dim=[1, 2, 3])
    t = x.reshape(b, n)
    v, i = torch.topk(t, k, dim=1)
    if variant == "ash_b":
        v = torch.ones_like(v) * (s1 / k)[:, None]
    t = torch.zeros_like(t).scatter_(1, i, v)
    out = t.reshape(b, c, h, w)
    if variant == "ash_s":
        out = out * torch.exp(s1 / out.sum(dim=[1, 2, 3]))[:, None, None, None]
    return out


def odin(model, images, temperature, epsilon, std=None):
    """GradNorm release ``iterate_data_odin`` on one batch: MSP at T of the perturbed input.

    std: per-channel normalisation std; given, the sign gradient is divided by it before
    the step, as the original ODIN code (``calData.py``) and OpenOOD's postprocessor do."""
    x = images.clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(x)
        labels = out.detach().argmax(1)
        loss = torch.nn.CrossEntropyLoss()(out / temperature, labels)
        loss.backward()
    gradient = (torch.ge(x.grad.data, 0).float() - 0.5) * 2
    if std is not None:
        for c in range(gradient.shape[1]):
            gradient[:, c] = gradient[:, c] / std[c]
    with torch.no_grad():
        out = torch.add(x.data, gradient, alpha=-epsilon) if std is not None else x.data - epsilon * gradient
        out = model(out) / temperature
    out = out.numpy().astype(np.float64)
    out = out - out.max(axis=1, keepdims=True)
    p = np.exp(out) / np.exp(out).sum(axis=1, keepdims=True)
    return p.max(axis=1)


def _nac_thresholds(M):
    """The NAC release's ``logspace(1e3, M)`` grid."""
    half = int(M / 2)
    x = np.linspace(1, np.sqrt(1e3), num=half)
    x_l = np.emath.logn(1e3, x)
    x = np.concatenate([x_l[:-1], (1 - x_l)[::-1]])
    x[-1] += 1e-2
    return torch.from_numpy(np.append(x, 1.2))


def _nac_states(model, images, layers, hyper):
    """{layer: (N, C) float32 states sigmoid(alpha * sum_hw(o) * sum_hw(g))} as NAC computes them:
    retained module outputs (``avgpool`` = the head's input vector), ``kl_grad`` of
    sum_n sum_k -(1/K) log_softmax(z), spatial SUM pooling, sigmoid with steepness alpha."""
    retained = {}
    handles = [_head(model).register_forward_pre_hook(lambda m, a: retained.__setitem__("avgpool", a[0]))]
    for l in layers:
        if l != "avgpool":
            handles.append(model.get_submodule(l).register_forward_hook(
                lambda m, a, o, l=l: retained.__setitem__(l, o)))
    x = images.clone().requires_grad_(True)   # weights are frozen: give the graph a leaf
    with torch.enable_grad():
        p = model(x)
        k = p.shape[-1]
        out = {}
        for j, l in enumerate(layers):
            loss = torch.sum(-(torch.ones_like(p) / k) * torch.log_softmax(p, dim=-1), dim=-1)
            g = torch.autograd.grad(loss.sum(), retained[l], retain_graph=j < len(layers) - 1)[0]
            o = retained[l].detach()
            if o.dim() > 2:
                o, g = o.sum(dim=[2, 3]), g.sum(dim=[2, 3])
            M, O, alpha = hyper[l]
            out[l] = 1 / (1 + torch.exp(-alpha * (o * g)))
    for h in handles:
        h.remove()
    return out


def nac(model, train, test, layers, hyper):
    """NAC-UE scores of ``test`` with coverage built on ``train`` (KMNC / Estimator semantics)."""
    train_states = _nac_states(model, train, layers, hyper)
    test_states = _nac_states(model, test, layers, hyper)
    scores = torch.zeros(len(test), dtype=torch.float64)
    for l in layers:
        M, O, _ = hyper[l]
        thresh = _nac_thresholds(M).view(M, -1)
        def buckets(s):
            s = s.unsqueeze(1)
            return (s >= thresh[:M - 1].unsqueeze(0)) & (s < thresh[1:M].unsqueeze(0))
        t_act = buckets(train_states[l]).sum(dim=0).double()            # (M-1, C)
        coverage = torch.minimum(t_act / O, torch.ones_like(t_act))
        per = (buckets(test_states[l]) * coverage.unsqueeze(0)).sum(dim=1)  # (N, C)
        scores += per.mean(dim=1) / len(layers)
    return scores.numpy()


# ------------------------------------------------------------ multi-layer Mahalanobis
# Lee et al. as the GradNorm release runs it (``utils/mahalanobis_lib.py``: sample_estimator,
# get_Mahalanobis_score; ``tune_mahalanobis_hyperparameter.py``: the FGSM pseudo-OOD data).
def _stage_means(model, x, layers):
    """Spatial means of the stage outputs, one full forward pass (no early stop)."""
    modules = dict(model.named_modules())
    feats = {}
    handles = [modules[l].register_forward_hook(
        lambda m, i, o, name=l: feats.__setitem__(name, o.view(o.size(0), o.size(1), -1).mean(2)))
        for l in layers]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return [feats[l] for l in layers]


def maha_sample_estimator(model, images, labels, layers, num_classes):
    """Per layer: class means (K, C) float32 and the precision of sklearn's
    EmpiricalCovariance(assume_centered=False) fitted on the class-centred features."""
    import sklearn.covariance
    with torch.no_grad():
        feats = _stage_means(model, images, layers)
    means, precisions = [], []
    for f in feats:
        mu = torch.stack([f[labels == c].mean(0) for c in range(num_classes)])
        centred = (f - mu[labels]).numpy().astype(np.float64)
        est = sklearn.covariance.EmpiricalCovariance(assume_centered=False).fit(centred)
        means.append(mu)
        precisions.append(torch.from_numpy(est.precision_).float())
    return means, precisions


def maha_layer_scores(model, x, layers, means, precisions, magnitude):
    """(N, L): for each layer separately, as their loop: Gaussian scores per class, the
    closest class, the input step against the sign of the gradient, the best class score
    of the perturbed input."""
    out = []
    for i, layer in enumerate(layers):
        data = x.clone().requires_grad_(True)
        f = _stage_means(model, data, [layer])[0]
        gauss = torch.stack([-0.5 * torch.mm(torch.mm(f.detach() - means[i][c], precisions[i]),
                                             (f.detach() - means[i][c]).t()).diag()
                             for c in range(len(means[i]))], dim=1)
        pred = gauss.max(1)[1]
        zero_f = f - means[i].index_select(0, pred)
        pure = -0.5 * torch.mm(torch.mm(zero_f, precisions[i]), zero_f.t()).diag()
        torch.mean(-pure).backward()
        step = (torch.ge(data.grad, 0).float() - 0.5) * 2
        with torch.no_grad():
            g = _stage_means(model, data.detach() - magnitude * step, [layer])[0]
            noisy = torch.stack([-0.5 * torch.mm(torch.mm(g - means[i][c], precisions[i]),
                                                 (g - means[i][c]).t()).diag()
                                 for c in range(len(means[i]))], dim=1)
        out.append(noisy.max(1)[0])
    return torch.stack(out, dim=1).numpy()


def maha_adversarial(model, x, labels, noise=0.05):
    """The release's pseudo-OOD data: x + 0.05 * sign(dCE/dx) at the label, clamped to [0, 1]."""
    inputs = x.clone().requires_grad_(True)
    F.cross_entropy(model(inputs), labels).backward()
    step = (torch.ge(inputs.grad, 0).float() - 0.5) * 2
    return torch.clamp(inputs.detach() + noise * step, 0.0, 1.0)
