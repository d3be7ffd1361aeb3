"""The one configuration object of an extraction run, and its provenance record.

``ExtractConfig`` holds every choice besides the model and the data: what to record
(``needs``, ``passes``, ``hooks``), how to store it (``policy``, ``store``), the extra
passes' settings (``odin``, ``maha``) and how to run (``batch_size``, ``device``, ...).
Score names are the analysis stage's business: ``analyze.requirements(scores)`` turns
them into ``needs`` and ``passes``.

``Provenance`` describes where one cache's rows come from; it is written into the
cache's root attributes.
"""
from dataclasses import dataclass, field
from typing import Optional

from gradood.store.recipes import BATCH_SIZE, ODIN_DEFAULT as ODIN_PAIR, PASSES, check_needs
from gradood.store.schema import POLICIES, odin_pass

ODIN_DEFAULT = ((*ODIN_PAIR, False),)


@dataclass
class ExtractConfig:
    """Everything an extraction decides before the first batch.

    arch: architecture name (``extract.models``: a release layout, ``torchvision:NAME``,
    ``timm:NAME`` or ``file:NAME.py:FUNC``), recorded in the cache.
    head: module name of the linear head (default: found by tracing, ``extract.adapters``).
    hook_sets: ``{set name: [module name or glob, ...]}`` replacing the adapter's sets.
    needs: ``(hook set, source, stat)`` triples to record (``store.recipes``).
    passes: extra passes, a subset of ``store.recipes.PASSES``.
    hooks: hook sets or module names recorded besides the needs (policy permitting).
    policy: storage policy of every hooked layer (``store.schema.POLICIES``);
    store: ``{layer: policy}`` overrides.
    odin: ODIN passes ``(T, epsilon, std_divided)``; odin_std: the per-channel
    normalisation std the sign gradient is divided by in ``std_divided`` passes.
    maha: ``{"gaussians", "recipe"}`` of the multi-layer Mahalanobis pass, or None.
    batch_size: rows per batch (the batch grid: rows [k B, (k + 1) B)). device: ``auto``,
    ``cpu``, ``cuda``, ``cuda:N``. progress: a progress bar. truncate_backward: each
    objective's backward stops at the earliest layer whose statistics it feeds (False:
    down to the earliest hooked layer, for comparisons; the results are identical).
    """
    arch: str
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

    def __post_init__(self):
        self.needs = [tuple(n) for n in self.needs]
        check_needs(self.needs)
        self.passes = tuple(self.passes)
        bad = [p for p in self.passes if p not in PASSES]
        if bad:
            raise ValueError(f"unknown extraction pass {bad[0]!r}; choose from {', '.join(PASSES)}")
        for layer, policy in {"*": self.policy, **self.store}.items():
            if policy not in POLICIES:
                raise ValueError(f"storage policy {policy!r} for {layer}: choose one of {', '.join(POLICIES)}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch size must be a positive integer, got {self.batch_size!r}")
        self.odin = tuple(odin_pass(p) for p in self.odin)
        if "odin" in self.passes:
            if not self.odin:
                raise ValueError("the ODIN pass needs at least one (temperature, epsilon) pair (--odin T,EPS)")
            if any(t <= 0 for t, _, _ in self.odin):
                raise ValueError("ODIN temperatures must be > 0")
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
