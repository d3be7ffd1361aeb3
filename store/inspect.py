"""Readable summary of one cache file (``pipeline.py inspect``)."""
import json
import os

from .reader import CacheReader
from .schema import head_label
from .writer import covered_rows, list_parts, parts_dir


def summary(path):
    """Multi-line text: provenance, sample counts (skipped and subset), hook sets, stored
    statistics, size; for an unfinished extraction, how many rows of how many are done.
    ``path`` may also be the ``<cache>.h5.parts`` folder of an unfinished run."""
    if path.endswith(".parts") and os.path.isdir(path):
        path = path[:-len(".parts")]
    with CacheReader(path, allow_partial=True) as r:
        a = r.attrs
        size = os.path.getsize(path) if os.path.exists(path) else 0
        if r.partial:
            with open(os.path.join(parts_dir(path), "run.json")) as f:
                total = json.load(f)["n_samples"]
            done = covered_rows(list_parts(parts_dir(path)))
            count = (f"{done} of {total} samples extracted (PARTIAL: unfinished; {r.n_samples} "
                     "readable from row 0 with --allow-partial)")
        else:
            skipped = int(a.get("n_skipped", 0))
            count = f"{r.n_samples} samples" + (f", {skipped} skipped (unreadable)" if skipped else "")
        subset = a.get("subset") or {}
        if subset.get("limit"):
            count += f"; subset: first {subset['limit']}" if not subset.get("balanced") else \
                f"; subset: {subset['limit']} class-balanced"
        lines = [
            f"cache        {path}" + ("  (PARTIAL: unfinished extraction)" if r.partial else ""),
            f"schema       v{a['schema_version']}, complete={a['complete']}",
            f"dataset      {a['dataset']} ({a.get('split', '?')}), {count}",
            f"source       {a.get('dataset_root', '?')}" + (f"  (benchmark {a['benchmark']})" if a.get("benchmark") else ""),
            f"model        {a['arch']}, {a['num_classes']} classes, head {head_label(a)} "
            f"({a.get('family', '?')} adapter)" + (f", features from {a['features']}" if a.get("features") else "")
            + f", checkpoint {a.get('checkpoint', '?')}",
            f"sha256       file {a['checkpoint_sha256']}; weights {a.get('weights_sha256') or '-'}",
            f"preprocess   {a['preprocess']}",
            f"objectives   {', '.join(a['objectives']) or '-'}",
            "odin         " + (", ".join(f"T={p[0]:g} eps={p[1]:g}" + (" /std" if len(p) > 2 and p[2] else "")
                                         for p in a.get("odin") or []) or "-"),
            f"made with    torch {a.get('torch_version', '?')} on {a.get('device', '?')}, batch size "
            f"{a.get('batch_size', '?')}, {a.get('created', '')}",
            f"size         {size / 2**20:.2f} MiB, {size / max(r.n_samples, 1) / 1024:.1f} KiB per sample",
            "hook sets    " + "; ".join(f"{k}: {len(v)} layers" for k, v in a["hook_sets"].items()),
            "layers:",
        ]
        layouts = a.get("layer_layouts") or {}
        for layer in a["layers"]:
            stored = "; ".join(f"{src}: {','.join(st)}" for src, st in a["plan"].get(layer, {}).items())
            lines.append(f"  {layer:36s} {str(a['layer_shapes'][layer]):16s} {layouts.get(layer, 'NCHW'):5s} "
                         f"{(a.get('policies') or {}).get(layer, ''):7s} {stored}")
    return "\n".join(lines)
