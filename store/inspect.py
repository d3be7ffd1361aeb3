"""Readable summary of one cache file (``pipeline.py inspect``)."""
import os

from .reader import CacheReader


def summary(path):
    """Multi-line text: provenance, sample count, hook sets, stored statistics, size."""
    with CacheReader(path, allow_partial=True) as r:
        a = r.attrs
        size = os.path.getsize(path) if os.path.exists(path) else 0
        lines = [
            f"cache        {path}" + ("  (PARTIAL: unfinished extraction)" if r.partial else ""),
            f"schema       v{a['schema_version']}, complete={a['complete']}",
            f"dataset      {a['dataset']} ({a.get('split', '?')}), {r.n_samples} samples, root {a.get('dataset_root', '?')}",
            f"model        {a['arch']}, {a['num_classes']} classes, checkpoint {a.get('checkpoint', '?')}",
            f"sha256       {a['checkpoint_sha256']}",
            f"preprocess   {a['preprocess']}",
            f"objectives   {', '.join(a['objectives']) or '-'}",
            f"made with    torch {a.get('torch_version', '?')} on {a.get('device', '?')}, {a.get('created', '')}",
            f"size         {size / 2**20:.2f} MiB, {size / max(r.n_samples, 1) / 1024:.1f} KiB per sample",
            "hook sets    " + "; ".join(f"{k}: {len(v)} layers" for k, v in a["hook_sets"].items()),
            "layers:",
        ]
        for layer in a["layers"]:
            stored = "; ".join(f"{src}: {','.join(st)}" for src, st in a["plan"].get(layer, {}).items())
            lines.append(f"  {layer:36s} {str(a['layer_shapes'][layer]):16s} "
                         f"{a['policies'].get(layer, ''):7s} {stored}")
    return "\n".join(lines)
