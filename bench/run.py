"""Benchmark (not a test): the authors' one-pass-per-score procedures against one
extraction plus analysis from the cache, on the same model and the same images.

(a) the authors' way: a GAIA-Z pass and a GAIA-A pass over batches, GradNorm at batch
    size 1, each computing its score directly (``bench/authors_reference.py``, the
    re-implementations the test suite pins our scores to), and one plain forward pass for
    the logit baselines (MSP, energy);
(b) ours: one extraction serving gaia_a, gaia_z, gradnorm, msp and energy, then every
    score computed from the cache (median of repeated runs).

Also: cache bytes per image for every storage policy, the default recipes' size
estimates (CIFAR ResNet-18 at 32x32, ImageNet BiT-S-R101x1 at 480x480), the peak memory
of this process, and a bounded-memory demonstration: a cache of several GiB on disk,
analysed in a child process (which never imports torch) whose peak RSS is measured.

Writes ``bench/results.json`` and ``bench/results.md`` and prints the Markdown.
``python bench/run.py --help`` lists the options; ``make bench`` runs the defaults.
"""
import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ARCH = "resnet18"
SCORES = ("gaia_z", "gaia_a", "gradnorm", "msp", "energy")
GRADIENT_SCORES = ("gaia_z", "gaia_a", "gradnorm")
POLICY_NAMES = ("scores", "pooled", "stats", "raw")
# The bars.
BAR_EXTRACTION_RATIO = 0.2
BAR_SPEEDUP = {"gaia_z": 200.0, "gaia_a": 200.0, "gradnorm": 1000.0}
BAR_CHILD_RSS_BYTES = 10 ** 9
BAR_AGREEMENT = 1e-5          # the test suite's tolerance against the authors' procedures
GIB = 2 ** 30


# ----------------------------------------------------------------------------- child side
def _vm_hwm_kib():
    """Peak resident set size of this process image (VmHWM), in KiB, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def child_analyse(path):
    """Compute every benchmarked score from the cache at ``path``; print a JSON summary.

    Runs in a fresh interpreter that imports only ``store`` and ``analyze`` (no torch), so
    its peak memory is that of the analysis alone.
    """
    from gradood.analyze.fitting import score_cache
    from gradood.analyze.registry import entry
    from gradood.store.reader import CacheReader
    out = {"scores": {}}
    start = time.perf_counter()
    with CacheReader(path) as reader:
        out["n_samples"] = reader.n_samples
        for score in SCORES:
            t = time.perf_counter()
            values = score_cache(reader, score, entry(score).make())
            out["scores"][score] = {"seconds": time.perf_counter() - t, "n": int(len(values)),
                                    "finite": bool(np.isfinite(values).all()),
                                    "first": values[:8].tolist()}
    out["seconds"] = time.perf_counter() - start
    out["torch_imported"] = "torch" in sys.modules
    out["vm_hwm_kib"] = _vm_hwm_kib()
    out["ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(out))


# ----------------------------------------------------------------------------- helpers
def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _device_description(torch, device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), host CPU {_cpu_model()}"
    return f"{_cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load_images(torch, n):
    """(images (n, 3, 32, 32) float tensor, labels (n,), description): demo images when
    present (their labels; -1 for OOD folders), else random tensors (labels i % 10)."""
    root = os.path.join(ROOT, "data", "demo")
    if os.path.isdir(os.path.join(root, "digits", "test")):
        from gradood.extract.datasets import build_transform, open_dataset
        transform, _ = build_transform("demo")
        images, labels, used = [], [], []
        for rel in ("digits/test", "digits/train", "photo_patches", "textures", "shapes", "noise"):
            if len(images) >= n:
                break
            if not os.path.isdir(os.path.join(root, rel)):
                continue
            ds = open_dataset(root, "folder", rel, transform, rel.replace("/", "_"))
            take = min(n - len(images), len(ds))
            items = [ds[i] for i in range(take)]
            images += [it[0] for it in items]
            labels += [int(it[1]) if rel.startswith("digits") else -1 for it in items]
            used.append(f"{take} of data/demo/{rel}")
        return torch.stack(images), torch.tensor(labels), "demo images (" + ", ".join(used) + "), 3x32x32"
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 10,
            f"{n} fixed random 3x32x32 tensors (no data/demo)")


def _load_model(torch):
    """(model in eval mode, description): the demo checkpoint when present."""
    from gradood.extract.checkpoint import load_checkpoint
    from gradood.extract.models import build_model
    from bench.helpers import randomize_norms
    model = build_model(ARCH, 10)
    ckpt = os.path.join(ROOT, "checkpoints", "demo_resnet18.pt")
    if os.path.exists(ckpt):
        sha, _ = load_checkpoint(model, ckpt)
        return model.eval(), "demo CIFAR ResNet-18 checkpoint (checkpoints/demo_resnet18.pt)", sha
    torch.manual_seed(0)
    randomize_norms(model)
    return model.eval(), "randomly initialised CIFAR ResNet-18 (random norm layers; no demo checkpoint)", "random-init"


def _extract(model, images, cache_file, scores, policies, batch_size, device, sha, truncate=True, labels=None,
             params=None):
    """Our extraction of ``images`` into ``cache_file`` (``extract.extract_to_cache``, on ``device``)."""
    from gradood.analyze import requirements
    from gradood.extract import ExtractConfig, Provenance
    from gradood.extract.runner import ExtractionPlan, extract_to_cache
    from bench.helpers import image_set
    needs, passes = requirements(scores, params)
    policies = dict(policies)
    config = ExtractConfig(arch=ARCH, needs=needs, passes=passes, policy=policies.pop("*", "scores"),
                           store=policies, odin=((1000.0, 0.0014, False),), batch_size=batch_size,
                           device=str(device), progress=False, truncate_backward=truncate)
    plan = ExtractionPlan(model, config, tuple(images.shape[1:]), device)
    if os.path.exists(cache_file):
        os.remove(cache_file)
    shutil.rmtree(cache_file + ".parts", ignore_errors=True)   # a crashed earlier run's parts
    path = extract_to_cache(model, image_set(images, labels), cache_file, config,
                            Provenance(dataset="bench", checkpoint_sha256=sha, weights_sha256=sha,
                                       preprocess={"name": "demo"}), plan=plan)
    return path, plan


def _recipe_estimate(torch, arch, num_classes, image_shape, odin, device):
    """Uncompressed bytes per image of ``extract`` with the default scores and policy ``scores``."""
    from gradood.analyze.registry import default_scores, requirements
    from gradood.extract import ExtractConfig
    from gradood.extract.runner import ExtractionPlan
    from gradood.extract.models import build_model
    model = build_model(arch, num_classes).to(device).eval().requires_grad_(False)
    scores = default_scores()
    needs, passes = requirements(scores)
    t = time.perf_counter()
    plan = ExtractionPlan(model, ExtractConfig(arch=arch, needs=needs, passes=passes,
                                               odin=tuple((a, b, False) for a, b, *_ in odin)), image_shape, device)
    out = {"arch": arch, "num_classes": num_classes, "input": list(image_shape),
           "scores": scores, "policy": "scores", "odin": [list(p) for p in odin],
           "layers": len(plan.layers), "objectives": plan.objectives, "passes": plan.passes_per_batch(),
           "bytes_per_image": plan.bytes_per_image(), "probe_seconds": time.perf_counter() - t}
    del model, plan
    return out


def _same_arrays(a, b):
    """True when two cache files hold the same datasets, bit for bit."""
    import h5py
    with h5py.File(a) as fa, h5py.File(b) as fb:
        names = []
        fa.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        other = []
        fb.visititems(lambda n, o: other.append(n) if isinstance(o, h5py.Dataset) else None)
        return sorted(names) == sorted(other) and all(np.array_equal(fa[n][...], fb[n][...]) for n in names)


def _frozen_ref(ref, fn, *args):
    """An authors' pass with frozen parameters (only the input requires grad): the lean
    version of their procedure, for the second ratio."""
    import copy
    real = ref._fresh
    ref._fresh = lambda model: copy.deepcopy(model).eval().requires_grad_(False)
    try:
        model, x, *rest = args
        return fn(model, x.clone().requires_grad_(True), *rest)
    finally:
        ref._fresh = real


PTOOD_SCORES = ("msp", "maxlogit", "energy", "odin", "mahalanobis", "react", "ash", "knn", "vim", "gradnorm", "nac")


def pytorch_ood_comparison(torch, model, train, train_labels, test, bs, device, workdir, timed, sha):
    """pytorch-ood's detectors for PTOOD_SCORES (fit on ``train``, predict ``test``), each
    running the network itself, against ours: one extraction of both sets and every score
    from the caches, fits included. None when pytorch-ood is not installed."""
    try:
        import pytorch_ood.detector as D
    except ImportError:
        return None
    import pytorch_ood
    from gradood.analyze.fitting import fit_estimator, score_cache
    from gradood.analyze.registry import entry
    from gradood.store.reader import CacheReader

    def features(x):
        captured = {}
        h = model.linear.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
        try:
            model(x)
        finally:
            h.remove()
        return captured["x"]

    import copy
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train, train_labels), batch_size=bs)
    trainable = copy.deepcopy(model).requires_grad_(True)      # the gradient detectors need parameter grads
    w, b = model.linear.weight.detach(), model.linear.bias.detach()
    make = {
        "msp": lambda: D.MaxSoftmax(model), "maxlogit": lambda: D.MaxLogit(model),
        "energy": lambda: D.EnergyBased(model), "odin": lambda: D.ODIN(model, eps=0.0014, temperature=1000.0),
        "mahalanobis": lambda: D.Mahalanobis(features),
        "react": lambda: D.ReAct(lambda x: features(x), model.linear, percentile=0.9),
        "ash": lambda: D.ASH(lambda x: features(x)[:, :, None, None], lambda t: model.linear(t.flatten(1)),
                             variant="ash-s", percentile=0.9),
        "knn": lambda: D.KNN(features, k=50), "vim": lambda: D.ViM(features, d=w.shape[1] // 2, w=w, b=b),
        "gradnorm": lambda: D.GradNorm(trainable),
        "nac": lambda: D.NACUE(trainable, layers=[trainable.layer4], feature_reduce=lambda t: t.mean(dim=(2, 3))),
    }
    theirs = {}
    for name in PTOOD_SCORES:
        def run():
            det = make[name]()
            det.fit(loader)
            return torch.cat([det.predict(test[i:i + bs]).detach() for i in range(0, len(test), bs)])
        try:
            t, _ = timed(lambda: (torch.manual_seed(0), run())[1])
            theirs[name] = {"seconds": t}
        except Exception as err:   # a detector that cannot run on this model
            theirs[name] = {"error": f"{type(err).__name__}: {err}"[:200]}
    tr_path, te_path = os.path.join(workdir, "ptood_train.h5"), os.path.join(workdir, "ptood_test.h5")
    t_ext, _ = timed(lambda: (_extract(model, train.cpu(), tr_path, list(PTOOD_SCORES), {}, bs, device, sha,
                                       labels=train_labels.cpu()),
                              _extract(model, test.cpu(), te_path, list(PTOOD_SCORES), {}, bs, device, sha)))
    ours = {}
    with CacheReader(tr_path) as tr, CacheReader(te_path) as te:
        for name in PTOOD_SCORES:
            t = time.perf_counter()
            e = entry(name)
            est = fit_estimator(tr, name) if e.fitted else e.make()
            score_cache(te, name, est)
            ours[name] = {"seconds": time.perf_counter() - t}
    for f in (tr_path, te_path):
        os.remove(f)
    ran = [n for n in PTOOD_SCORES if "seconds" in theirs[n]]
    return {"version": pytorch_ood.__version__, "theirs": theirs, "ours_analysis": ours,
            "ours_extraction_seconds": t_ext, "train_images": len(train), "test_images": len(test),
            "theirs_total_seconds": sum(theirs[n]["seconds"] for n in ran),
            "ours_total_seconds": t_ext + sum(ours[n]["seconds"] for n in PTOOD_SCORES),
            "compared": ran}


# ----------------------------------------------------------------------------- big cache
def build_big_cache(src_path, dst_path, target_bytes, variants=8, noise=1e-3, seed=0):
    """Write a cache of at least ``target_bytes`` on disk whose rows are ``src_path``'s rows tiled.

    Same attributes, datasets, chunking, compression and checksums as the writer's
    (``store.writer._create_rows_dataset``). One period of ``variants`` copies of the source
    rows is compressed once in memory: copy 0 exact, the others with multiplicative noise of
    relative size ``noise`` on float data (poorly compressible, like real gradients). The
    big file's chunks are that period's compressed chunks, repeated with HDF5 direct chunk
    writes, so generation costs disk I/O rather than compression. Returns a dict of facts.
    """
    import h5py

    from gradood.store.schema import STRING_DATASETS
    from gradood.store.writer import _attr_value, _create_rows_dataset
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    with h5py.File(src_path, "r") as src:
        n_src = int(src.attrs["n_samples"])
        rows = []
        src.visititems(lambda name, obj: rows.append(name)
                       if isinstance(obj, h5py.Dataset) and not name.startswith("head/") else None)
        data = {p: src[p][...] for p in rows}
        head = {p: src[p][...] for p in ("head/weight", "head/bias")}
        attrs = dict(src.attrs.items())
    chunked = [p for p in rows if p not in STRING_DATASETS]
    # Chunk rows the writer would choose for a large file.
    probe = h5py.File("probe", "w", driver="core", backing_store=False)
    chunk_rows = {p: _create_rows_dataset(probe, p, 1 << 30, data[p].shape[1:], data[p].dtype).chunks[0]
                  for p in chunked}
    probe.close()
    block = math.lcm(n_src, *chunk_rows.values())
    period = block * variants
    template = h5py.File("template", "w", driver="core", backing_store=False)
    pieces = {}
    for p in chunked:
        base = data[p][np.arange(block) % n_src]
        copies = [base]
        for _ in range(variants - 1):
            if np.issubdtype(base.dtype, np.floating):
                eps = rng.standard_normal(base.shape, dtype=np.float32).astype(base.dtype)
                copies.append(base * (1 + noise * eps))
            else:
                copies.append(base)
        ds = _create_rows_dataset(template, p, period, base.shape[1:], base.dtype)
        if ds.chunks[0] != chunk_rows[p]:
            raise RuntimeError(f"{p}: template chunking {ds.chunks} differs from {chunk_rows[p]}")
        ds[...] = np.concatenate(copies)
        zeros = (0,) * (ds.ndim - 1)
        pieces[p] = [ds.id.read_direct_chunk((j * chunk_rows[p], *zeros))
                     for j in range(period // chunk_rows[p])]
    template.close()
    per_row = sum(len(c[1]) for p in chunked for c in pieces[p]) / period
    n = max(1, math.ceil(target_bytes / per_row / period)) * period
    tmp = dst_path + ".tmp"
    with h5py.File(tmp, "w") as out:
        for key, value in attrs.items():
            out.attrs[key] = value
        out.attrs["n_samples"] = n
        out.attrs["dataset"] = _attr_value("bench_big")
        out.attrs["complete"] = False
        for p, value in head.items():
            out.create_dataset(p, data=value, fletcher32=True)
        for p in rows:
            ds = _create_rows_dataset(out, p, n, data[p].shape[1:], data[p].dtype)
            if p in STRING_DATASETS:
                for a in range(0, n, 65536):
                    b = min(n, a + 65536)
                    ds[a:b] = np.array([f"bench_big:{i}" if p == "paths" else "" for i in range(a, b)], dtype=object)
                continue
            r, zeros, chunks = ds.chunks[0], (0,) * (ds.ndim - 1), pieces[p]
            for c in range(n // r):
                mask, raw = chunks[c % len(chunks)]
                ds.id.write_direct_chunk((c * r, *zeros), raw, mask)
        out.flush()
        out.attrs["complete"] = True
    os.replace(tmp, dst_path)
    return {"rows": n, "source_rows": n_src, "period_rows": period, "variants": variants,
            "noise": noise, "predicted_bytes_per_row": per_row,
            "bytes_on_disk": os.path.getsize(dst_path), "seconds": time.perf_counter() - t0}


def run_child(path, workdir):
    """Analyse ``path`` in a fresh interpreter; returns its JSON summary plus RSS measurements."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child-analyse", path]
    time_file = os.path.join(workdir, "child_time.txt")
    wrapped = os.access("/usr/bin/time", os.X_OK)
    if wrapped:
        cmd = ["/usr/bin/time", "-f", "%M", "-o", time_file] + cmd
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"analysis child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_seconds"] = wall
    out["usr_bin_time_maxrss_kib"] = None
    if wrapped:
        with open(time_file) as f:
            out["usr_bin_time_maxrss_kib"] = int(f.read().split()[-1])
        os.remove(time_file)
    # RUSAGE_CHILDREN keeps the largest child's ru_maxrss, and Linux carries a spawning
    # process's high-water mark into its child's ru_maxrss across exec: an upper bound.
    out["rusage_children_maxrss_kib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    measured = [v for v in (out["vm_hwm_kib"], out["usr_bin_time_maxrss_kib"]) if v]
    out["peak_rss_bytes"] = max(measured) * 1024 if measured else out["ru_maxrss_kib"] * 1024
    return out


# ----------------------------------------------------------------------------- main
def _timer(torch, device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - t, out
    return timed


def main(argv=None):
    """Run the benchmark; see the module docstring and ``--help``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512, help="images benchmarked (default 512)")
    p.add_argument("--gradnorm-images", type=int, default=0,
                   help="time GradNorm at batch size 1 on only the first N images and scale the "
                        "time to all images (default 0: all images)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of the GAIA passes and of our extraction")
    p.add_argument("--policy-images", type=int, default=64, help="images extracted per storage policy (default 64)")
    p.add_argument("--repeat", type=int, default=7, help="repetitions of each analysis from the cache (median reported)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda[:i]")
    p.add_argument("--big-cache-gb", type=float, default=4.0,
                   help="size in GiB of the bounded-memory demo cache; 0 skips it (default 4)")
    p.add_argument("--big-cache-policy", default="scores", choices=POLICY_NAMES,
                   help="storage policy of the demo cache's source rows (default scores: the "
                        "analysis then reads nearly every byte of the file)")
    p.add_argument("--workdir", default=os.path.join(ROOT, "bench", "out"), help="scratch folder for caches")
    p.add_argument("--keep", action="store_true", help="keep the caches in the scratch folder")
    p.add_argument("--out", default=os.path.join(ROOT, "bench"), help="folder for results.json and results.md")
    p.add_argument("--child-analyse", metavar="CACHE", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_analyse:
        return child_analyse(args.child_analyse)

    wall0 = time.perf_counter()
    import torch

    from bench import authors_reference as ref
    from gradood.analyze.registry import default_scores
    from gradood.extract.runner import select_device
    from bench.helpers import compute_score, rel_err
    from gradood.store.benchmarks import benchmark
    from gradood.store.reader import CacheReader

    device = select_device(args.device)
    timed = _timer(torch, device)
    os.makedirs(args.workdir, exist_ok=True)
    model, model_what, sha = _load_model(torch)
    model = model.to(device).requires_grad_(False)
    images_cpu, labels_cpu, images_what = _load_images(torch, args.images)
    images = images_cpu.to(device)
    n, bs = len(images), args.batch_size
    n_gn = min(args.gradnorm_images or n, n)
    bn = ref.gaia_bn_modules(model)
    bh = ref.gaia_before_head_modules(model, "resnet")
    print(f"benchmark on {_device_description(torch, device)}: {model_what}; {images_what}; "
          f"{n} images, batch size {bs}", flush=True)

    # Warm-up (kernels, thread pools, allocator), not timed.
    ref.gaia_z(model, images[:bs], bn)

    # (a) the authors' passes, one per score.
    authors = {}
    def median_of(fn, k=3):
        """Median time of ``k`` runs of ``fn`` (the machine's timing noise is large), and its result."""
        runs = [timed(fn) for _ in range(k)]
        return statistics.median(r[0] for r in runs), runs[-1][1]
    t, z_ref = median_of(lambda: np.concatenate([ref.gaia_z(model, images[i:i + bs], bn)[0] for i in range(0, n, bs)]))
    authors["gaia_z"] = {"procedure": f"GAIA-Z pass (batch {bs}): forward, max-logit backward, non-zero fractions at all BN outputs", "seconds": t}
    print(f"  authors' GAIA-Z pass: {t:.2f} s", flush=True)
    t, a_ref = median_of(lambda: np.concatenate([ref.gaia_a(model, images[i:i + bs], bh) for i in range(0, n, bs)]))
    authors["gaia_a"] = {"procedure": f"GAIA-A pass (batch {bs}): forward, two backward passes, before-head gradient means", "seconds": t}
    print(f"  authors' GAIA-A pass: {t:.2f} s", flush=True)
    t, gn_ref = timed(lambda: ref.gradnorm(model, images[:n_gn]))
    authors["gradnorm"] = {"procedure": "GradNorm at batch size 1: forward, backward, L1 norm of the head weight gradient",
                           "seconds": t * n / n_gn, "measured_seconds": t, "measured_images": n_gn,
                           "extrapolated": n_gn < n}
    print(f"  authors' GradNorm batch size 1 ({n_gn} images): {t:.2f} s", flush=True)

    def forward_baselines():
        msp, energy = [], []
        with torch.no_grad():
            for i in range(0, n, bs):
                z = model(images[i:i + bs]).double()
                msp.append(torch.softmax(z, dim=1).max(dim=1).values.cpu().numpy())
                energy.append(torch.logsumexp(z, dim=1).cpu().numpy())
        return np.concatenate(msp), np.concatenate(energy)
    t, (msp_ref, energy_ref) = timed(forward_baselines)
    for s in ("msp", "energy"):
        authors[s] = {"procedure": f"forward pass (batch {bs}, no gradient), {s} from the logits", "seconds": t}
    for a in authors.values():
        a["images_per_second"] = n / a["seconds"]
    lean = {}
    t, _ = median_of(lambda: [_frozen_ref(ref, ref.gaia_z, model, images[i:i + bs], bn) for i in range(0, n, bs)])
    lean["gaia_z"] = t
    t, _ = median_of(lambda: [_frozen_ref(ref, ref.gaia_a, model, images[i:i + bs], bh) for i in range(0, n, bs)])
    lean["gaia_a"] = t
    lean["gradnorm"] = authors["gradnorm"]["seconds"]      # needs the head's weight gradient
    print(f"  authors' passes with frozen parameters: GAIA-Z {lean['gaia_z']:.2f} s, GAIA-A {lean['gaia_a']:.2f} s",
          flush=True)

    # (b) ours: one extraction, then every score from the cache.
    main_cache = os.path.join(args.workdir, "bench.h5")
    t_ext, (path, plan) = median_of(lambda: _extract(model, images_cpu, main_cache, list(SCORES), {}, bs, device, sha))
    print(f"  our extraction ({', '.join(SCORES)}): {t_ext:.2f} s", flush=True)
    analysis, ours = {}, {}
    t_open = time.perf_counter()
    with CacheReader(path) as reader:
        t_open = time.perf_counter() - t_open
        for s in SCORES:
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                ours[s] = compute_score(reader, s)
                times.append(time.perf_counter() - t)
            analysis[s] = {"median_seconds": statistics.median(times), "min_seconds": min(times),
                           "first_seconds": times[0], "repeats": len(times)}
    agreement = {"gaia_z": rel_err(ours["gaia_z"], z_ref), "gaia_a": rel_err(ours["gaia_a"], a_ref),
                 "gradnorm": rel_err(ours["gradnorm"][:n_gn], gn_ref), "msp": rel_err(ours["msp"], msp_ref),
                 "energy": rel_err(ours["energy"], energy_ref)}
    authors_sum = sum(authors[s]["seconds"] for s in GRADIENT_SCORES)
    extraction = {"seconds": t_ext, "images_per_second": n / t_ext, "scores": list(SCORES),
                  "cache_bytes_on_disk": os.path.getsize(path),
                  "cache_bytes_per_image_on_disk": os.path.getsize(path) / n,
                  "uncompressed_bytes_per_image": plan.bytes_per_image(),
                  "authors_gradient_passes_seconds": authors_sum,
                  "ratio_to_authors_gradient_passes": t_ext / authors_sum,
                  "authors_all_passes_seconds": authors_sum + authors["msp"]["seconds"],
                  "cache_open_seconds": t_open}
    extraction["authors_frozen_passes_seconds"] = sum(lean.values())
    extraction["ratio_to_authors_frozen_passes"] = t_ext / sum(lean.values())
    speedup = {s: authors[s]["seconds"] / analysis[s]["median_seconds"] for s in SCORES}

    # The truncated backward passes change no bit: a full-depth extraction of the same images.
    full_cache = os.path.join(args.workdir, "bench_full_depth.h5")
    t_full, _ = timed(lambda: _extract(model, images_cpu, full_cache, list(SCORES), {}, bs, device, sha, truncate=False))
    extraction["full_depth_seconds"] = t_full
    extraction["bit_identical_to_full_depth"] = _same_arrays(path, full_cache)
    os.remove(full_cache)
    print(f"  full-depth extraction: {t_full:.2f} s; bit-identical: {extraction['bit_identical_to_full_depth']}", flush=True)

    # Extraction per score set: every default score, NAC-UE alone, ODIN alone.
    sets = {"every default score": default_scores(), "nac (avgpool: no backward)": ["nac"],
            "odin (one pass, T=1000, eps=0.0014)": ["odin"], "msp (forward only)": ["msp"]}
    per_set = {}
    for label, scores in sets.items():
        f = os.path.join(args.workdir, "bench_set.h5")
        t, (_, splan) = timed(lambda: _extract(model, images_cpu, f, scores, {}, bs, device, sha))
        per_set[label] = {"scores": scores, "seconds": t, "images_per_second": n / t,
                          "passes": splan.passes_per_batch(), "bytes_per_image": splan.bytes_per_image()}
        print(f"  extraction for {label}: {t:.2f} s", flush=True)
    # Analysis of every default score (fitted ones fitted on a 256-image training cache)
    train_cache = os.path.join(args.workdir, "bench_train.h5")
    train_x, train_labels, test_x = images_cpu[0::2], labels_cpu[0::2], images_cpu[1::2]   # every class in both
    _extract(model, train_x, train_cache, default_scores(), {}, bs, device, sha, labels=train_labels)
    _extract(model, images_cpu, f, default_scores(), {}, bs, device, sha)
    every = {}
    with CacheReader(f) as reader, CacheReader(train_cache) as tr:
        from gradood.analyze.fitting import fit_estimator, score_cache
        from gradood.analyze.registry import entry
        for s in default_scores():
            t = time.perf_counter()
            e = entry(s)
            try:
                score_cache(reader, s, fit_estimator(tr, s) if e.fitted else e.make())
                every[s] = {"seconds": time.perf_counter() - t, "fitted": e.fitted}
            except Exception as err:       # e.g. SHE without a correct training row of a class
                every[s] = {"error": f"{type(err).__name__}: {err}"[:160], "fitted": e.fitted}
    os.remove(f)
    os.remove(train_cache)

    # pytorch-ood's detectors, each running the network, against one extraction
    ptood = pytorch_ood_comparison(torch, model, train_x.to(device), train_labels.to(device), test_x.to(device),
                                   bs, device, args.workdir, timed, sha)
    print("  pytorch-ood: " + ("not installed (pip install pytorch-ood); row skipped" if ptood is None else
                               f"{ptood['theirs_total_seconds']:.1f} s vs ours {ptood['ours_total_seconds']:.1f} s"),
          flush=True)
    rss_comparison = _peak_rss_mib()

    # Cache size per storage policy (the first policy-images images).
    n_pol = min(args.policy_images, n)
    policies = {}
    sources = {}
    for policy in POLICY_NAMES:
        f = os.path.join(args.workdir, f"policy-{policy}.h5")
        t, (fp, pplan) = timed(lambda: _extract(model, images_cpu[:n_pol], f, list(SCORES), {"*": policy}, bs, device, sha))
        policies[policy] = {"images": n_pol, "bytes_on_disk": os.path.getsize(fp),
                            "disk_bytes_per_image": os.path.getsize(fp) / n_pol,
                            "uncompressed_bytes_per_image": pplan.bytes_per_image(),
                            "extraction_images_per_second": n_pol / t}
        sources[policy] = fp
        print(f"  policy {policy}: {policies[policy]['disk_bytes_per_image']:,.0f} bytes/image on disk", flush=True)

    # Default recipes: dry-run estimates.
    recipes = {
        "CIFAR (resnet18, 3x32x32)": _recipe_estimate(torch, "resnet18", 10, (3, 32, 32),
                                                       benchmark("cifar10").odin, device),
        "ImageNet (BiT-S-R101x1, 3x480x480)": _recipe_estimate(torch, "BiT-S-R101x1", 1000, (3, 480, 480),
                                                                benchmark("imagenet").odin, device),
    }
    for name, r in recipes.items():
        print(f"  recipe {name}: {r['bytes_per_image']:,} bytes/image (uncompressed estimate)", flush=True)

    # Bounded memory: a cache of several GiB analysed in a child process.
    big = {"requested_gib": args.big_cache_gb, "policy": args.big_cache_policy}
    if args.big_cache_gb > 0:
        target = int(args.big_cache_gb * GIB)
        free = shutil.disk_usage(args.workdir).free
        big["free_bytes_before"] = free
        if free < target + GIB:
            big["skipped"] = (f"not enough free disk in {args.workdir}: {free / GIB:.1f} GiB free, "
                              f"{(target + GIB) / GIB:.1f} GiB needed")
            print("  bounded-memory demo skipped: " + big["skipped"], flush=True)
        else:
            big_path = os.path.join(args.workdir, "bench_big.h5")
            print(f"  writing a {args.big_cache_gb:g} GiB cache ...", flush=True)
            big.update(build_big_cache(sources[args.big_cache_policy], big_path, target))
            print(f"  analysing {big['bytes_on_disk'] / GIB:.2f} GiB ({big['rows']:,} rows) in a child process ...", flush=True)
            child = run_child(big_path, args.workdir)
            big["child"] = child
            with CacheReader(sources[args.big_cache_policy]) as reader:
                k = min(8, reader.n_samples)
                big["first_rows_max_rel_err_vs_source"] = max(
                    rel_err(child["scores"][s]["first"][:k], compute_score(reader, s)[:k]) for s in SCORES)
            if not args.keep:
                os.remove(big_path)
            big["kept"] = big_path if args.keep else None
    if not args.keep:
        for f in [main_cache] + list(sources.values()):
            if os.path.exists(f):
                os.remove(f)

    # Bars.
    missed = []
    if extraction["ratio_to_authors_gradient_passes"] > BAR_EXTRACTION_RATIO:
        missed.append(f"extraction / authors' passes = {extraction['ratio_to_authors_gradient_passes']:.3f} > {BAR_EXTRACTION_RATIO}")
    if not extraction["bit_identical_to_full_depth"]:
        missed.append("the truncated extraction differs from the full-depth one")
    if ptood is not None and ptood["ours_total_seconds"] * 2 > ptood["theirs_total_seconds"]:
        missed.append(f"pytorch-ood / ours = {ptood['theirs_total_seconds'] / ptood['ours_total_seconds']:.2f} < 2")
    for s, bar in BAR_SPEEDUP.items():
        if speedup[s] < bar:
            missed.append(f"{s}: authors' pass / analysis = {speedup[s]:.0f}x < {bar:.0f}x")
    for s, e in agreement.items():
        if e > BAR_AGREEMENT:
            missed.append(f"{s}: max relative error vs the authors' procedure {e:.1e} > {BAR_AGREEMENT:g}")
    if "child" in big:
        if big["child"]["peak_rss_bytes"] >= BAR_CHILD_RSS_BYTES:
            missed.append(f"analysis child peak RSS {big['child']['peak_rss_bytes'] / 2**20:.0f} MiB >= 1 GB")
        if big["bytes_on_disk"] < big["requested_gib"] * GIB:
            missed.append(f"demo cache {big['bytes_on_disk'] / GIB:.2f} GiB < {big['requested_gib']:g} GiB")
        if big["child"]["torch_imported"]:
            missed.append("the analysis child imported torch")

    res = {
        "device": _device_description(torch, device), "device_type": device.type,
        "torch_version": torch.__version__, "python": platform.python_version(),
        "model": model_what, "images_description": images_what, "images": n, "batch_size": bs,
        "gradnorm_batch1_images_timed": n_gn, "authors": authors, "extraction": extraction,
        "analysis": analysis, "speedup_authors_pass_over_analysis": speedup,
        "authors_frozen": lean, "extraction_per_score_set": per_set, "analysis_every_default_score": every,
        "pytorch_ood": ptood,
        "max_relative_error_vs_authors": agreement, "policies": policies,
        "default_recipes": recipes, "bounded_memory": big,
        "peak_rss_mib_after_comparison": rss_comparison, "peak_rss_mib": _peak_rss_mib(),
        "bars": {"extraction_ratio_max": BAR_EXTRACTION_RATIO, "speedup_min": BAR_SPEEDUP,
                 "child_peak_rss_max_bytes": BAR_CHILD_RSS_BYTES, "agreement_max_rel_err": BAR_AGREEMENT},
        "missed_bars": missed, "wall_seconds": time.perf_counter() - wall0,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    text = render_markdown(res)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    print()
    print(text)


def _ms(seconds):
    return f"{seconds * 1e3:.2f}"


def render_markdown(res):
    """The benchmark's tables as Markdown, from the ``results.json`` dict."""
    n, ext, a = res["images"], res["extraction"], res["authors"]
    gn = a["gradnorm"]
    gn_note = (f" GradNorm at batch size 1 was timed on the first {gn['measured_images']} images "
               f"({gn['measured_seconds']:.2f} s) and scaled to {n} images (marked †)."
               if gn["extrapolated"] else "")
    L = ["# gradood benchmark", "",
         f"Device: **{res['device']}** ({res['device_type']}); torch {res['torch_version']}, "
         f"Python {res['python']}. Model: {res['model']}. Images: {res['images_description']}; "
         f"N = {n}, batch size {res['batch_size']}.{gn_note}", "",
         "## Table 1. Authors' passes vs one extraction", "",
         "GAIA passes and our extraction: median of 3 runs (single runs vary by up to 2x on this "
         "shared machine); GradNorm at batch size 1: one run.", "",
         "| procedure | scores served | time (s) | images/s |", "|---|---|---:|---:|"]
    for s in GRADIENT_SCORES:
        mark = " †" if s == "gradnorm" and gn["extrapolated"] else ""
        L.append(f"| authors: {a[s]['procedure']} | {s} | {a[s]['seconds']:.2f}{mark} | {a[s]['images_per_second']:.1f} |")
    L.append(f"| **authors: sum of the three gradient passes** | gaia_z, gaia_a, gradnorm | "
             f"**{ext['authors_gradient_passes_seconds']:.2f}** | {n / ext['authors_gradient_passes_seconds']:.1f} |")
    L.append(f"| authors: {a['msp']['procedure'].replace('msp', 'MSP / energy')} | msp, energy | "
             f"{a['msp']['seconds']:.2f} | {a['msp']['images_per_second']:.1f} |")
    L.append(f"| authors, parameters frozen (GAIA-Z + GAIA-A passes; GradNorm as above) | gaia_z, gaia_a, gradnorm | "
             f"{ext['authors_frozen_passes_seconds']:.2f} | {n / ext['authors_frozen_passes_seconds']:.1f} |")
    L.append(f"| ours, full-depth backward passes (for comparison) | {', '.join(ext['scores'])} | "
             f"{ext['full_depth_seconds']:.2f} | {n / ext['full_depth_seconds']:.1f} |")
    L.append(f"| **ours: one extraction (forward + 3 truncated backward objectives, cache written)** | "
             f"{', '.join(ext['scores'])} | **{ext['seconds']:.2f}** | {ext['images_per_second']:.1f} |")
    L += ["", f"Ratio ours / authors' gradient passes: **{ext['ratio_to_authors_gradient_passes']:.3f}** "
          f"(bar ≤ {res['bars']['extraction_ratio_max']}); counting the baselines' forward pass too: "
          f"{ext['seconds'] / ext['authors_all_passes_seconds']:.3f}; against the authors' passes with frozen "
          f"parameters: {ext['ratio_to_authors_frozen_passes']:.3f}. The authors' passes run as their code "
          "does (parameters requiring grad, hooks on module outputs, backward from the output to the "
          "input). Every array of our cache is bit-identical to a full-depth extraction: "
          f"**{'yes' if ext['bit_identical_to_full_depth'] else 'NO'}**. The cache holds "
          f"{ext['cache_bytes_per_image_on_disk']:,.0f} bytes/image on disk.", "",
          "## Table 2. Each score: authors' pass vs analysis from the cache", "",
          f"Analysis: `analyze.fitting.score_cache` on the open cache, {res['analysis']['gaia_z']['repeats']} "
          f"runs (median, min; the first run in parentheses). Speed-up = authors' pass time / median analysis time.", "",
          "| score | authors' pass (s) | analysis median (ms) | min (ms) | speed-up | bar | max rel. error vs authors |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for s in SCORES:
        an = res["analysis"][s]
        bar = res["bars"]["speedup_min"].get(s)
        mark = " †" if s == "gradnorm" and gn["extrapolated"] else ""
        L.append(f"| {s} | {a[s]['seconds']:.2f}{mark} | {_ms(an['median_seconds'])} ({_ms(an['first_seconds'])}) | "
                 f"{_ms(an['min_seconds'])} | {res['speedup_authors_pass_over_analysis'][s]:,.0f}x | "
                 f"{f'≥ {bar:.0f}x' if bar else '-'} | {res['max_relative_error_vs_authors'][s]:.1e} |")
    pol = res["policies"]
    n_pol = next(iter(pol.values()))["images"]
    L += ["", "The authors' side for msp and energy is one forward pass without gradients (the same "
          "pass serves both).", "",
          f"## Table 3. Cache size per storage policy ({n_pol} images, scores {', '.join(SCORES)})", "",
          "| policy | on disk (bytes/image) | uncompressed estimate (bytes/image) | on disk / estimate | extraction (images/s) |",
          "|---|---:|---:|---:|---:|"]
    for name, v in pol.items():
        L.append(f"| {name} | {v['disk_bytes_per_image']:,.0f} | {v['uncompressed_bytes_per_image']:,} | "
                 f"{v['disk_bytes_per_image'] / v['uncompressed_bytes_per_image']:.2f} | {v['extraction_images_per_second']:.1f} |")
    L += ["", "On disk = file size / images (includes the head and attributes); estimate = "
          "`ExtractionPlan.bytes_per_image()` (`extract --dry-run`).", "",
          "## Table 4. Default recipes (dry-run estimate, policy `scores`, default scores)", "",
          "| recipe | hooked layers | objectives | bytes/image (uncompressed) | 50,000 images | 1,281,167 images |",
          "|---|---:|---|---:|---:|---:|"]
    for name, r in res["default_recipes"].items():
        b = r["bytes_per_image"]
        L.append(f"| {name} | {r['layers']} | {', '.join(r['objectives'])} | {b:,} ({b / 1024:.1f} KiB) | "
                 f"{b * 50000 / GIB:.2f} GiB | {b * 1281167 / GIB:.1f} GiB |")
    L += ["", "Default scores: " + ", ".join(next(iter(res["default_recipes"].values()))["scores"]) + ".", "",
          "## Table 5. Bounded memory: analysis of a large cache in a child process", ""]
    big = res["bounded_memory"]
    if "child" in big:
        c = big["child"]
        L += [f"A cache of **{big['bytes_on_disk'] / GIB:.2f} GiB** on disk ({big['rows']:,} rows, policy "
              f"`{big['policy']}`; rows are a {big['source_rows']}-image extraction tiled, {big['variants'] - 1} of every "
              f"{big['variants']} copies with {big['noise']:g} relative noise on float data; written in "
              f"{big['seconds']:.1f} s) analysed by a fresh interpreter that imports no torch "
              f"({c['wall_seconds']:.1f} s wall including start-up).", "",
              "| score | analysis time (s) | rows |", "|---|---:|---:|"]
        for s in SCORES:
            L.append(f"| {s} | {c['scores'][s]['seconds']:.2f} | {c['scores'][s]['n']:,} |")
        hwm = f"{c['vm_hwm_kib'] / 1024:.0f} MiB" if c["vm_hwm_kib"] else "n/a"
        tm = f"{c['usr_bin_time_maxrss_kib'] / 1024:.0f} MiB" if c["usr_bin_time_maxrss_kib"] else "n/a"
        L += ["", f"Peak RSS of the analysis child: **{c['peak_rss_bytes'] / 2**20:.0f} MiB** (VmHWM {hwm}; "
              f"/usr/bin/time {tm}; bar < 1 GB). `RUSAGE_CHILDREN` reports "
              f"{c['rusage_children_maxrss_kib'] / 1024:.0f} MiB, an upper bound that includes the parent's "
              f"high-water mark carried across exec. First rows' scores vs the source cache: max relative "
              f"error {big['first_rows_max_rel_err_vs_source']:.1e}."]
    elif "skipped" in big:
        L.append(f"Skipped: {big['skipped']}.")
    else:
        L.append("Skipped (`--big-cache-gb 0`).")
    L += ["", f"## Table 6. Extraction per score set ({n} images)", "",
          "| scores | passes per batch | time (s) | images/s | bytes/image |", "|---|---|---:|---:|---:|"]
    for label, v in res["extraction_per_score_set"].items():
        L.append(f"| {label} | {v['passes']} | {v['seconds']:.2f} | {v['images_per_second']:.1f} | {v['bytes_per_image']:,} |")
    L += ["", f"## Table 7. Every default score from the cache ({n} images; fitted scores fitted on a "
          "256-image training cache, fit included)", "", "| score | fitted | time (ms) |", "|---|---|---:|"]
    for name, v in res["analysis_every_default_score"].items():
        L.append(f"| {name} | {'yes' if v['fitted'] else ''} | "
                 + (_ms(v["seconds"]) if "seconds" in v else f"not run: {v['error']}") + " |")
    pt = res.get("pytorch_ood")
    L += ["", "## Table 8. pytorch-ood's detectors vs one extraction", ""]
    if pt is None:
        L.append("Skipped: pytorch-ood is not installed (`.venv/bin/pip install pytorch-ood` to run this row).")
    else:
        L += [f"pytorch-ood {pt['version']}: each detector fitted on the {pt['train_images']} training images and run "
              f"on the {pt['test_images']} test images, each running the network itself. Ours: one extraction of "
              f"both sets serving all of them ({pt['ours_extraction_seconds']:.2f} s), then each score from the caches, "
              "fit included.", "", "| score | pytorch-ood fit + predict (s) | ours from the cache |", "|---|---:|---:|"]
        for name in PTOOD_SCORES:
            th = pt["theirs"][name]
            ours_ms = _ms(pt["ours_analysis"][name]["seconds"]) + " ms"
            L.append(f"| {name} | {th['seconds']:.2f} | {ours_ms} |" if "seconds" in th
                     else f"| {name} | failed: {th['error']} | {ours_ms} |")
        L += [f"| **total** | **{pt['theirs_total_seconds']:.2f}** | **{pt['ours_total_seconds']:.2f}** (extraction "
              "included" + ("; ours counts every score, also those pytorch-ood could not run"
                            if len(pt["compared"]) < len(PTOOD_SCORES) else "") + ") |",
              "", f"pytorch-ood / ours: **{pt['theirs_total_seconds'] / pt['ours_total_seconds']:.1f}x** (goal ≥ 2x; "
              f"totals over the scores both ran: {', '.join(pt['compared'])})."]
    L += ["", "## Memory and time", "",
          f"Peak RSS of the benchmark process: {res['peak_rss_mib_after_comparison']:.0f} MiB after Tables 1-2, "
          f"{res['peak_rss_mib']:.0f} MiB overall (includes the BiT-S-R101x1 probe at 480x480). "
          f"Total benchmark wall time: {res['wall_seconds']:.0f} s.", "",
          "Bars missed: " + ("; ".join(res["missed_bars"]) if res["missed_bars"] else "none") + "."]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
