"""The extraction loop: one forward pass per batch, one backward pass per objective.

Per batch: forward with hooks (activation statistics), then for each objective a
backward pass that starts at the graph leaf placed by ``hooks.graph_start`` (parameters
are frozen, so no weight gradient is ever computed), then the rows are committed to the
cache as an atomic part (store.writer) by a background thread while the next batch
computes. Progress bar in images/second. Under torchrun each rank extracts its share of
the batches (extract.distributed).
"""
import datetime
import os
import shutil
import time

import numpy as np
import torch
import torchvision
from tqdm import tqdm

from store.recipes import SCORE_NEEDS, build_plan, objectives_for
from store.schema import (MAHA_ADVERSARIAL, MAHA_SCORES, SCHEMA_VERSION, TRACKING_PATH, fingerprint,
                          odin_path, stat_path)
from store.writer import BackgroundWriter, CacheWriter

from . import hooks as H
from .distributed import Shard, grid_batches
from .models import FAMILY, head_module, head_weight_bias
from .objectives import objective_value

TOOL_VERSION = "0.1.0"


def select_device(name):
    """``torch.device`` for ``auto``/``cpu``/``cuda[:i]``; CUDA math set to exact, repeatable fp32.

    On CUDA: TF32 off for matmul and cuDNN (TF32 rounds inputs to 10 mantissa bits,
    enough to flip exact zeros of gradients and so GAIA-Z's counts), cuDNN in
    deterministic mode without autotuning, so the same batch gives the same bits on
    every run. Atomics-based kernels that remain non-deterministic are not used by the
    backward passes of the supported models (convolution, batch norm, linear, ReLU).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda requested but no CUDA device is available; use --device cpu")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.set_float32_matmul_precision("highest")
    return torch.device(name)


def resolve_hooks(model, arch, hook_names, scores):
    """``{hook set or module name: [layer, ...]}`` for the requested hooks and the scores' needs."""
    wanted = list(hook_names)
    for score in scores:
        for set_name, _, _ in SCORE_NEEDS[score]:
            if set_name not in wanted:
                wanted.append(set_name)
    return {name: H.resolve_hook_set(model, arch, name) for name in wanted}


class ExtractionPlan:
    """Everything decided before the first batch: layers, shapes, objectives, storage.

    model: the network (eval mode, on its device). hook_sets: from ``resolve_hooks``.
    scores: score names. policies: ``{layer: policy}`` overrides (default ``scores``).
    image_shape: (3, H, W) of one preprocessed image.
    """

    def __init__(self, model, arch, hook_sets, scores, policies, image_shape, device,
                 odin_pairs=(), maha=None):
        self.hook_sets = hook_sets
        # maha: {"gaussians": LayerGaussians, "recipe": root attribute ``mahalanobis``} or None
        self.maha = maha
        self.odin_pairs = [[float(t), float(e)] for t, e in odin_pairs] if "odin" in scores else []
        if "odin" in scores and not self.odin_pairs:
            raise ValueError("score odin needs at least one (temperature, epsilon) pair (--odin T,EPS)")
        self.tracked = []
        if "tracking" in scores:
            from .tracking import tracked_parameters
            self.tracked = tracked_parameters(model)
        self.layers = _module_order(model, {l for ls in hook_sets.values() for l in ls})
        self.objectives = objectives_for(scores) if self.layers else []
        self.policies = {l: policies.get(l, policies.get("*", "scores")) for l in self.layers}
        self.plan = build_plan(hook_sets, scores, self.policies, self.objectives)
        for layer in self.layers:
            self.plan.setdefault(layer, {})
        self.start_module = H.graph_start(model, self.layers) if self.objectives else None
        weight, bias = head_weight_bias(model)
        self.num_classes, self.feature_dim = weight.shape
        self.layer_shapes = self._probe_shapes(model, image_shape, device)

    def _probe_shapes(self, model, image_shape, device):
        if not self.layers:
            return {}
        rec = H.Recorder(model, {l: {} for l in self.layers}, self.start_module)
        try:
            with torch.enable_grad():
                model(torch.zeros((1, *image_shape), device=device))
        finally:
            rec.close()
        return {l: (rec.shapes[l] + [1, 1])[:3] if len(rec.shapes[l]) == 1 else rec.shapes[l]
                for l in self.layers}

    def layout(self):
        """``{dataset path: (row shape, dtype)}`` of every per-sample dataset."""
        out = {"logits": ((self.num_classes,), np.float32), "features": ((self.feature_dim,), np.float32),
               "labels": ((), np.int64), "paths": ((), object), "skipped": ((), np.bool_),
               "skip_reasons": ((), object)}
        for layer, sources in self.plan.items():
            c = self.layer_shapes[layer][0]
            for source, stats in sources.items():
                for stat in stats:
                    shape = tuple(self.layer_shapes[layer]) if stat == "map" else (c,)
                    out[stat_path(layer, source, stat)] = (shape, np.int32 if stat == "nonzero" else np.float32)
        for t, eps in self.odin_pairs:
            out[odin_path(t, eps)] = ((self.num_classes,), np.float32)
        if self.tracked:
            out[TRACKING_PATH] = ((self.num_classes, len(self.tracked)), np.float32)
        if self.maha:
            shape = (len(self.maha["recipe"]["magnitudes"]), len(self.maha["recipe"]["layers"]))
            out[MAHA_SCORES] = (shape, np.float32)
            if self.maha["recipe"]["adversarial"]:
                out[MAHA_ADVERSARIAL] = (shape, np.float32)
        return out

    def bytes_per_image(self):
        """Uncompressed bytes one image adds to the cache (paths counted as 64 bytes)."""
        total = 0
        for path, (shape, dtype) in self.layout().items():
            total += 64 if dtype is object else int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return total

    def describe(self, n_images):
        """Lines of text for ``--dry-run``: layers, shapes, stored statistics, sizes."""
        lines = [f"objectives: {', '.join(self.objectives) or '(none: logits and features only)'}",
                 f"backward starts at: {self.start_module or '-'}"]
        if self.odin_pairs:
            lines.append("ODIN passes (T, epsilon): " + ", ".join(f"({t:g}, {e:g})" for t, e in self.odin_pairs))
        if self.tracked:
            lines.append(f"gradient tracking: {len(self.tracked)} weight tensors x {self.num_classes} labels")
        if self.maha:
            r = self.maha["recipe"]
            lines.append(f"multi-layer Mahalanobis: layers {', '.join(r['layers'])}; magnitudes "
                         f"{', '.join(f'{m:g}' for m in r['magnitudes'])}"
                         + ("; with pseudo-OOD copies" if r["adversarial"] else ""))
        lines.append("layers:")
        for layer in self.layers:
            stored = "; ".join(f"{src}: {','.join(st)}" for src, st in self.plan[layer].items()) or "-"
            lines.append(f"  {layer:40s} {str(self.layer_shapes[layer]):18s} "
                         f"{self.policies[layer]:7s} {stored}")
        per = self.bytes_per_image()
        lines.append(f"estimated size: {per / 1024:.1f} KiB per image, "
                     f"{per * n_images / 2**20:.1f} MiB for {n_images} images (before compression)")
        return lines


def _module_order(model, names):
    return [n for n, _ in model.named_modules() if n in names]


def check_disk(path, needed_bytes):
    """Raise OSError when the disk holding ``path`` has less than ``needed_bytes`` free."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise OSError(f"not enough disk space in {folder}: {free / 2**30:.2f} GiB free, "
                      f"about {needed_bytes / 2**30:.2f} GiB needed (parts plus the assembled "
                      "file); free space, choose another --cache-dir, or store less "
                      "(--policy scores)")


def run_extraction(model, arch, dataset, plan, cache_path, meta, batch_size, device,
                   indices=None, progress=True, shard=None):
    """Extract ``dataset`` (an ImageSet) into ``cache_path``; resumes an interrupted run.

    meta: provenance attributes (checkpoint, checkpoint_sha256, preprocess, dataset,
    dataset_root, split). indices: optional subset of dataset rows (kept in order).
    shard: ``extract.distributed.Shard`` of a torchrun launch (default: one process);
    every rank calls this with the same arguments, extracts its range of grid batches,
    and rank 0 assembles the cache once all ranks are done. Batches are always the rows
    ``[k * batch_size, (k + 1) * batch_size)`` so a resumed or sharded run computes
    every image in the same batch as an uninterrupted single-process run.
    Returns the path of the complete cache.
    """
    shard = shard or Shard()
    indices = list(range(len(dataset))) if indices is None else list(indices)
    n = len(indices)
    weight, bias = head_weight_bias(model)
    attrs = {
        "schema_version": SCHEMA_VERSION, "n_samples": n, "arch": arch,
        "num_classes": int(plan.num_classes), "objectives": plan.objectives,
        "layers": plan.layers, "layer_shapes": plan.layer_shapes, "hook_sets": plan.hook_sets,
        "plan": plan.plan, "policies": plan.policies, "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__, "device": str(device),
        "tool_version": TOOL_VERSION, "family": FAMILY[arch], "odin": plan.odin_pairs,
        "tracked_parameters": plan.tracked, "batch_size": int(batch_size),
        **({"mahalanobis": plan.maha["recipe"]} if plan.maha else {}),
        "world_size": shard.world_size, **meta,
    }
    attrs["fingerprint"] = fingerprint(attrs)
    writer = CacheWriter(cache_path, attrs, plan.layout(),
                         {"head/weight": weight.cpu().numpy().astype(np.float32),
                          "head/bias": bias.cpu().numpy().astype(np.float32)}, n)
    if shard.is_main:
        writer.start()
    shard.barrier()
    if not shard.is_main:
        writer.start(prepare=False)
    lo, hi = shard.row_range(n, batch_size)
    batches = grid_batches(writer.missing(lo, hi), batch_size)
    todo = sum(b - a for a, b in batches)
    if todo:
        check_disk(cache_path, (2 if shard.is_main else 1) * plan.bytes_per_image() * todo)
    if shard.world_size > 1:
        print(f"{meta['dataset']}: rank {shard.rank} of {shard.world_size} extracts rows "
              f"{lo}-{hi} ({hi - lo - todo} already done)", flush=True)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_sampler=[list(range(a, b)) for a, b in batches],
        num_workers=min(4, os.cpu_count() or 1) if device.type == "cuda" else 0,
        pin_memory=device.type == "cuda")
    recorder = H.Recorder(model, plan.plan, plan.start_module) if plan.layers else None
    captured = {}
    head_handle = head_module(model).register_forward_pre_hook(
        lambda m, args: captured.__setitem__("x", args[0]))
    bar = tqdm(total=hi - lo, initial=hi - lo - todo, unit="img", desc=f"extract {meta['dataset']}",
               disable=not (progress and shard.is_main), dynamic_ncols=True)
    background = BackgroundWriter(writer)
    try:
        for (row, _), (x, y, idx, reasons) in zip(batches, loader):
            x = x.to(device, non_blocking=True)
            arrays = _extract_batch(model, recorder, captured, plan, x, y.to(device))
            arrays.update(labels=y.numpy().astype(np.int64),
                          skipped=np.array([r != "" for r in reasons], dtype=bool),
                          skip_reasons=list(reasons),
                          paths=[dataset.paths[int(i)] for i in idx])
            background.put(row, arrays)
            bar.update(len(y))
    except BaseException:
        try:
            background.close()      # keep every batch already computed
        except BaseException:
            pass
        raise
    finally:
        bar.close()
        head_handle.remove()
        if recorder is not None:
            recorder.close()
    background.close()
    shard.barrier()
    if shard.is_main:
        attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        writer.assemble()
    shard.barrier()
    return cache_path


def _extract_batch(model, recorder, captured, plan, x, labels):
    """Forward + one backward per objective on batch ``x`` (labels: (N,) int64, used by the
    Mahalanobis pseudo-OOD copies), plus the extra passes; returns ``{dataset path: ndarray}``."""
    if recorder is not None:
        recorder.reset()
    with torch.set_grad_enabled(bool(plan.objectives)):
        logits = model(x)
        head_input = captured["x"].flatten(1)
        for i, objective in enumerate(plan.objectives):
            recorder.objective = objective
            objective_value(objective, logits, head_input).backward(
                retain_graph=i < len(plan.objectives) - 1)
    out = {"logits": logits.detach().float().cpu().numpy(),
           "features": head_input.detach().float().cpu().numpy()}
    if recorder is not None:
        for (source, layer, stat), value in recorder.records.items():
            out[stat_path(layer, source, stat)] = value.cpu().numpy()
        recorder.enabled = False
    try:
        for t, eps in plan.odin_pairs:
            z = logits.detach() if eps == 0 else odin_logits(model, x, t, eps)
            out[odin_path(t, eps)] = z.float().cpu().numpy()
        if plan.tracked:
            from .tracking import per_sample_grad_norms
            out[TRACKING_PATH] = per_sample_grad_norms(model, x, plan.tracked).cpu().numpy()
        if plan.maha:
            from .mahalanobis import adversarial_images, layer_scores
            gauss, recipe = plan.maha["gaussians"], plan.maha["recipe"]
            out[MAHA_SCORES] = layer_scores(model, x, gauss, recipe["magnitudes"]).cpu().numpy()
            if recipe["adversarial"]:
                adv = adversarial_images(model, x, labels, recipe["adv_noise"])
                out[MAHA_ADVERSARIAL] = layer_scores(model, adv, gauss, recipe["magnitudes"]).cpu().numpy()
    finally:
        if recorder is not None:
            recorder.enabled = True
    return out


def odin_logits(model, x, temperature, epsilon):
    """Logits (N, K) of the ODIN-perturbed input, as the GradNorm release's ``iterate_data_odin``.

    x (N, C, H, W) is moved by ``epsilon`` against the sign of the gradient of the
    cross-entropy of ``z / temperature`` at the predicted class (``grad >= 0`` counts as +1,
    as their ``torch.ge``); the returned logits are NOT divided by the temperature.
    """
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        z = model(x)
        loss = torch.nn.functional.cross_entropy(z / temperature, z.argmax(dim=1))
        (grad,) = torch.autograd.grad(loss, x)
    sign = (grad >= 0).to(x.dtype) * 2 - 1
    with torch.no_grad():
        return model(x.detach() - epsilon * sign)
