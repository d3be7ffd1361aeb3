"""Scale benchmark (not a test): fitted scores on ImageNet-shaped caches, no model.

Writes synthetic caches in the schema (``store.synthetic``: 1000 class-clustered classes,
2048-d ReLU features, a random head) with 50k, 200k and 1,281,167 training rows (the
largest only when the disk has room: it says so otherwise), a 45k-row ID test cache and
two 10k-row OOD caches, and reports per fitted score and size, each in a fresh child
process (``os.wait4`` gives its own peak RSS): fit time, the time to score the 65k test
rows, and peak RSS. At the largest size it also runs the command a researcher would,
``pipeline.py analyze --score knn,vim,...`` over the three test caches, and reports its
wall time and peak RSS. Read throughput: the 45k x 2048 test features in today's layout
(uncompressed float chunks) and in the earlier gzip layout.

Writes ``bench/scale.json`` and ``bench/scale.md``. ``python bench/scale.py --help``.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = (50_000, 200_000, 1_281_167)
FITTED = ("knn", "vim", "mahalanobis", "rmds", "react", "dice", "nac")
PLAIN = ("msp", "energy")
ID, OODS = "imagenet_syn", ("ood_near_syn", "ood_far_syn")


def _child(args):
    """Fit one score on the training cache and score the test caches; print JSON."""
    from gradood.analyze.fitting import fit_estimator, score_cache
    from gradood.analyze.metrics import ood_metrics
    from gradood.analyze.registry import entry
    from gradood.store.reader import CacheReader, cache_path
    name, folder, train = args.child, args.dir, args.train
    params = json.loads(args.params or "{}")
    e = entry(name)
    t0 = time.perf_counter()
    if e.fitted:
        with CacheReader(cache_path(folder, train)) as r:
            est = fit_estimator(r, name, params)
    else:
        est = e.make(params)
    t1 = time.perf_counter()
    scores = {}
    for dataset in (ID, *OODS):
        with CacheReader(cache_path(folder, dataset)) as r:
            scores[dataset] = score_cache(r, name, est, params)
    t2 = time.perf_counter()
    auroc = {o: ood_metrics(scores[ID], scores[o])["AUROC"] for o in OODS}
    print(json.dumps({"fit_s": t1 - t0, "score_s": t2 - t1, "auroc": auroc}))


def size_params(n):
    """Score parameters that must follow the training size: NAC-UE's O counts training
    states, so the CIFAR-10 O = 50 saturates every interval here from 50k rows on (every
    score equal). On these caches the median count of an occupied (interval, neuron) is
    about n / 85; O = n / 40 keeps the coverage informative (chosen on a 20k-row cache:
    O = 50 gives a constant score, O = 500 separates, O = 5000 inverts)."""
    return {"nac": {"O": max(50, round(n / 40))}}


def measured(cmd):
    """Run ``cmd``; ``(stdout, stderr, rc, wall s, peak RSS bytes)`` of that child alone."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, text=True)
    # read the pipes on threads so a chatty child never blocks, then reap it with wait4
    import threading
    chunks = {"out": [], "err": []}
    readers = [threading.Thread(target=lambda s, k: chunks[k].append(s.read()), args=(p.stdout, "out")),
               threading.Thread(target=lambda s, k: chunks[k].append(s.read()), args=(p.stderr, "err"))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(p.pid, 0)
    for r in readers:
        r.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    return "".join(chunks["out"]), "".join(chunks["err"]), p.returncode, time.perf_counter() - t, usage.ru_maxrss * 1024


def read_throughput(path):
    """MB/s reading the features of ``path`` block by block, today's layout and gzip."""
    import h5py
    from gradood.store.reader import CacheReader
    out = {}
    with CacheReader(path) as r:
        x = r.read("features", 0, r.n_samples)
    gz = path + ".gzip.h5"
    with h5py.File(gz, "w") as f:
        f.create_dataset("features", data=x, chunks=(64, x.shape[1]), compression="gzip",
                         compression_opts=1, shuffle=True, fletcher32=True)
    for label, file in (("uncompressed (today)", path), ("gzip-1 + shuffle (before)", gz)):
        with h5py.File(file, "r") as f:
            ds = f["features"]
            ds[0:4096]
            t = time.perf_counter()
            for a in range(0, len(x), 4096):
                ds[a:a + 4096]
            out[label] = {"MB_per_s": x.nbytes / 1e6 / (time.perf_counter() - t),
                          "file_MB": os.path.getsize(file) / 1e6}
    os.remove(gz)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "gradood-scale"),
                    help="Folder for the synthetic caches (several GB; removed at the end unless --keep).")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="Training rows, comma-separated.")
    ap.add_argument("--scores", default=",".join(FITTED + PLAIN))
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--test-rows", type=int, default=45_000)
    ap.add_argument("--ood-rows", type=int, default=10_000)
    ap.add_argument("--keep", action="store_true", help="Keep the caches.")
    ap.add_argument("--cli-at", type=int, default=max(SIZES), help="Training size at which the analyze command runs too.")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--train", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    from gradood.store.reader import cache_path
    from gradood.store.synthetic import write_synthetic
    import threadpoolctl
    blas = [{k: i.get(k) for k in ("internal_api", "architecture", "num_threads", "version")}
            for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]
    scores = args.scores.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    os.makedirs(args.dir, exist_ok=True)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "blas": blas}, "dim": args.dim, "classes": args.classes,
              "test_rows": args.test_rows, "ood_rows": args.ood_rows, "sizes": {}, "skipped_sizes": {}}
    earlier = os.path.join(ROOT, "bench", "scale.json")
    if os.path.exists(earlier):        # sizes measured before (same shapes) stay unless re-measured
        with open(earlier) as f:
            old = json.load(f)
        if all(old.get(k) == report[k] for k in ("dim", "classes", "test_rows", "ood_rows")):
            report["sizes"] = {k: v for k, v in old["sizes"].items() if int(k) not in sizes}
    row_bytes = 4 * (args.dim + args.classes) + 64
    t = time.perf_counter()
    write_synthetic(cache_path(args.dir, ID), args.test_rows, args.classes, args.dim, seed=1)
    for i, name in enumerate(OODS):
        write_synthetic(cache_path(args.dir, name), args.ood_rows, args.classes, args.dim, seed=2 + i,
                        novel=(0.5, 1.0)[i])
    print(f"test caches written in {time.perf_counter() - t:.1f} s", flush=True)
    report["read"] = read_throughput(cache_path(args.dir, ID))
    print(json.dumps(report["read"]), flush=True)
    for n in sizes:
        need = n * row_bytes
        free = shutil.disk_usage(args.dir).free
        if need * 1.1 + (2 << 30) > free:
            report["skipped_sizes"][n] = f"needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"
            print(f"skipping {n} training rows: {report['skipped_sizes'][n]}", flush=True)
            continue
        train = f"{ID}_train{n}"
        t = time.perf_counter()
        write_synthetic(cache_path(args.dir, train), n, args.classes, args.dim, seed=100, split="train")
        wrote = time.perf_counter() - t
        entry = {"write_s": wrote, "write_MB_per_s": need / 1e6 / wrote, "train_GB": os.path.getsize(cache_path(args.dir, train)) / 1e9, "scores": {}}
        print(f"{n} training rows written in {wrote:.1f} s", flush=True)
        report["sizes"][n] = entry
        if n == args.cli_at:         # first: the command a researcher runs, KNN's full bank included
            results = os.path.join(args.dir, "results")
            cmd = [sys.executable, "pipeline.py", "analyze", "--cache-dir", args.dir, "--id", ID,
                   *sum((["--ood", o] for o in OODS), []), "--fit-on", train, "--score", ",".join(scores),
                   "--results", results,
                   *sum((["--param", f"{sc}.{k}={v}"] for sc, p in size_params(n).items() for k, v in p.items()), [])]
            out, err, rc, wall, rss = measured(cmd)
            entry["analyze"] = {"command": " ".join(cmd[1:]), "rc": rc, "wall_s": wall, "peak_rss_GB": rss / 1e9,
                                "tail": (out + err).strip().splitlines()[-25:]}
            print(json.dumps(entry["analyze"], indent=1), flush=True)
            save(report)
        for name in scores:
            if n == args.cli_at and name == "knn":
                continue       # its time is the analyze run's less the others' (40 min here: run once)
            out, err, rc, wall, rss = measured([sys.executable, __file__, "--child", name, "--dir", args.dir,
                                                "--train", train, "--params", json.dumps(size_params(n).get(name, {}))])
            if rc != 0:
                entry["scores"][name] = {"error": err.strip().splitlines()[-1] if err.strip() else f"rc {rc}"}
            else:
                entry["scores"][name] = {**json.loads(out.strip().splitlines()[-1]), "peak_rss_GB": rss / 1e9, "wall_s": wall}
            print(n, name, json.dumps(entry["scores"][name]), flush=True)
            save(report)
        if not args.keep:
            os.remove(cache_path(args.dir, train))
    write_markdown(report)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


def save(report):
    """bench/scale.json and bench/scale.md as they stand (rewritten after every step)."""
    with open(os.path.join(ROOT, "bench", "scale.json"), "w") as f:
        json.dump(report, f, indent=1)
    write_markdown(report, quiet=True)


def write_markdown(report, quiet=False):
    """bench/scale.md: one table per training size, then the analyze run and the reads."""
    lines = ["# Scale benchmark (synthetic ImageNet-shaped caches)", "",
             f"{report['classes']} classes, {report['dim']}-d features; {report['test_rows']} ID test rows "
             f"+ 2 x {report['ood_rows']} OOD rows scored. Machine: {report['machine']['cores']} cores, "
             f"BLAS {report['machine']['blas']}.", ""]
    for n, entry in report["sizes"].items():
        lines += [f"## {int(n):,} training rows ({entry['train_GB']:.1f} GB cache, written at "
                  f"{entry['write_MB_per_s']:.0f} MB/s)", "",
                  f"| score | fit (s) | score {report['test_rows'] + 2 * report['ood_rows']:,} rows (s) | peak RSS (GB) | AUROC near / far |", "|---|---|---|---|---|"]
        for name, s in entry["scores"].items():
            if "error" in s:
                lines.append(f"| {name} | error: {s['error']} | | | |")
            else:
                au = " / ".join(f"{100 * v:.1f}" for v in s["auroc"].values())
                lines.append(f"| {name} | {s['fit_s']:.1f} | {s['score_s']:.1f} | {s['peak_rss_GB']:.2f} | {au} |")
        if "analyze" in entry:
            a = entry["analyze"]
            lines += ["", f"`{a['command']}`: rc {a['rc']}, {a['wall_s']:.0f} s, peak RSS {a['peak_rss_GB']:.2f} GB"]
            others = sum(s["fit_s"] + s["score_s"] for s in entry["scores"].values() if "fit_s" in s)
            if "knn" not in entry["scores"] and len(entry["scores"]):
                lines.append(f"KNN at this size (full bank, streamed), derived: the analyze run less the "
                             f"others' fit and score times = about {a['wall_s'] - others:.0f} s")
        lines.append("")
    for n, why in report["skipped_sizes"].items():
        lines.append(f"Skipped {int(n):,} training rows: {why}.")
    lines += ["", "| layout | read MB/s | file MB |", "|---|---|---|"]
    lines += [f"| {k} | {v['MB_per_s']:.0f} | {v['file_MB']:.0f} |" for k, v in report["read"].items()]
    with open(os.path.join(ROOT, "bench", "scale.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
