"""Benchmark (not a test): the cost of ``analyze --ci`` on the demo caches.

Times the bootstrap intervals of every servable score on every demo OOD set (1,000
resamples, ID and OOD resampled independently), apart from the scoring itself: the
evaluation runs once without and once with ``ci=95`` on the same caches and fits, and the
difference is the intervals' cost. Uses ``caches/demo-resnet18`` (``make demo``); builds
the demo caches there first when they are missing (about 2 minutes). Prints one line and
writes ``bench/ci.json``.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    from gradood.analyze.api import default_ood_sets
    from gradood.analyze.engine import Engine
    from gradood.analyze.evaluator import run_evaluation
    from gradood.analyze.registry import all_entries
    cache_dir = os.path.join(ROOT, "caches", "demo-resnet18")
    if not os.path.exists(os.path.join(cache_dir, "digits.h5")):
        subprocess.run([sys.executable, "pipeline.py", "demo", "--extract-only", "--cache-dir", cache_dir],
                       cwd=ROOT, check=True)
    engine = Engine(cache_dir, "digits")
    oods = default_ood_sets(cache_dir, "digits", engine.fit_caches(list(all_entries())))
    names, _ = engine.servable(list(all_entries()), {}, oods)
    fitted = tempfile.mkdtemp()
    run_evaluation(cache_dir, "digits", oods, names, fitted_dir=fitted, lenient=True)     # fits, once
    t = time.perf_counter()
    plain = run_evaluation(cache_dir, "digits", oods, names, fitted_dir=fitted, lenient=True)
    base = time.perf_counter() - t
    t = time.perf_counter()
    with_ci = run_evaluation(cache_dir, "digits", oods, names, fitted_dir=fitted, lenient=True, ci=95)
    total = time.perf_counter() - t
    n_scores = len(with_ci.intervals)
    sizes = {d: with_ci.n_rows[d] for d in ["digits", *oods]}
    result = {"scores": n_scores, "ood_sets": len(oods), "resamples": with_ci.ci["resamples"],
              "rows": sizes, "evaluation_s": base, "with_ci_s": total, "ci_s": total - base,
              "cores": os.cpu_count()}
    assert plain.results == with_ci.results
    with open(os.path.join(ROOT, "bench", "ci.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"--ci 95 over {n_scores} scores x {len(oods)} OOD sets ({result['resamples']} resamples; rows "
          f"{sizes}): {total - base:.1f} s beyond the {base:.1f} s evaluation, on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
