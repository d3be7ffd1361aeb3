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

import authors_reference as ref
from extract.models import build_model
from helpers import compute_score, extract_tensor, fit_score, randomize_norms, rel_err
from store.reader import CacheReader


@pytest.fixture(scope="module")
def wrn(tmp_path_factory):
    """WRN-40-2 (128 features, 10 classes): 300 labelled training images, 24 test images
    (half of them shifted), extracted with the last feature map (for RankFeat)."""
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
        labels = model(train).argmax(1)          # labels the model mostly gets right (SHE)
        labels[::7] = (labels[::7] + 1) % 10
    assert len(torch.unique(labels)) == 10 and min(torch.bincount(labels)) >= 5
    test = torch.cat([torch.randn(12, 3, 32, 32, generator=g), 2.5 * torch.randn(12, 3, 32, 32, generator=g)])
    d = tmp_path_factory.mktemp("posthoc")
    tr = extract_tensor(model, "wrn_40_2", train, str(d / "train.h5"), ["msp"], batch_size=100,
                        labels=labels, name="train")
    te = extract_tensor(model, "wrn_40_2", test, str(d / "test.h5"), ["msp", "rankfeat"], batch_size=8)
    (xt, zt), (xq, zq) = ref.penultimate(model, train), ref.penultimate(model, test)
    return model, (train, labels, test), (tr, te), (xt.double(), zt.double(), xq.double(), zq.double())


def ours(wrn, score, **params):
    _, _, (tr, te), _ = wrn
    with CacheReader(tr) as t, CacheReader(te) as r:
        from analyze.registry import entry
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
    from analyze.registry import canonical
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
    from store.synthetic import write_synthetic, world
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
    from store.schema import CacheError
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


def test_multimahalanobis_sums_layer_distances(wrn, tmp_path):
    """pytorch-ood's MultiMahalanobis: per layer (block1-3 spatial means, the pooled
    feature) class means, summed class-centred scatter + 1e-6 I inverted, 0.5 min_c d^2;
    summed over layers (negated: higher = more ID)."""
    model, (train, labels, test), _, _ = wrn
    tr = extract_tensor(model, "wrn_40_2", train, str(tmp_path / "train.h5"), ["multimahalanobis"],
                        batch_size=100, labels=labels, name="train")
    te = extract_tensor(model, "wrn_40_2", test, str(tmp_path / "test.h5"), ["multimahalanobis"], batch_size=8)
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
