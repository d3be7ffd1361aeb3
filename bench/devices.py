"""CPU vs GPU caches (not a test): extract the same images on both devices and compare.

Extracts ``--images`` images (the demo images and checkpoint when ``make demo`` has run,
otherwise fixed random tensors and a random CIFAR ResNet-18, as ``bench/run.py``) once
on the CPU and once on CUDA, then reports for every score the largest absolute and
relative difference between the two caches (bar: 1e-5 relative), the GAIA-Z non-zero
counts that differ (entries and largest difference), and the GPU's images/second.
Writes ``bench/devices.json`` and ``bench/devices.md``. Needs a CUDA device; exits with
status 2 and a message otherwise.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)         # the package bench (helpers shared with the tests)

SCORES = ("gaia_z", "gaia_a", "gradnorm", "msp", "maxlogit", "energy", "odin")
BAR_RELATIVE = 1e-5


def compare_caches(cpu_path, gpu_path, scores=SCORES):
    """``{"scores": {score: {max_abs, max_rel}}, "counts": {...}}`` for two caches of the same images.

    Relative differences are taken against ``max(|cpu score|, 1e-12)``. Counts: every
    ``.../grad/<objective>/nonzero`` dataset, entries compared one by one.
    """
    import h5py

    from bench.helpers import compute_score
    from gradood.store.reader import CacheReader
    out = {"scores": {}, "counts": {"entries": 0, "differing": 0, "max_abs": 0, "by_layer": {}}}
    with CacheReader(cpu_path) as a, CacheReader(gpu_path) as b:
        for score in scores:
            sa, sb = compute_score(a, score), compute_score(b, score)
            diff = np.abs(sa.astype(np.float64) - sb)
            out["scores"][score] = {"max_abs": float(diff.max()),
                                    "max_rel": float((diff / np.maximum(np.abs(sa), 1e-12)).max())}
    with h5py.File(cpu_path, "r") as a, h5py.File(gpu_path, "r") as b:
        names = []
        a.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and n.endswith("/nonzero") else None)
        for name in names:
            ca, cb = a[name][...].astype(np.int64), b[name][...].astype(np.int64)
            differing = int(np.count_nonzero(ca != cb))
            out["counts"]["entries"] += ca.size
            out["counts"]["differing"] += differing
            out["counts"]["max_abs"] = max(out["counts"]["max_abs"], int(np.abs(ca - cb).max()))
            if differing:
                out["counts"]["by_layer"][name] = differing
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda", help="the CUDA device to compare with the CPU")
    p.add_argument("--workdir", default=os.path.join(ROOT, "bench", "out"))
    p.add_argument("--out", default=os.path.join(ROOT, "bench"))
    args = p.parse_args(argv)

    import torch

    from bench.run import _device_description, _extract, _load_images, _load_model
    if not torch.cuda.is_available():
        print("bench/devices.py: no CUDA device on this machine; run it where `nvidia-smi` "
              "lists a GPU", file=sys.stderr)
        return 2
    from gradood.extract.runner import select_device
    gpu = select_device(args.device)
    images, _, image_note = _load_images(torch, args.images)
    model, model_note, sha = _load_model(torch)
    os.makedirs(args.workdir, exist_ok=True)
    policies = {"*": "scores"}
    paths, seconds = {}, {}
    for name, device in (("cpu", torch.device("cpu")), ("gpu", gpu)):
        model.to(device)
        if device.type == "cuda":   # warm-up: CUDA context, cuDNN handles
            _extract(model, images[: args.batch_size], os.path.join(args.workdir, "warmup.h5"),
                     SCORES, policies, args.batch_size, device, sha)
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        paths[name], _ = _extract(model, images, os.path.join(args.workdir, f"device_{name}.h5"),
                                  SCORES, policies, args.batch_size, device, sha)
        seconds[name] = time.perf_counter() - t0
    result = compare_caches(paths["cpu"], paths["gpu"])
    result.update(images=image_note, model=model_note, n=len(images), batch_size=args.batch_size,
                  gpu=_device_description(torch, gpu), cpu=_device_description(torch, torch.device("cpu")),
                  seconds=seconds, images_per_second={k: len(images) / v for k, v in seconds.items()})
    worst = max(v["max_rel"] for v in result["scores"].values())
    result["bar_relative"] = BAR_RELATIVE
    result["passed"] = worst <= BAR_RELATIVE
    lines = [f"# CPU vs GPU caches", "",
             f"GPU: **{result['gpu']}**; CPU: {result['cpu']}. Model: {model_note}. Images: {image_note}; "
             f"N = {len(images)}, batch size {args.batch_size}, policy `scores`.", "",
             "| device | extraction (s) | images/s |", "|---|---:|---:|"]
    lines += [f"| {k} | {seconds[k]:.2f} | {result['images_per_second'][k]:.1f} |" for k in ("cpu", "gpu")]
    lines += ["", "| score | max abs diff | max rel diff |", "|---|---:|---:|"]
    lines += [f"| {s} | {v['max_abs']:.2e} | {v['max_rel']:.2e} |" for s, v in result["scores"].items()]
    c = result["counts"]
    lines += ["", f"GAIA-Z non-zero counts: {c['differing']:,} of {c['entries']:,} entries differ "
              f"(largest difference {c['max_abs']}). Bar: every score within {BAR_RELATIVE:g} "
              f"relative: {'met' if result['passed'] else 'MISSED'}."]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "devices.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out, "devices.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
