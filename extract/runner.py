"""The extraction loop: one forward pass per batch, one truncated backward per objective.

Per batch: a forward pass with hooks (activation statistics; the autograd graph starts at
the leaf placed by ``hooks.graph_start``, or at the input when ODIN needs the input
gradient; parameters are frozen, so no weight gradient is ever computed); then for each
objective one ``torch.autograd.grad`` restricted to the inputs of the layers whose
statistics that objective feeds, so autograd stops at the earliest of them
(``hooks.Recorder.backward``); the ODIN input gradients (one per temperature) and the
perturbed forwards; then the rows are committed to the cache as an atomic part
(store.writer) by a background thread while the next batch computes. Progress bar in
images/second. Under torchrun each rank extracts its share of the batches
(extract.distributed).
"""
import datetime
import os
import shutil

import numpy as np
import torch
import torchvision
from tqdm import tqdm

from gradood.store.recipes import build_plan, objectives_for
from gradood.store.recipes import hook_names as hook_names_of
from gradood.store.recipes import layers_of, split_selector
from gradood.store.schema import odin_label
from gradood.store.schema import ADASCALE_FEATURES, IODIN_LOGITS, MAHA_ADVERSARIAL, MAHA_SCORES, SCHEMA_VERSION, TRACKING_PATH, fingerprint, odin_path, stat_path
from gradood.store.schema import head_label
from gradood.store.schema import layout as schema_layout
from gradood.store.writer import BackgroundWriter, CacheWriter

from . import hooks as H
from .distributed import Shard, grid_batches
from .adapters import adapter_for
from .adascale import RECIPE as ADASCALE_RECIPE
from .adascale import max_logit_gradient, perturbed
from .iodin import RECIPE as IODIN_RECIPE
from .iodin import perturbed as iodin_perturbed
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


def resolve_hooks(adapter, hook_names, needs):
    """``{hook set or module name: [layer, ...]}`` on the model of ``adapter``
    (``extract.adapters``) for the requested hooks and the needs (a selected set
    ``set:selector`` is recorded beside its whole set)."""
    wanted = list(hook_names)
    for set_name in hook_names_of(needs):
        if set_name not in wanted:
            wanted.append(set_name)
    out = {}
    for name in wanted:
        base, sel = split_selector(name)
        out[name] = adapter.hook_set(name) if sel is None else layers_of(out, name)
    return out


class ExtractionPlan:
    """Everything decided before the first batch: layers, shapes, objectives, storage.

    model: the network (eval mode, on ``device``). config: ``extract.config.ExtractConfig``.
    image_shape: (3, H, W) of one preprocessed image. adapter: the model's
    ``extract.adapters.ModelAdapter`` (default: found here, with ``config.head`` and
    ``config.hook_sets``).
    """

    def __init__(self, model, config, image_shape, device, adapter=None):
        config.check_runnable()
        self.config = config
        self.adapter = adapter or adapter_for(model, image_shape, config.head, config.hook_sets)
        self.hook_sets = resolve_hooks(self.adapter, config.hooks, config.needs)
        self.maha = config.maha if "mahalanobis" in config.passes else None
        self.odin_passes = [list(p) for p in config.odin] if "odin" in config.passes else []
        self.odin_std = list(config.odin_std) if config.odin_std else None
        self.adascale = "adascale" in config.passes
        self.iodin = "iodin" in config.passes
        if self.iodin and not config.odin_std:
            raise ValueError("iODIN divides its step by the normalisation std, and this preprocessing has "
                             "none (a model whose input is not normalised): it cannot be recorded")
        self.tracked = []
        if "tracking" in config.passes:
            from .tracking import tracked_parameters
            self.tracked = tracked_parameters(model, self.adapter.trace)
        self.layers = _module_order(model, {l for ls in self.hook_sets.values() for l in ls})
        policies = config.policies
        unknown = [l for l in policies if l != "*" and l not in self.layers]
        if unknown:
            raise ValueError(f"--store {unknown[0]}=...: {unknown[0]!r} is not a hooked layer; hooked: "
                             f"{', '.join(self.layers) or 'none'} (add it with --hook {unknown[0]})")
        self.objectives = objectives_for(config.needs) if self.layers else []
        self.policies = {l: policies.get(l, policies.get("*", "scores")) for l in self.layers}
        self.plan = build_plan(self.hook_sets, config.needs, self.policies, self.objectives)
        for layer in self.layers:
            self.plan.setdefault(layer, {})
        grad_layers = [l for l in self.layers if any(src != "act" for src in self.plan[l])]
        # ODIN's and AdaScale's input gradients need the graph from the input: the forward
        # then starts there.
        self.graph_from_input = self.adascale or self.iodin or (
            bool(self.odin_passes) and any(e != 0 for _, e, _ in self.odin_passes))
        self.start_module = (H.graph_start(model, grad_layers)
                             if grad_layers and not self.graph_from_input else None)
        self.num_classes, self.feature_dim = self.adapter.num_classes, self.adapter.feature_dim
        self.layer_shapes = {l: self.adapter.shape(l) for l in self.layers}
        self.layer_layouts, self.layer_types = self.adapter.describe(self.layers)
        self.layer_activations = {l: self.adapter.activation_after(l) for l in self.layers}
        order = [n for n, _ in model.named_modules()]
        # shallow objectives first; the deepest (freeing the most of the graph) last
        self.objectives = sorted(self.objectives, key=lambda o: -H.objective_depth(self.plan, o, order))

    def layout(self):
        """``{dataset path: (row shape, dtype name)}`` of every per-sample dataset."""
        return schema_layout(int(self.num_classes), int(self.feature_dim), self.plan, self.layer_shapes,
                             self.pass_recipes())

    def pass_recipes(self):
        """``{root attribute: recipe}`` of the extra passes this plan runs
        (``store.schema.EXTRA_PASSES``), as the cache records them."""
        return {"odin": [list(p) for p in self.odin_passes], "tracked_parameters": list(self.tracked),
                "mahalanobis": self.maha["recipe"] if self.maha else None,
                "adascale": ADASCALE_RECIPE if self.adascale else None, "iodin": IODIN_RECIPE if self.iodin else None}

    def bytes_per_image(self):
        """Uncompressed bytes one image adds to the cache (paths counted as 64 bytes)."""
        total = 0
        for path, (shape, dtype) in self.layout().items():
            total += 64 if dtype == "str" else int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return total

    def passes_per_batch(self):
        """Text: the network passes one batch costs."""
        forward = "1 forward" + (" (graph from the input)" if self.graph_from_input else "")
        parts = [forward]
        if self.objectives:
            parts.append(f"{len(self.objectives)} backward ({', '.join(self.objectives)}; each stops at "
                         "the earliest layer it feeds)")
        temps = sorted({t for t, e, _ in self.odin_passes if e != 0})
        if temps:
            parts.append(f"ODIN: {len(temps)} input-gradient backward + 1 forward of the "
                         f"{sum(1 for _, e, _ in self.odin_passes if e != 0)} perturbed copies")
        if self.adascale:
            parts.append("AdaScale: 1 input-gradient backward + 1 forward of the perturbed input")
        if self.iodin:
            parts.append("iODIN: the ODIN input-gradient backward at T=1000 (shared) + 1 forward")
        if self.tracked:
            parts.append(f"gradient tracking: {self.num_classes} backward")
        if self.maha:
            parts.append(f"multi-layer Mahalanobis: per stage 1 backward to the input and 1 partial "
                         f"forward of the perturbed copies (about {self.maha_cost():.0f} forward-"
                         "pass equivalents per image)")
        return "; ".join(parts)

    def maha_cost(self):
        """Rough forward-pass equivalents per image of the multi-layer Mahalanobis pass: one
        forward, then per stage l (at depth fraction f_l = (l + 1) / L) a backward to the
        input (~2 f_l) and the copies of every non-zero magnitude through a partial forward
        (f_l each); with the pseudo-OOD copies all of it twice, plus their own forward and
        backward (3). Measured on a CIFAR ResNet-18 (4 stages, 6 non-zero magnitudes, with
        copies: 45 by this count): 53-63 times a forward-only extraction, 230 ms per image on
        2 CPU cores."""
        recipe = self.maha["recipe"]
        moved = sum(1 for m in recipe["magnitudes"] if m != 0)
        stages = len(recipe["layers"])
        per_image = 1 + sum((l + 1) / stages * (2 + moved) for l in range(stages))
        return 2 * per_image + 3 if recipe["adversarial"] else per_image

    def describe(self, n_images):
        """Lines of text for ``--dry-run``: passes, layers, shapes, stored statistics, sizes."""
        a = self.adapter
        lines = [f"model: {type(a.model).__name__} ({a.family} adapter), head {head_label({'head': a.head_name})}, "
                 f"{a.num_classes} classes, {a.feature_dim} features",
                 f"passes per batch: {self.passes_per_batch()}",
                 f"objectives: {', '.join(self.objectives) or '(none: logits and features only)'}",
                 f"graph starts at: {self.start_module or ('the input' if self.graph_from_input else '-')}"]
        if self.odin_passes:
            lines.append("ODIN passes: " + "; ".join(
                f"({odin_label(*p)})" for p in self.odin_passes))
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
            lines.append(f"  {layer:40s} {str(self.layer_shapes[layer]):18s} {self.layer_layouts[layer]:5s} "
                         f"{self.policies[layer]:7s} {stored}")
        per = self.bytes_per_image()
        lines.append(f"estimated size: {per / 1024:.1f} KiB per image, "
                     f"{per * n_images / 2**20:.1f} MiB for {n_images} images (before compression)")
        return lines


def _module_order(model, names):
    return [n for n, _ in model.named_modules() if n in names]


def _size(n):
    """``n`` bytes in the largest unit that keeps it at 1 or more (B, KiB, MiB, GiB, TiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def check_disk(path, needed_bytes):
    """Raise OSError when the disk holding ``path`` has less than ``needed_bytes`` free."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise OSError(f"not enough disk space in {folder}: {_size(free)} free, "
                      f"about {_size(needed_bytes)} needed (parts plus the assembled "
                      "file); free space, choose another --cache-dir, or store less "
                      "(--policy scores)")


def as_image_set(dataset):
    """An ``extract.datasets.ImageSet`` for ``dataset``: returned as is when it is one, else
    a wrapper of a map-style dataset of ``(image tensor, label)`` items, paths ``mem:<i>``."""
    from .datasets import ImageSet
    if isinstance(dataset, ImageSet):
        return dataset
    first = dataset[0][0]
    return ImageSet(dataset, [f"mem:{i}" for i in range(len(dataset))], image_shape=tuple(first.shape))


def cache_attrs(plan, provenance, n, device, world_size=1):
    """Root attributes of a cache of ``n`` rows extracted with ``plan`` (fingerprint included)."""
    config = plan.config
    attrs = {
        "schema_version": SCHEMA_VERSION, "n_samples": n, "arch": config.arch,
        "num_classes": int(plan.num_classes), "feature_dim": int(plan.feature_dim), "objectives": plan.objectives,
        "layers": plan.layers, "layer_shapes": plan.layer_shapes, "hook_sets": plan.hook_sets,
        "plan": plan.plan, "policies": plan.policies, "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__, "device": str(device),
        "tool_version": TOOL_VERSION, "family": plan.adapter.family,
        "layer_layouts": plan.layer_layouts, "layer_types": plan.layer_types, "head": plan.adapter.head_name,
        **({} if plan.adapter.head_name else {"features": plan.adapter.features.describe()}),
        "layer_activations": plan.layer_activations,
        "batch_size": int(config.batch_size), **({"output": str(config.output)} if config.output else {}),
        **({"odin_std": plan.odin_std} if plan.odin_std else {}),
        **{attr: recipe for attr, recipe in plan.pass_recipes().items() if recipe is not None},
        "world_size": world_size, **provenance.attrs(),
    }
    attrs["fingerprint"] = fingerprint(attrs)
    return attrs


def extract_to_cache(model, dataset, cache_path, config, provenance, indices=None, plan=None, shard=None):
    """Extract ``dataset`` with ``model`` into the cache file ``cache_path``; resumes an
    interrupted run of the same settings. Returns the path of the complete cache.

    model: any ``nn.Module`` image classifier returning (N, K) logits (its head, norms and
    stages are found by ``extract.adapters``); it is put in eval mode with frozen
    parameters. dataset: an ``ImageSet`` or a map-style dataset of
    ``(image tensor (3, H, W), label)``. config: ``ExtractConfig``. provenance:
    ``Provenance`` (root attributes). indices: optional subset of dataset rows (kept in
    order). plan: an ``ExtractionPlan`` built for this model and config (default: built
    here). shard: ``extract.distributed.Shard`` of a torchrun launch (default: one
    process); every rank calls this with the same arguments, extracts its range of grid
    batches, and rank 0 assembles the cache once all ranks are done. Batches are always
    the rows ``[k * B, (k + 1) * B)`` so a resumed or sharded run computes every image in
    the same batch as an uninterrupted single-process run.
    """
    shard = shard or Shard()
    device = select_device(config.device) if shard.device is None else shard.device
    dataset = as_image_set(dataset)
    model = model.to(device).eval().requires_grad_(False)
    plan = plan or ExtractionPlan(model, config, dataset.image_shape, device)
    indices = list(range(len(dataset))) if indices is None else list(indices)
    n = len(indices)
    if n == 0:
        raise ValueError(f"{provenance.dataset}: no images to extract")
    head = plan.adapter.head_weight_bias()
    attrs = cache_attrs(plan, provenance, n, device, shard.world_size)
    constants = {} if head is None else {"head/weight": head[0].cpu().numpy().astype(np.float32),
                                         "head/bias": head[1].cpu().numpy().astype(np.float32)}
    writer = CacheWriter(cache_path, attrs, plan.layout(), constants, n)
    try:
        return _run(model, dataset, cache_path, config, provenance, indices, plan, shard, device, writer, attrs)
    finally:
        writer.release()


def _run(model, dataset, cache_path, config, provenance, indices, plan, shard, device, writer, attrs):
    n, batch_size = len(indices), config.batch_size
    if shard.is_main:
        writer.start()
    shard.barrier()
    if not shard.is_main:
        writer.start(prepare=False)
    lo, hi = shard.row_range(n, batch_size)
    batches = grid_batches(writer.missing(lo, hi), batch_size)
    todo = sum(b - a for a, b in batches)
    if todo:
        try:
            check_disk(cache_path, (2 if shard.is_main else 1) * plan.bytes_per_image() * todo)
        except OSError:
            if shard.is_main and todo == n:     # nothing of this run exists yet: leave nothing behind
                writer.discard()
            raise
    if shard.world_size > 1:
        print(f"{provenance.dataset}: rank {shard.rank} of {shard.world_size} extracts rows "
              f"{lo}-{hi} ({hi - lo - todo} already done)", flush=True)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_sampler=[list(range(a, b)) for a, b in batches],
        num_workers=min(4, os.cpu_count() or 1) if device.type == "cuda" else 0,
        pin_memory=device.type == "cuda")
    recorder = H.Recorder(model, plan.plan, plan.start_module, plan.layer_layouts)
    captured = {}
    head_handle = plan.adapter.capture_features(captured)
    bar = tqdm(total=hi - lo, initial=hi - lo - todo, unit="img", desc=f"extract {provenance.dataset}",
               disable=not (config.progress and shard.is_main), dynamic_ncols=True)
    background = BackgroundWriter(writer)
    try:
        for (row, _), (x, y, idx, reasons) in zip(batches, loader):
            # labels below -1 are malformed anywhere; a training cache's labels are what fitted
            # scores read, so they must be classes of the head (an OOD folder's class indices
            # are never read)
            bad = ((y < -1) | ((y >= plan.num_classes) & (provenance.split == "train"))).nonzero().flatten()
            if len(bad):
                i = int(bad[0])
                raise ValueError(f"{provenance.dataset}: {dataset.paths[int(idx[i])]} has label {int(y[i])}, "
                                 f"which a {plan.num_classes}-class head cannot have (labels are 0.."
                                 f"{plan.num_classes - 1}, or -1 for none): check --num-classes, the "
                                 "class folders or the list's labels")
            arrays = {"content_hash": content_hashes(x)}
            x = x.to(device, non_blocking=True)
            arrays.update(_extract_batch(model, recorder, captured, plan, x, y.to(device)))
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
        recorder.close()
    background.close()
    shard.barrier()
    if shard.is_main:
        attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        writer.assemble()
    shard.barrier()
    return cache_path


def content_hashes(x):
    """(N,) first 16 hex digits of the SHA-1 of each preprocessed image's float32 bytes
    (x: (N, C, H, W) on the CPU): equal images give equal hashes across caches."""
    import hashlib
    rows = x.detach().cpu().float().contiguous().numpy()
    return [hashlib.sha1(r.tobytes()).hexdigest()[:16] for r in rows]


def _extract_batch(model, recorder, captured, plan, x, labels):
    """One forward and one truncated backward per objective on batch ``x`` (labels: (N,)
    int64, used by the Mahalanobis pseudo-OOD copies), plus the extra passes; returns
    ``{dataset path: ndarray}``."""
    recorder.reset()
    odin_temps = sorted({t for t, e, _ in plan.odin_passes if e != 0})
    grad_temps = sorted(set(odin_temps) | ({IODIN_RECIPE["temperature"]} if plan.iodin else set()))
    if plan.graph_from_input:
        x = x.detach().clone().requires_grad_(True)
        recorder.leaf = x
    with torch.set_grad_enabled(bool(plan.objectives) or plan.graph_from_input):
        logits = model(x)
        head_input = captured["x"]
        for i, objective in enumerate(plan.objectives):
            last = i == len(plan.objectives) - 1 and not grad_temps and not plan.adascale
            recorder.backward(objective, objective_value(objective, logits, head_input),
                              retain_graph=not last, truncate=plan.config.truncate_backward)
        recorder.objective = None
        ada_grad = max_logit_gradient(logits, x, retain_graph=bool(grad_temps)) if plan.adascale else None
        grads = {}
        for j, t in enumerate(grad_temps):
            loss = torch.nn.functional.cross_entropy(logits / t, logits.argmax(dim=1))
            (grads[t],) = torch.autograd.grad(loss, x, retain_graph=j < len(grad_temps) - 1)
        signs = {t: (grads[t] >= 0).to(x.dtype) * 2 - 1 for t in odin_temps}
    out = {"logits": logits.detach().float().cpu().numpy(),
           "features": head_input.detach().float().cpu().numpy()}
    for (source, layer, stat), value in recorder.records.items():
        out[stat_path(layer, source, stat)] = value.cpu().numpy()
    recorder.enabled = False
    try:
        if plan.odin_passes:
            out.update(_odin_outputs(model, x.detach(), logits.detach(), plan, signs))
        if plan.iodin:
            std = torch.tensor(plan.odin_std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            with torch.no_grad():
                z = model(iodin_perturbed(x.detach(), grads[IODIN_RECIPE["temperature"]], std))
            out[IODIN_LOGITS] = z.float().cpu().numpy()
        if plan.adascale:
            with torch.no_grad():
                model(perturbed(x.detach(), ada_grad))
            out[ADASCALE_FEATURES] = captured["x"].float().cpu().numpy()
        if plan.tracked:
            from .tracking import per_sample_grad_norms
            out[TRACKING_PATH] = per_sample_grad_norms(model, x.detach(), plan.tracked).cpu().numpy()
        if plan.maha:
            from .mahalanobis import adversarial_images, layer_scores
            gauss, recipe = plan.maha["gaussians"], plan.maha["recipe"]
            layouts = {l: plan.adapter.layout(l) for l in gauss.layers}
            out[MAHA_SCORES] = layer_scores(model, x.detach(), gauss, recipe["magnitudes"], layouts).cpu().numpy()
            if recipe["adversarial"]:
                adv = adversarial_images(model, x.detach(), labels, recipe["adv_noise"])
                out[MAHA_ADVERSARIAL] = layer_scores(model, adv, gauss, recipe["magnitudes"], layouts).cpu().numpy()
    finally:
        recorder.enabled = True
    return out


ODIN_COPIES_PER_FORWARD = 8


def _odin_outputs(model, x, logits, plan, signs):
    """``{odin path: (N, K) logits}`` of every ODIN pass.

    As the GradNorm release's ``iterate_data_odin`` and the original ODIN code: x moves by
    epsilon against the sign of the gradient of the cross-entropy of z / T at the
    predicted class (``grad >= 0`` counts as +1, their ``torch.ge``), the sign divided by
    the normalisation std per channel in ``std`` passes (original ODIN, OpenOOD). The
    gradient depends on T only, so passes sharing T share one backward (``signs``); the
    perturbed copies of up to ODIN_COPIES_PER_FORWARD passes go through one forward.
    Logits are NOT divided by T. Epsilon 0 passes are the plain logits.
    """
    out, todo = {}, []
    std = torch.tensor(plan.odin_std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1) if plan.odin_std else None
    for t, eps, by_std in plan.odin_passes:
        if eps == 0:
            out[odin_path(t, eps, by_std)] = logits.float().cpu().numpy()
            continue
        step = signs[t] / std if by_std else signs[t]
        todo.append((odin_path(t, eps, by_std), x - eps * step))
    n = x.shape[0]
    with torch.no_grad():
        for i in range(0, len(todo), ODIN_COPIES_PER_FORWARD):
            chunk = todo[i:i + ODIN_COPIES_PER_FORWARD]
            z = model(torch.cat([c for _, c in chunk])) if len(chunk) > 1 else model(chunk[0][1])
            for j, (path, _) in enumerate(chunk):
                out[path] = z[j * n:(j + 1) * n].float().cpu().numpy()
    return out
