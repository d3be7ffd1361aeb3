"""Multi-layer Mahalanobis with input preprocessing, recorded at extraction.

The procedure of Lee et al. (2018) as the GradNorm release runs it
(``tune_mahalanobis_hyperparameter.py`` with ``utils/mahalanobis_lib.py``). For each
layer l of the ``nac`` hook set (the stage outputs), with f_l(x) (N, C_l) the spatial mean
of the layer's output, and class means mu_{l,c} and a shared precision P_l fitted on the
ID training cache (``analyze.feature_scores.fit_layer_gaussians``):

1. g_{l,c}(x) = -0.5 (f_l(x) - mu_{l,c}) P_l (f_l(x) - mu_{l,c})^T, one class at a time;
   c* = argmax_c g_{l,c}(x).
2. loss = mean over the batch of -g_{l,c*}(x); s = +1 where d loss / dx >= 0, else -1
   (their ``torch.ge``); x' = x - eps * s.
3. score_{l,eps}(x) = max_c g_{l,c}(x').

``layer_scores`` returns the (N, M, L) array of score_{l,eps} for M magnitudes eps; per
layer one backward pass gives the sign, and the copies of all magnitudes go through one
partial forward pass (batched: float32 rounding may differ from one pass per magnitude
at 1e-7 relative). The
logistic-regression combination over layers and the choice of eps need validation data
and happen in analysis (``analyze.maha_ensemble``). As pseudo-OOD validation data the
release perturbs ID images towards higher cross-entropy at their label,
x_adv = clamp(x + 0.05 * sign(d CE / dx), 0, 1) (``adv_noise = 0.05``; the clamp is applied
to the normalised input, as in the release); ``adversarial_images`` makes them.
"""
import numpy as np
import torch

from .adapters.trace import canonical

# The magnitudes the GradNorm release tries, in its order (the first best one wins).
RELEASE_MAGNITUDES = (0.0, 0.01, 0.005, 0.002, 0.0014, 0.001, 0.0005)
ADV_NOISE = 0.05


class _Stop(Exception):
    """Raised by a forward hook to end the forward pass after the layer of interest."""


def _spatial_means(model, x, layers, stop_at=None, layouts=None):
    """``{layer: (N, C) spatial means of its output}`` (over H x W or the tokens, by
    ``layouts``, ``{layer: layout}``); the forward ends after ``stop_at``."""
    layouts = layouts or {}
    modules = dict(model.named_modules())
    feats = {}

    def hook(name):
        def record(module, inputs, output):
            feats[name] = canonical(output, layouts.get(name)).flatten(2).mean(2) if output.dim() > 2 else output
            if name == stop_at:
                raise _Stop
        return record

    handles = [modules[l].register_forward_hook(hook(l)) for l in layers]
    try:
        model(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return feats


def _gaussian_scores(f, means, precision):
    """(N, K): -0.5 * squared Mahalanobis distance of each row of ``f`` to each class mean."""
    cols = []
    for mu in means:
        d = f - mu
        cols.append(-0.5 * ((d @ precision) * d).sum(dim=1))
    return torch.stack(cols, dim=1)


class LayerGaussians:
    """Class means and shared precisions per layer, as torch tensors on ``device``.

    fitted: ``{"layers": (L,) str array, "means_<i>": (K, C_i), "precision_<i>": (C_i, C_i)}``
    (``analyze.feature_scores.fit_layer_gaussians``).
    """

    def __init__(self, fitted, device):
        self.layers = [str(l) for l in fitted["layers"]]
        self.means = [torch.as_tensor(np.asarray(fitted[f"means_{i}"], np.float32), device=device)
                      for i in range(len(self.layers))]
        self.precisions = [torch.as_tensor(np.asarray(fitted[f"precision_{i}"], np.float32), device=device)
                           for i in range(len(self.layers))]


def layer_scores(model, x, gaussians, magnitudes, layouts=None):
    """(N, M, L) float32 tensor: score_{l,eps} for each magnitude (M) and layer (L).

    x: (N, C, H, W) preprocessed images. gaussians: ``LayerGaussians``. layouts:
    ``{layer: layout}`` of the layers (default channels first).
    """
    layers = gaussians.layers
    x = x.detach().clone().requires_grad_(True)
    out = torch.empty(len(x), len(magnitudes), len(layers), device=x.device)
    with torch.enable_grad():
        feats = _spatial_means(model, x, layers, stop_at=layers[-1], layouts=layouts)
        for i, layer in enumerate(layers):
            mu, prec = gaussians.means[i], gaussians.precisions[i]
            f = feats[layer]
            g = _gaussian_scores(f.detach(), mu, prec)
            best = g.argmax(dim=1)
            d = f - mu[best]
            loss = (0.5 * ((d @ prec) * d).sum(dim=1)).mean()
            (grad,) = torch.autograd.grad(loss, x, retain_graph=i < len(layers) - 1)
            sign = (grad >= 0).to(x.dtype) * 2 - 1
            moved = [(j, eps) for j, eps in enumerate(magnitudes) if eps != 0]
            for j, eps in enumerate(magnitudes):
                if eps == 0:
                    out[:, j, i] = g.max(dim=1).values
            if moved:
                # every magnitude's perturbed copy in one partial forward pass
                with torch.no_grad():
                    copies = torch.cat([x.detach() - eps * sign for _, eps in moved])
                    noisy = _spatial_means(model, copies, [layer], stop_at=layer, layouts=layouts)[layer]
                    best = _gaussian_scores(noisy, mu, prec).max(dim=1).values.view(len(moved), len(x))
                for k, (j, _) in enumerate(moved):
                    out[:, j, i] = best[k]
    return out


def adversarial_images(model, x, labels, noise=ADV_NOISE):
    """The release's pseudo-OOD copies of ``x``: clamp(x + noise * s, 0, 1), s = sign of
    d CE(model(x), labels) / dx with ``>= 0`` counted as +1. labels: (N,) int64; rows
    with a negative label (unlabelled) use the predicted class."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        z = model(x)
        target = torch.where(labels >= 0, labels.to(z.device), z.argmax(dim=1))
        loss = torch.nn.functional.cross_entropy(z, target)
        (grad,) = torch.autograd.grad(loss, x)
    sign = (grad >= 0).to(x.dtype) * 2 - 1
    return torch.clamp(x.detach() + noise * sign, 0.0, 1.0)
