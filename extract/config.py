"""The one configuration object of an extraction run, and its provenance record.

``ExtractConfig`` holds every choice of an extraction besides the model's weights and the
images: which model and data (``arch``, ``benchmark``, ``datasets``, ...), what to
record (``needs``, ``passes``, ``hooks``), how to store it (``policy``, ``store``), the
extra passes' settings (``odin``, ``maha_*``) and how to run (``batch_size``, ``device``,
...). The command line builds it directly from its options (``pipeline.py extract``;
each field is the option of the same name), the Python API with keywords. It imports
without torch. Score names are the analysis stage's business: ``analyze.requirements(scores)``
turns them into ``needs`` and ``passes``.

Options given as the command line writes them are parsed here, once: ``hook_sets`` as
``NAME=PATTERN[,PATTERN...]`` items, ``store`` as ``LAYER=POLICY`` items, ``odin`` as
``T,EPS`` or ``T,EPS,std`` items (each also accepted already parsed: a dict, pairs).

``Provenance`` describes where one cache's rows come from; it is written into the
cache's root attributes.
"""
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Optional

from gradood.store.recipes import BATCH_SIZE, HOOK_SETS, ODIN_DEFAULT as ODIN_PAIR, PASSES, check_needs
from gradood.store.schema import POLICIES, odin_pass

ODIN_DEFAULT = ((*ODIN_PAIR, False),)


def parse_policies(items):
    """``{layer: policy}`` from ``LAYER=POLICY`` items (a mapping is taken as it is)."""
    if isinstance(items, Mapping):
        return dict(items)
    out = {}
    for item in items:
        layer, sep, value = item.partition("=")
        if not sep or value not in POLICIES:
            raise ValueError(f"--store {item!r}: expected LAYER=POLICY with POLICY one of {', '.join(POLICIES)}")
        out[layer] = value
    return out


def parse_hook_sets(items):
    """``{set name: [module name or glob, ...]}`` from ``NAME=PATTERN[,PATTERN...]`` items (a
    mapping is taken as it is). NAME must be one of ``HOOK_SETS``: an override of any other
    name would never be read, so a misspelt set is refused rather than ignored."""
    if isinstance(items, Mapping):
        out = {k: list(v) for k, v in items.items()}
    else:
        out = {}
        for item in items:
            name, sep, value = item.partition("=")
            patterns = [p.strip() for p in value.split(",") if p.strip()]
            if not sep or not name or not patterns:
                raise ValueError(f"--hook-set {item!r}: expected NAME=MODULE[,MODULE...] with module "
                                 "names or globs, e.g. bn='features.*.norm*'")
            out[name] = patterns
    unknown = [name for name in out if name not in HOOK_SETS]
    if unknown:
        raise ValueError(f"--hook-set {unknown[0]}=...: {unknown[0]!r} is not a hook set; the sets are "
                         f"{', '.join(HOOK_SETS)} (a single module is hooked by name with --hook)")
    return out


def parse_odin(items):
    """``[(T, epsilon, std_divided)]`` from ``T,EPS`` or ``T,EPS,std`` items (or pairs and
    triples)."""
    passes = []
    for item in items:
        if not isinstance(item, str):
            passes.append(odin_pass(item))
            continue
        parts = [p.strip() for p in item.split(",")]
        try:
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "std"):
                raise ValueError
            t, eps = float(parts[0]), float(parts[1])
        except ValueError:
            raise ValueError(f"--odin {item!r}: expected T,EPS or T,EPS,std, e.g. 1000,0.0014 or "
                             "1000,0.0014,std (std: divide the sign gradient by the normalisation "
                             "std, as the original ODIN code and OpenOOD)") from None
        if t <= 0 or eps < 0:
            raise ValueError(f"--odin {item!r}: the temperature must be > 0 and epsilon >= 0")
        passes.append((t, eps, len(parts) == 3))
    return passes


@dataclass
class ExtractConfig:
    """Everything an extraction decides before the first batch.

    What to record: needs: ``(hook set, source, stat)`` triples (``store.recipes``).
    passes: extra passes, a subset of ``store.recipes.PASSES``. hooks: hook sets or module
    names recorded besides the needs (policy permitting). policy: storage policy of every
    hooked layer (``store.schema.POLICIES``); store: ``{layer: policy}`` overrides.
    odin: ODIN passes ``(T, epsilon, std_divided)`` (empty: the preset's, else
    ``ODIN_DEFAULT``); odin_std: the per-channel normalisation std the sign gradient is
    divided by in ``std_divided`` passes (from the preprocessing). maha_fit: the ID
    training cache the multi-layer Mahalanobis pass's Gaussians are fitted on, with
    maha_magnitudes (default the release's) and maha_adversarial (pseudo-OOD copies);
    maha: the fitted ``{"gaussians", "recipe"}`` (set when the run starts). scores: the
    score names the caches must serve (for messages). refusals: ``refusals(adapter) ->
    {score: [reason]}``, the scores of ``scores`` the model of ``adapter`` cannot serve
    (a hook set it lacks, no linear head, a score's own ``defined_on``), given by the
    caller that knows the scores (``pipeline.py``, the same function ``pipeline.py
    scores`` prints); ``cli_support.check_scores`` applies it. score_needs: ``{score:
    (needs, passes)}`` of ``scores``. optional: the scores that were not named (the
    defaults, or those of ``all``): refused, they are left out with a note, and the needs
    recomputed from ``score_needs``; a refused named score stops the run.

    Which model: arch: architecture name (``extract.models``: a release layout,
    ``torchvision:NAME``, ``timm:NAME``), recorded in the cache; output: the index or key
    of the logits in a model that returns a tuple, dict or dataclass (``--output``; default
    ``extract.models.logits_of``'s choice); model_file: your own
    ``FILE.py:FUNC`` instead; head: module name of the linear head (default: found by
    tracing, ``extract.adapters``); hook_sets: ``{set name: [module name or glob, ...]}``
    replacing the adapter's sets; checkpoint, num_classes, preprocess, image_size.

    Which data: benchmark: a preset (``store.benchmarks``) giving the defaults of arch,
    num_classes, preprocess, data_root, checkpoint and odin; datasets: preset names,
    ``NAME=DIR`` or ``NAME=LIST.txt``; data_root; cache_dir; split ("test" or "train");
    limit, balanced: at most ``limit`` images, class-balanced; skip_bad: record unreadable
    images as skipped.

    How to run: batch_size: rows per batch (the batch grid: rows [k B, (k + 1) B)).
    device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``. progress: a progress bar. dry_run:
    describe, extract nothing. overwrite: replace existing caches. truncate_backward:
    each objective's backward stops at the earliest layer whose statistics it feeds
    (False: down to the earliest hooked layer, for comparisons; the results are identical).
    """
    arch: Optional[str] = None
    head: Optional[str] = None
    hook_sets: dict = field(default_factory=dict)
    needs: list = field(default_factory=list)
    passes: tuple = ()
    hooks: tuple = ()
    policy: str = "scores"
    store: dict = field(default_factory=dict)
    odin: tuple = ODIN_DEFAULT
    odin_std: Optional[tuple] = None
    maha: Optional[dict] = None
    batch_size: int = BATCH_SIZE
    device: str = "auto"
    progress: bool = True
    truncate_backward: bool = True
    benchmark: Optional[str] = None
    datasets: tuple = ()
    data_root: Optional[str] = None
    model_file: Optional[str] = None
    output: Optional[str] = None
    checkpoint: Optional[str] = None
    num_classes: Optional[int] = None
    preprocess: Optional[str] = None
    image_size: Optional[int] = None
    cache_dir: Optional[str] = None
    maha_fit: Optional[str] = None
    maha_magnitudes: tuple = ()
    maha_adversarial: bool = False
    split: str = "test"
    limit: Optional[int] = None
    balanced: bool = False
    skip_bad: bool = False
    dry_run: bool = False
    overwrite: bool = False
    scores: tuple = ()
    refusals: Optional[Callable] = None
    score_needs: dict = field(default_factory=dict)
    optional: tuple = ()

    def __post_init__(self):
        self.needs = [tuple(n) for n in self.needs]
        check_needs(self.needs)
        self.passes = tuple(self.passes)
        if self.maha_fit and "mahalanobis" not in self.passes:
            self.passes += ("mahalanobis",)
        bad = [p for p in self.passes if p not in PASSES]
        if bad:
            raise ValueError(f"unknown extraction pass {bad[0]!r}; choose from {', '.join(PASSES)}")
        self.hook_sets = parse_hook_sets(self.hook_sets)
        self.store = parse_policies(self.store)
        self.hooks, self.datasets, self.scores = tuple(self.hooks), tuple(self.datasets), tuple(self.scores)
        self.maha_magnitudes = tuple(float(m) for m in self.maha_magnitudes)
        for layer, policy in {"*": self.policy, **self.store}.items():
            if policy not in POLICIES:
                raise ValueError(f"storage policy {policy!r} for {layer}: choose one of {', '.join(POLICIES)}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch size must be a positive integer, got {self.batch_size!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"--limit must be at least 1, got {self.limit}")
        if self.balanced and self.limit is None:
            raise ValueError("--balanced picks a class-balanced subset of --limit images: give --limit N "
                             "(without --limit every image is extracted)")
        if self.split not in ("test", "train"):
            raise ValueError(f"--split {self.split!r}: choose test or train")
        if (self.maha_adversarial or self.maha_magnitudes) and not self.maha_fit:
            raise ValueError("--maha-magnitude and --maha-adversarial need --maha-fit TRAIN_CACHE")
        self.odin = tuple(parse_odin(self.odin))
        if any(t <= 0 for t, _, _ in self.odin):
            raise ValueError("ODIN temperatures must be > 0")
        if "mahalanobis" in self.passes and not (self.maha or self.maha_fit):
            raise ValueError("the multi-layer Mahalanobis pass needs --maha-fit TRAIN_CACHE")

    def check_runnable(self):
        """Raise ValueError unless the run's derived settings are complete: an
        architecture, ODIN passes where the ODIN pass runs (with the normalisation std for
        std-divided ones), the Mahalanobis Gaussians where that pass runs."""
        if not self.arch:
            raise ValueError("no architecture: give --arch or --model-file (or --benchmark)")
        if "odin" in self.passes:
            if not self.odin:
                raise ValueError("the ODIN pass needs at least one (temperature, epsilon) pair (--odin T,EPS)")
            if any(s for _, _, s in self.odin) and not self.odin_std:
                raise ValueError("ODIN passes with std division need the normalisation std "
                                 "(the preprocessing has no Normalize step)")
        if "mahalanobis" in self.passes and not self.maha:
            raise ValueError("the multi-layer Mahalanobis pass needs --maha-fit TRAIN_CACHE")

    @property
    def policies(self):
        """``{layer or "*": policy}``."""
        return {"*": self.policy, **self.store}


@dataclass
class Provenance:
    """Where a cache's rows come from (root attributes of the cache).

    checkpoint: path; checkpoint_sha256: hash of the file; weights_sha256: hash of the
    loaded tensors (``extract.checkpoint.weights_sha256``); preprocess: the transform's
    JSON description; dataset: name; dataset_root: folder or list file; split: test or
    train; subset: {"limit", "balanced"}; benchmark: preset name or "". model_file,
    model_file_sha256: the user's model file (``--model-file``) and its hash.
    """
    dataset: str
    checkpoint: str = "in-memory"
    checkpoint_sha256: str = "none"
    weights_sha256: str = ""
    preprocess: dict = field(default_factory=lambda: {"name": "none"})
    dataset_root: str = ""
    split: str = "test"
    subset: dict = field(default_factory=lambda: {"limit": None, "balanced": False})
    benchmark: str = ""
    model_file: str = ""
    model_file_sha256: str = ""

    def attrs(self):
        """The root attributes this provenance writes (the model file only when there is one)."""
        out = dict(vars(self))
        if not self.model_file:
            del out["model_file"], out["model_file_sha256"]
        return out
