"""The post-hoc detectors of the comparison table, from the cache, against direct
re-implementations of their official code (or, where none exists, their paper's
definition), written here independently: torch / scikit-learn / scipy, loops where the
release loops."""
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from sklearn.covariance import EmpiricalCovariance
from sklearn.decomposition import PCA
from sklearn.metrics import pairwise_distances_argmin_min
from sklearn.preprocessing import StandardScaler

from bench import authors_reference as ref
from gradood.extract.models import build_model
from bench.helpers import compute_score, extract_tensor, fit_score, randomize_norms, rel_err
from gradood.store.reader import CacheReader


@pytest.fixture(scope="session")
def wrn(tmp_path_factory):
    """WRN-40-2 (128 features, 10 classes): 300 labelled training images, 24 test images
    (half of them shifted), extracted with the last feature map (for RankFeat) and the
    block statistics MultiMahalanobis reads."""
    torch.manual_seed(0)
    model = randomize_norms(build_model("wrn_40_2", 10))
    g = torch.Generator().manual_seed(5)
    train = torch.randn(300, 3, 32, 32, generator=g)
    with torch.no_grad():          # a head whose predictions spread over the classes
        feats, _ = ref.penultimate(model, train)
        mean = feats.mean(0)
        _, _, v = torch.linalg.svd(feats - mean, full_matrices=False)
        pcs = v[:5] / (feats - mean).std()
        weight = torch.cat([pcs, -pcs]) * 3.0               # +/- the first five principal directions
        model.fc.weight.copy_(weight)
        model.fc.bias.copy_(-weight @ mean)
        logits = model.fc(feats)                 # the head on the same features: the model's output
        labels = logits.argmax(1)                # labels the model mostly gets right (SHE)
        labels[::7] = (labels[::7] + 1) % 10
    assert len(torch.unique(labels)) == 10 and min(torch.bincount(labels)) >= 5
    test = torch.cat([torch.randn(12, 3, 32, 32, generator=g), 2.5 * torch.randn(12, 3, 32, 32, generator=g)])
    d = tmp_path_factory.mktemp("posthoc")
    tr = extract_tensor(model, "wrn_40_2", train, str(d / "train.h5"), ["msp", "multimahalanobis"], batch_size=100,
                        labels=labels, name="train")
    te = extract_tensor(model, "wrn_40_2", test, str(d / "test.h5"), ["msp", "rankfeat", "multimahalanobis"],
                        batch_size=8)
    (xt, zt), (xq, zq) = (feats, logits), ref.penultimate(model, test)
    return model, (train, labels, test), (tr, te), (xt.double(), zt.double(), xq.double(), zq.double())


def ours(wrn, score, **params):
    _, _, (tr, te), _ = wrn
    with CacheReader(tr) as t, CacheReader(te) as r:
        from gradood.analyze.registry import entry
        fitted = fit_score(t, score, **params) if entry(score).fitted else None
        return compute_score(r, score, fitted, **params)


def head(model):
    return model.fc.weight.detach().double(), model.fc.bias.detach().double()


def check(got, expected, tol=1e-6):
    assert np.all(np.isfinite(got)) and np.ptp(got) > 0
    assert rel_err(got, np.asarray(expected, dtype=np.float64)) <= tol


def test_entropy(wrn):
    *_, (_, _, _, zq) = wrn
    p = torch.softmax(zq, 1)
    check(ours(wrn, "entropy"), (p * torch.log(p)).sum(1).numpy())


@pytest.mark.parametrize("gamma,M", [(0.1, 100), (0.5, 3), (2.0, 10)])
def test_gen_generalized_entropy(wrn, gamma, M):
    *_, (_, _, _, zq) = wrn
    probs = torch.sort(torch.softmax(zq, 1), dim=1).values[:, -M:]
    # the reference's logits come from one forward at batch size 300, the cache's at 8:
    # float32 kernels differ at 1e-7, and (1 - p)^0.5 near p = 1 magnifies that to ~2e-6
    check(ours(wrn, "gen", gamma=gamma, M=M), -(probs ** gamma * (1 - probs) ** gamma).sum(1).numpy(),
          tol=1e-5)


@pytest.mark.parametrize("p", [85.0, 65.0])
def test_scale_on_the_pooled_activation(wrn, p):
    model, _, _, (_, _, xq, _) = wrn
    w, b = head(model)
    x = xq[:, :, None, None].clone()
    n = x.shape[1]
    k = n - int(np.round(n * p / 100.0))
    s1 = x.sum(dim=[1, 2, 3])
    t = x.clone().view(x.shape[0], -1)
    v, i = torch.topk(t, k, dim=1)
    t.zero_().scatter_(1, i, v)
    s2 = t.sum(dim=1)
    scaled = (x * torch.exp(s1 / s2)[:, None, None, None]).flatten(1)
    check(ours(wrn, "scale", percentile=p), torch.logsumexp(scaled @ w.T + b, 1).numpy())


@pytest.mark.parametrize("p", [90.0, 70.0])
def test_dice_masks_the_head_by_contribution(wrn, p):
    model, _, _, (xt, _, xq, _) = wrn
    w, b = head(model)
    info = xt.numpy().mean(0)
    contrib = info[None, :] * w.numpy()
    mask = torch.from_numpy((contrib > np.percentile(contrib, p)).astype(np.float64))
    check(ours(wrn, "dice", p=p), torch.logsumexp(xq @ (w * mask).T + b, 1).numpy())


@pytest.mark.parametrize("distance", [True, False])
def test_fdbd_boundary_distances(wrn, distance):
    model, _, _, (xt, _, xq, zq) = wrn
    w, b = head(model)
    mean = xt.mean(0)
    k = w.shape[0]
    denom = torch.ones(k, k, dtype=torch.float64)
    for i in range(k):
        for j in range(k):
            if i != j:
                denom[i, j] = torch.norm(w[i] - w[j])
    expected = []
    for x, z in zip(xq, zq):
        c = int(z.argmax())
        total = sum(abs(float(z[j] - z[c])) / float(denom[c, j]) for j in range(k))
        expected.append(total / float(torch.norm(x - mean if distance else x)))
    check(ours(wrn, "fdbd", distance_as_normalizer=distance), expected)


def test_nnguide_energy_scaled_bank(wrn):
    _, _, _, (xt, zt, xq, zq) = wrn
    rows = np.sort(np.random.default_rng(0).choice(300, 10, replace=False))   # 1% but at least k = 10
    bank = F.normalize(xt[rows], dim=1) * torch.logsumexp(zt[rows], 1)[:, None]
    sims = F.normalize(xq, dim=1) @ bank.T
    guidance = torch.topk(sims, 10, dim=1).values.mean(1)
    check(ours(wrn, "nnguide"), (guidance * torch.logsumexp(zq, 1)).numpy())


def test_rmds_relative_mahalanobis(wrn):
    _, (_, labels, _), _, (xt, _, xq, _) = wrn
    xt, xq, y = xt.numpy(), xq.numpy(), labels.numpy()
    means = [xt[y == c].mean(0) for c in range(10)]
    prec = EmpiricalCovariance(assume_centered=False).fit(np.concatenate([xt[y == c] - means[c] for c in range(10)])).precision_
    mu0 = xt.mean(0)
    prec0 = EmpiricalCovariance(assume_centered=False).fit(xt - mu0).precision_
    md0 = np.einsum("nd,de,ne->n", xq - mu0, prec0, xq - mu0)
    expected = np.max([-(np.einsum("nd,de,ne->n", xq - m, prec, xq - m) - md0) for m in means], axis=0)
    check(ours(wrn, "rmds"), expected, tol=1e-5)


def test_klm_as_the_vim_release(wrn):
    _, _, _, (_, zt, _, zq) = wrn
    st, sq = torch.softmax(zt, 1).numpy(), torch.softmax(zq, 1).numpy()
    pred = st.argmax(1)
    templates = np.stack([st[pred == i].mean(0) if (pred == i).any() else np.eye(10)[i] for i in range(10)])

    def kl(p, q):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.sum(np.where(p != 0, p * np.log(p / q), 0))
    check(ours(wrn, "klm"), -pairwise_distances_argmin_min(sq, templates, metric=kl)[1], tol=1e-6)


@pytest.mark.parametrize("metric", ["inner_product", "euclidean", "cosine"])
def test_she_stored_patterns(wrn, metric):
    _, (_, labels, _), _, (xt, zt, xq, zq) = wrn
    right = zt.argmax(1) == labels
    patterns = torch.stack([xt[right & (labels == c)].mean(0) for c in range(10)])
    m = patterns[zq.argmax(1)]
    expected = {"inner_product": (xq * m).sum(1), "euclidean": -torch.sqrt(((xq - m) ** 2).sum(1)),
                "cosine": F.cosine_similarity(xq, m, dim=1)}[metric]
    check(ours(wrn, "she", metric=metric), expected.numpy())


@pytest.mark.parametrize("dim,use_max", [(100, False), (20, True)])
def test_neco_as_the_release(wrn, dim, use_max):
    _, _, _, (xt, _, xq, zq) = wrn
    scaler = StandardScaler()
    st = scaler.fit_transform(xt.numpy())
    pca = PCA(st.shape[1]).fit(st)
    sq = scaler.transform(xq.numpy())
    ratio = np.linalg.norm(pca.transform(sq)[:, :dim], axis=1) / np.linalg.norm(sq, axis=1)
    expected = ratio * zq.numpy().max(1) if use_max else ratio
    check(ours(wrn, "neco", dim=dim, use_max_logit=use_max), expected, tol=1e-5)
    # the release's rule: WRN is a ResNet, no max-logit factor by default
    np.testing.assert_allclose(ours(wrn, "neco", dim=dim), ratio, rtol=1e-5)


@pytest.mark.parametrize("pow_", [1.0, 2.0])
def test_relation_graph_kernel(wrn, pow_):
    _, _, _, (xt, zt, xq, zq) = wrn
    ft, fq = xt / xt.norm(dim=1, keepdim=True), xq / xq.norm(dim=1, keepdim=True)
    pt, pq = torch.softmax(zt, 1), torch.softmax(zq, 1)
    expected = []
    for i in range(len(fq)):
        r = torch.clamp(fq[i] @ ft.T, min=0) * (pq[i] @ pt.T)
        r = r * (r > 0.03)
        expected.append(float((torch.sign(r) * r.abs() ** pow_).sum()))
    check(ours(wrn, "relation", pow=pow_), expected)


def _head_grads(wrn, loss_fn):
    """Per-sample gradients (float64, batch size 1, autograd) of the head weight and bias for
    loss_fn(logits (1, K)), at the logits and features the cache holds (recomputing the
    logits with other batch shapes changes their float32 rounding, which near-uniform
    softmaxes amplify to 1e-5)."""
    _, _, (_, te), _ = wrn
    with CacheReader(te) as r:
        xs = torch.from_numpy(r.read_all("features").astype(np.float64))
        zs = torch.from_numpy(r.read_all("logits").astype(np.float64))
        w, b = (torch.from_numpy(a) for a in r.head())
    out = []
    for x, z0 in zip(xs, zs):
        weight = w.clone().requires_grad_(True)
        bias = b.clone().requires_grad_(True)
        z = x[None] @ weight.T + bias
        z = z + (z0[None] - z).detach()            # the cached logits, with the head's graph
        loss_fn(z).backward()
        out.append((weight.grad, bias.grad))
    return out


def test_gradnorm_kl_is_the_paper_kl_form(wrn):
    model, _, _, (_, _, xq, _) = wrn
    grads = _head_grads(wrn, lambda z: (-torch.log_softmax(z, 1) / z.shape[1]).sum())
    check(ours(wrn, "gradnorm_kl"), [float(gw.abs().sum()) for gw, _ in grads])
    np.testing.assert_allclose(ours(wrn, "gradnorm_kl") * 10, ours(wrn, "gradnorm"), rtol=1e-12)


def test_grad_uncertainty_bce_all_ones(wrn):
    """BCE(p, 1) = -log p exactly; written with log_softmax so no probability underflows
    (torch's binary_cross_entropy caps its derivative where p (1 - p) < 1e-12)."""
    model, _, _, (_, _, xq, _) = wrn
    grads = _head_grads(wrn, lambda z: -torch.log_softmax(z, 1).sum())
    check(ours(wrn, "grad_uncertainty"), [float((gw ** 2).sum() + (gb ** 2).sum()) for gw, gb in grads], tol=1e-5)


def test_gradorth_projected_gradient(wrn):
    model, _, _, (xt, _, xq, _) = wrn
    _, s, vt = np.linalg.svd(xt.numpy(), full_matrices=False)
    r = int(np.argmax(np.cumsum(s ** 2) / np.sum(s ** 2) >= 0.97)) + 1
    basis = torch.from_numpy(vt[:r].T)
    grads = _head_grads(wrn, lambda z: (-torch.log_softmax(z, 1) / z.shape[1]).sum())
    expected = [float(torch.linalg.norm(gw @ basis @ basis.T)) for gw, _ in grads]
    check(ours(wrn, "gradorth"), expected)


def test_residual_and_nusa(wrn):
    model, _, _, (xt, _, xq, _) = wrn
    w, b = (t.numpy() for t in head(model))
    u = -np.linalg.pinv(w) @ b
    cov = EmpiricalCovariance(assume_centered=True).fit(xt.numpy() - u).covariance_
    vals, vecs = np.linalg.eig(cov)
    ns = np.real(vecs.T[np.argsort(-np.real(vals))[64:]].T)
    check(ours(wrn, "residual"), -np.linalg.norm((xq.numpy() - u) @ ns, axis=1), tol=1e-5)
    null = scipy.linalg.null_space(w)
    x = xq.numpy()
    x_null = x @ null @ null.T
    check(ours(wrn, "nusa"), np.sqrt((x ** 2).sum(1) - (x_null ** 2).sum(1)) / np.linalg.norm(x, axis=1), tol=1e-6)


def test_temperature_scaling_minimises_the_nll(wrn):
    _, (_, labels, _), _, (_, zt, _, zq) = wrn
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(zt / log_t.exp(), labels)
        loss.backward()
        return loss
    opt.step(closure)
    t = float(log_t.detach().exp())
    _, _, (tr, _), _ = wrn
    with CacheReader(tr) as r:
        assert abs(float(fit_score(r, "tempscale").temperature_) - t) <= 1e-4 * t
    check(ours(wrn, "tempscale"), torch.softmax(zq / t, 1).max(1).values.numpy(), tol=1e-5)


def test_rankfeat_removes_the_rank_one_part(wrn):
    model, (_, _, test), _, _ = wrn
    w, b = head(model)
    with torch.no_grad():
        x = ref.penultimate_map(model, test, "relu").double()
        n, c, h, wd = x.shape
        m = x.view(n, c, h * wd)
        u, s, v = torch.linalg.svd(m, full_matrices=False)
        m = m - s[:, 0:1].unsqueeze(2) * u[:, :, 0:1].bmm(v[:, 0:1, :])
        pooled = m.mean(2)
    check(ours(wrn, "rankfeat"), torch.logsumexp(pooled @ w.T + b, 1).numpy(), tol=1e-6)


def test_mls_is_maxlogit():
    from gradood.analyze.registry import canonical
    assert canonical("mls") == "maxlogit"


def test_nci_neural_collapse_score(wrn):
    """OpenOOD's nci_postprocessor, per sample: the predicted class's (unnormalised) weight
    row against the centred feature, plus alpha times the L1 norm."""
    model, _, _, (xt, _, xq, zq) = wrn
    w, _ = head(model)
    mu = xt.mean(0)
    for alpha in (1e-4, 0.1):
        expected = []
        for x, z in zip(xq, zq):
            c = int(z.argmax())
            expected.append(float(torch.dot(w[c], x - mu) / torch.norm(x - mu) + alpha * x.abs().sum()))
        check(ours(wrn, "nci", alpha=alpha), expected)


def test_pnml_regret(tmp_path):
    """kobybibas/pnml_ood_detection: regret from the pseudo-inverse of the normalised
    training features' Gram matrix and the head's softmax of the normalised feature (on
    synthetic full-rank features: the random WRN's have dead channels, which pnml refuses)."""
    from gradood.store.synthetic import write_synthetic, world
    tr = write_synthetic(str(tmp_path / "t_train.h5"), 800, num_classes=7, dim=20, seed=1, split="train")
    te = write_synthetic(str(tmp_path / "t.h5"), 60, num_classes=7, dim=20, seed=2, novel=0.5)
    with CacheReader(tr) as r:
        xt = torch.from_numpy(r.read_all("features").astype(np.float64))
    with CacheReader(te) as r:
        xq = torch.from_numpy(r.read_all("features").astype(np.float64))
    _, w, b = world(7, 20)
    w, b = torch.from_numpy(w.astype(np.float64)), torch.from_numpy(b.astype(np.float64))
    xn = F.normalize(xt, dim=1)
    inv = torch.linalg.pinv(xn.T @ xn, rcond=1e-15)
    expected = []
    for x in xq:
        f = x / torch.norm(x)
        p = torch.softmax(f @ w.T + b, dim=0)
        xp = torch.abs(f @ inv @ f)
        g = xp / (1 + xp)
        nf = torch.sum(p / (p + (1 - p) * p ** g))
        expected.append(1.0 - float(torch.log(nf) / np.log(len(p))))
    with CacheReader(tr) as t, CacheReader(te) as r:
        got = compute_score(r, "pnml", fit_score(t, "pnml"))
    check(got, expected, tol=1e-9)


def test_pnml_refuses_a_singular_gram_matrix(wrn):
    _, _, (tr, _), _ = wrn
    from gradood.store.schema import CacheError
    with CacheReader(tr) as t, pytest.raises(CacheError, match="singular to float32 precision"):
        fit_score(t, "pnml")


def test_lts_scales_the_logits(wrn):
    """andrijazz/lts: lts(x, percentile) on the pooled feature (ReLU, then the top-k share),
    the logits of the unchanged feature times its square, energy."""
    _, _, _, (_, _, xq, zq) = wrn
    for p in (95.0, 80.0):
        a = torch.relu(xq)
        n = a.shape[1]
        k = n - int(np.round(n * p / 100))
        s = (a.sum(1) / a.topk(k, dim=1).values.sum(1))[:, None] ** 2
        check(ours(wrn, "lts", percentile=p), torch.logsumexp(zq * s, dim=1).numpy())


def test_multimahalanobis_sums_layer_distances(wrn):
    """pytorch-ood's MultiMahalanobis: per layer (block1-3 spatial means, the pooled
    feature) class means, summed class-centred scatter + 1e-6 I inverted, 0.5 min_c d^2;
    summed over layers (negated: higher = more ID)."""
    model, (train, labels, test), (tr, te), _ = wrn
    outputs = {}
    hooks = [getattr(model, b).register_forward_hook(lambda m, i, o, b=b: outputs.__setitem__(b, o.mean((2, 3))))
             for b in ("block1", "block2", "block3")]
    try:
        with torch.no_grad():
            feats = {}
            for name, x in (("train", train), ("test", test)):
                f, _ = ref.penultimate(model, x)
                feats[name] = [outputs[b].double() for b in ("block1", "block2", "block3")] + [f.double()]
    finally:
        for h in hooks:
            h.remove()
    expected = torch.zeros(len(test), dtype=torch.float64)
    for zt, zq in zip(feats["train"], feats["test"]):
        mus = torch.stack([zt[labels == k].mean(0) for k in range(10)])
        scatter = sum((zt[labels == k] - mus[k]).T @ (zt[labels == k] - mus[k]) for k in range(10))
        prec = torch.linalg.inv(scatter + 1e-6 * torch.eye(zt.shape[1], dtype=torch.float64))
        d = torch.stack([((zq - m) @ prec * (zq - m)).sum(1) for m in mus], dim=1)
        expected -= 0.5 * d.min(dim=1).values
    with CacheReader(tr) as t, CacheReader(te) as r:
        got = compute_score(r, "multimahalanobis", fit_score(t, "multimahalanobis"))
    check(got, expected.numpy(), tol=1e-6)


def test_openmax_recalibrated_unknown_probability(wrn):
    """OpenOOD's openmax_postprocessor: MAVs and Weibull tails (20 largest distances, shifted
    as libMR's fit_high) of the correct training rows' logits; alpha rank 3; minus the
    unknown class's probability. The Weibull fit is scipy's maximum likelihood (as here)."""
    from scipy.stats import weibull_min
    _, (_, labels, _), _, (_, zt, _, zq) = wrn
    zt, zq, y = zt.numpy(), zq.numpy(), labels.numpy()
    right = zt.argmax(1) == y
    models = []
    for c in range(10):
        rows = zt[right & (y == c)]
        mav = rows.mean(0)
        tail = np.sort(np.linalg.norm(rows - mav, axis=1))[-20:]
        shape, _, scale = weibull_min.fit(tail + 1 - tail.min(), floc=0)
        models.append((mav, tail.min(), shape, scale))
    expected = []
    for v in zq:
        ranked = np.argsort(v)[::-1][:3]
        omega = np.zeros(10)
        omega[ranked] = [1, 2 / 3, 1 / 3]
        w = np.array([0.0 if np.linalg.norm(v - m) + 1 - s < 0 else
                      1 - np.exp(-((np.linalg.norm(v - m) + 1 - s) / sc) ** sh) for m, s, sh, sc in models])
        revised, u = v * (1 - w * omega), np.sum(v * w * omega)
        expected.append(-np.exp(u) / (np.exp(revised).sum() + np.exp(u)))
    check(ours(wrn, "openmax"), expected, tol=1e-9)


def test_vra_clips_between_percentiles(wrn):
    """OpenOOD's vra_postprocessor: clip the features to the low/high percentiles of every
    fitting-set feature entry, energy of the head."""
    model, _, _, (xt, _, xq, _) = wrn
    w, b = head(model)
    for low, high in ((10.0, 90.0), (1.0, 99.0)):
        lo, hi = np.percentile(xt.numpy().ravel(), low), np.percentile(xt.numpy().ravel(), high)
        x = xq.clamp(min=float(lo), max=float(hi))
        check(ours(wrn, "vra", percentile_low=low, percentile_high=high), torch.logsumexp(x @ w.T + b, 1).numpy())


def test_mcdropout_mean_logits_of_dropped_features(wrn):
    """OpenOOD's dropout_postprocessor on a DropoutNet: T head passes on element-wise dropped
    features (torch's dropout2d on a 2-D input, scaled by 1/(1-p)), softmax of the mean
    logits, its maximum; masks drawn per cache row from numpy (the cache's row index)."""
    model, _, _, (_, _, xq, _) = wrn
    w, b = head(model)
    for p, T in ((0.5, 5), (0.25, 3)):
        expected = []
        for r, x in enumerate(xq):
            keep = torch.from_numpy(np.random.default_rng([0, r]).random((T, x.numel())) >= p).double()
            z = torch.stack([(x * keep[t] / (1 - p)) @ w.T + b for t in range(T)]).mean(0)
            expected.append(float(torch.softmax(z, 0).max()))
        check(ours(wrn, "mcdropout", p=p, T=T), expected)
    # p = 0 keeps every entry: the maximum softmax of the head on the features
    check(ours(wrn, "mcdropout", p=0.0, T=2), torch.softmax(xq @ w.T + b, 1).max(1).values.numpy())


def test_cfood_conformal_neighbour_fraction(wrn):
    """OpenOOD's cfood_postprocessor, its loops: normalised features, a reference subset,
    each reference row's sorted self-distances at the grid positions, then per sample the
    first grid fraction whose share of reference rows reaches k."""
    _, _, _, (xt, _, xq, _) = wrn
    kval = np.concatenate((np.linspace(0.001, 0.1, 100), np.linspace(0.105, 0.5, 81), np.linspace(0.51, 0.99, 49)))
    for alpha, k in ((1.0, 0.01), (0.5, 0.05)):
        f = xt / (xt.norm(dim=1, keepdim=True) + 1e-10)
        n = int(alpha * len(f)) if alpha < 1 else len(f)
        idx = np.sort(np.random.default_rng(0).permutation(len(f))[:n])
        ref_ = f[torch.from_numpy(idx)]
        kpos = np.array(kval * n - 1, dtype=int)
        keep = np.concatenate(([True], kpos[:-1] < kpos[1:]))
        kv, kp = kval[keep], kpos[keep]
        knn = torch.stack([torch.sort(((ref_[i] - ref_) ** 2).sum(1)).values[kp + 1] for i in range(n)])
        expected = []
        for v in xq / (xq.norm(dim=1, keepdim=True) + 1e-10):
            d = ((v - ref_) ** 2).sum(1)
            share = (knn >= d[:, None]).sum(0).double() / n
            pos = torch.nonzero(share >= k)
            expected.append(-(kv[int(pos[0, 0])] if len(pos) else 1.0))
        got = ours(wrn, "cfood", alpha=alpha, k=k)
        assert len(set(expected)) > 2
        np.testing.assert_array_equal(got, expected)


def test_gram_deviations(wrn, tmp_path):
    """OpenOOD's gram_postprocessor: G_p of every Conv2d / ReLU output (the matmul form, the
    signed p-th root), per class min / max over the rows not held out by random.sample,
    per-layer normalisers from the held-out rows, deviations of the predicted class over
    the max softmax. Powers 1..3 (the default 1..5 only adds powers; extraction time grows
    with each)."""
    import random
    from collections import Counter
    model, (train, labels, test), _, _ = wrn
    train, labels = train[:100], labels[:100]          # a third of the fixture: still every class
    assert len(torch.unique(labels)) == 10
    params = {"gram": {"max_power": 3}}
    tr = extract_tensor(model, "wrn_40_2", train, str(tmp_path / "train.h5"), ["gram"], batch_size=100,
                        labels=labels, name="train", params=params)
    te = extract_tensor(model, "wrn_40_2", test, str(tmp_path / "test.h5"), ["gram"], batch_size=8, params=params)
    powers = [1, 2, 3]
    mods = [m for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ReLU))]

    def grams(x):
        feats = []
        hooks = [m.register_forward_hook(lambda m, i, o: feats.append(o.detach().double().clone())) for m in mods]
        try:
            with torch.no_grad():
                z = model(x)
        finally:
            for h in hooks:
                h.remove()
        out = []
        for f in feats:
            per = {}
            for p in powers:
                t = (f ** p).reshape(f.shape[0], f.shape[1], -1)
                s = (t @ t.transpose(1, 2)).sum(2)
                per[p] = s.sign() * s.abs() ** (1 / p)
            out.append(per)
        return out, z.double()

    def delta(lo, hi, x):
        return (F.relu(lo - x) / (lo + 1e-6).abs()).sum(1) + (F.relu(x - hi) / (hi + 1e-6).abs()).sum(1)

    gt, _ = grams(train)
    y = labels.numpy()
    counts = Counter(y.tolist())
    rng = random.Random(0)
    val = {c: rng.sample(range(counts[c]), int(0.1 * counts[c])) for c in counts}
    trn = {c: sorted(set(range(counts[c])) - set(val[c])) for c in counts}
    mins, maxs, norms = {}, {}, []
    for l, per in enumerate(gt):
        total = []
        for c in counts:
            rows = torch.from_numpy(np.flatnonzero(y == c))
            dev = 0
            for p in powers:
                g = per[p][rows]
                mins[l, p, c], maxs[l, p, c] = g[trn[c]].min(0).values, g[trn[c]].max(0).values
                dev = dev + delta(mins[l, p, c], maxs[l, p, c], g[val[c]])
            total.append(dev)
        norms.append(float(torch.cat(total).mean()))
    gq, zq = grams(test)
    conf, pred = torch.softmax(zq, 1).max(1)
    dev = torch.zeros(len(test), dtype=torch.float64)
    for l, per in enumerate(gq):
        for p in powers:
            for c in range(10):
                hit = pred == c
                if hit.any():
                    dev[hit] += delta(mins[l, p, c], maxs[l, p, c], per[p][hit]) / norms[l]
    with CacheReader(tr) as t, CacheReader(te) as r:
        assert len(r.attrs["hook_sets"]["gram"]) == len(mods)
        got = compute_score(r, "gram", fit_score(t, "gram", max_power=3), max_power=3)
    check(got, (-dev / conf).numpy(), tol=1e-4)


def test_adascale_adaptive_scaling(wrn, tmp_path):
    """OpenOOD's adascale_postprocessor with AdaScaleANet / AdaScaleLNet: the max-logit
    input gradient, the 5 % least sensitive entries moved by 0.5 sign(g), the shift
    statistic's ECDF over the fitting rows, per-sample percentiles, ada_scale's s1 / s2,
    energy of fc(x exp(r)) (A) or of fc(x) r^2 (L)."""
    model, (train, labels, test), _, _ = wrn
    train, labels = train[:150], labels[:150]           # the ECDF needs no more
    tr = extract_tensor(model, "wrn_40_2", train, str(tmp_path / "train.h5"), ["adascale_a"], batch_size=75,
                        labels=labels, name="train")
    te = extract_tensor(model, "wrn_40_2", test, str(tmp_path / "test.h5"), ["adascale_a"], batch_size=8)
    w, b = head(model)

    def features(x):
        x = x.clone().requires_grad_(True)
        captured = {}
        h = model.fc.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
        try:
            out = model(x)
            out[torch.arange(len(x)), out.argmax(1)].sum().backward()
            g = x.grad.detach()
            f = captured["x"].flatten(1).detach().double()
            n_pix = int(g[0].numel() * 0.05)
            flat = g.abs().view(len(x), -1)
            mask = torch.zeros_like(flat).scatter_(1, torch.topk(flat, n_pix, dim=1, largest=False)[1], 1)
            with torch.no_grad():
                model(x.detach() + g.sign() * mask.view_as(x) * 0.5)
            fp = captured["x"].flatten(1).double()
        finally:
            h.remove()
        return f, fp

    def q(f, fp):
        k1, k2 = int(f.shape[1] * 5 / 100), int(f.shape[1] * 1 / 100)
        t1, t2 = torch.topk(f, k1, dim=1)[1], torch.topk(f, k2, dim=1)[1]
        return torch.gather(torch.relu(fp), 1, t1).sum(1) + 10 * torch.gather((f - fp).abs(), 1, t2).sum(1)

    ft, fpt = features(train)
    fq, fpq = features(test)
    log = np.sort(q(ft, fpt).numpy())
    percent = 1 - np.searchsorted(log, q(fq, fpq).numpy(), side="right") / len(log)
    pct = torch.from_numpy(75 + percent * 10)
    a = torch.relu(fq)
    ks = a.shape[1] - torch.round(a.shape[1] * pct / 100).to(torch.int)
    vals = torch.topk(a, int(ks.max()), dim=1).values
    s2 = (vals * (torch.arange(int(ks.max()))[None, :] < ks[:, None])).sum(1)
    r = a.sum(1) / s2
    expected_a = torch.logsumexp((fq * torch.exp(r)[:, None]) @ w.T + b, 1)
    expected_l = torch.logsumexp((fq @ w.T + b) * (r ** 2)[:, None], 1)
    with CacheReader(tr) as t, CacheReader(te) as rd:
        got_a = compute_score(rd, "adascale_a", fit_score(t, "adascale_a"))
        got_l = compute_score(rd, "adascale_l", fit_score(t, "adascale_l"))
    assert len(np.unique(percent)) > 3
    # 5e-5: the 5 % least sensitive entries are picked among near-ties of |gradient|; a
    # last-bit difference of the input gradient (the thread count changes the convolutions'
    # summation order) swaps entries at the boundary. Measured: 1.5e-5 on one thread, below
    # 1e-5 on two.
    check(got_a, expected_a.numpy(), tol=5e-5)
    check(got_l, expected_l.numpy(), tol=5e-5)


def test_webo_weighted_energy(wrn, tmp_path):
    """pytorch-ood's WeightedEBO.score: -log sum relu(w) exp(z) (negated: the confidence);
    no weights file is a cache limit that names the parameter."""
    from gradood.analyze.registry import entry
    _, _, (_, te), (_, _, _, zq) = wrn
    w = np.linspace(-0.5, 2.0, 10)
    path = tmp_path / "w.npy"
    np.save(path, w)
    expected = torch.log((F.relu(torch.from_numpy(w)) * torch.exp(zq)).sum(1))
    with CacheReader(te) as r:
        check(compute_score(r, "webo", weights=str(path)), expected.numpy())
        assert "webo.weights" in entry("webo").problems(r.attrs)[0]


def test_iodin_one_entry_odin(wrn, tmp_path):
    """OpenOOD's iodin_postprocessor: the cross-entropy of z / 1000 at the prediction, the
    one input entry of largest |gradient| moved by 0.0014 against its std-divided sign,
    the maximum softmax of the new logits over T."""
    model, (_, _, test), _, _ = wrn
    te = extract_tensor(model, "wrn_40_2", test, str(tmp_path / "test.h5"), ["iodin"], batch_size=8)
    std = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)      # the helper's normalisation std
    x = test.clone().requires_grad_(True)
    out = model(x)
    F.cross_entropy(out / 1000, out.detach().argmax(1)).backward()
    g = x.grad.detach()
    flat = g.abs().view(len(x), -1)
    mask = torch.zeros_like(flat, dtype=torch.uint8).scatter_(1, flat.argmax(1, keepdim=True), 1).view_as(g)
    step = ((torch.ge(g, 0).float() - 0.5) * 2) / std
    with torch.no_grad():
        z = model(torch.add(x.detach(), step * mask, alpha=-0.0014)) / 1000
    expected = torch.softmax(z.double(), 1).max(1).values
    with CacheReader(te) as r:
        got = compute_score(r, "iodin")
    check(got, expected.numpy(), tol=1e-6)
    # one entry per image moved: the scores differ from ODIN's (every entry moved) and from MSP
    with torch.no_grad():
        msp = torch.softmax(model(test).double() / 1000, 1).max(1).values
    assert not np.allclose(got, msp.numpy(), rtol=0, atol=1e-12)
