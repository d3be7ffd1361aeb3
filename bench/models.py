"""Benchmark (not a test): extraction speed of every default score a model serves, for
ImageNet-sized models at 224x224 (random weights and images: the speed does not depend on
them), against one plain forward pass of the same model.

    .venv/bin/python bench/models.py [--arch torchvision:vit_b_16 ...] [--images 32] [--batch-size 16]

Writes ``bench/models.json`` and ``bench/models.md`` and prints the Markdown.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_ARCHS = ("torchvision:resnet50", "torchvision:vit_b_16")


def measure(arch, n_images, batch_size, side, device):
    """``{arch, served, refused, forward_ips, extract_ips, ...}`` for one model."""
    import torch

    from gradood.analyze.registry import default_scores, requirements
    from gradood.extract import ExtractConfig, Provenance
    from gradood.extract.runner import extract_to_cache
    from gradood.extract.adapters import adapter_for
    from gradood.extract.adapters.serves import unserved
    from gradood.extract.models import build_model
    from gradood.extract.runner import as_image_set

    torch.manual_seed(0)
    model = build_model(arch, 1000).to(device).requires_grad_(False)
    adapter = adapter_for(model, (3, side, side))
    served, refused = [], {}
    for name in default_scores():
        why = unserved(adapter, *requirements([name]))
        (refused.__setitem__(name, why[0]) if why else served.append(name))
    needs, passes = requirements(served)
    images = torch.randn(n_images, 3, side, side, generator=torch.Generator().manual_seed(1))
    dataset = as_image_set(torch.utils.data.TensorDataset(images, torch.zeros(n_images, dtype=torch.long)))
    with torch.no_grad():
        model(images[:batch_size].to(device))                     # warm-up
        t0 = time.perf_counter()
        for i in range(0, n_images, batch_size):
            model(images[i:i + batch_size].to(device))
        forward = time.perf_counter() - t0
    config = ExtractConfig(arch=arch, needs=needs, passes=passes, batch_size=batch_size,
                           device=str(device), progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        extract_to_cache(model, dataset, os.path.join(tmp, "set.h5"), config, Provenance(dataset="set"))
        extract = time.perf_counter() - t0
    return {"arch": arch, "model": type(model).__name__, "served": served, "refused": refused,
            "images": n_images, "batch_size": batch_size, "side": side,
            "forward_ips": n_images / forward, "extract_ips": n_images / extract,
            "objectives": [o for o in ("max_logit", "log_softmax_sum", "feature_sum")
                           if any(s == o for _, s, _ in needs)]}


def render(results, device):
    lines = [f"# Extraction speed per model ({device}, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores)", "",
             "| model | images | batch | plain forward (img/s) | extraction of every served default score (img/s) | ratio | scores served | not served |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| `{r['arch']}` ({r['model']}, {r['side']}x{r['side']}) | {r['images']} | {r['batch_size']} | "
                     f"{r['forward_ips']:.2f} | {r['extract_ips']:.2f} | {r['forward_ips'] / r['extract_ips']:.1f}x | "
                     f"{len(r['served'])} | {', '.join(r['refused']) or '-'} |")
    lines.append("")
    lines.append("The extraction runs one forward pass and one truncated backward pass per objective "
                 "(GAIA-A, GAIA-Z, NAC-UE, GradNorm's head gradient follows from the head input) and "
                 "writes the cache; ratio = how many plain forward passes one extraction costs.")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", help=f"model (repeatable) [default: {', '.join(DEFAULT_ARCHS)}]")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    import torch
    device = torch.device(args.device)
    results = [measure(a, args.images, args.batch_size, args.size, device) for a in args.arch or DEFAULT_ARCHS]
    text = render(results, args.device)
    with open(os.path.join(ROOT, "bench", "models.json"), "w") as f:
        json.dump({"device": args.device, "torch": torch.__version__, "results": results}, f, indent=1)
    with open(os.path.join(ROOT, "bench", "models.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
