"""What an analysis is asked to do: ``AnalysisRequest``, built by the command line
(``pipeline.py analyze``) and by the Python API (``analyze.evaluation``,
``analyze.evaluate``, ...) alike, and checked once, here, for both doors.

Argument rules (the same for the CLI and the API):

* a list option given as one string is one item, or comma-separated items where the CLI
  takes ``A,B`` (``scores``, ``compare``); it is never split into characters;
* ``ci`` and ``compare_level`` are levels in percent, in (1, 100): a fraction such as
  0.95 is refused with the percent it most likely means;
* ``resamples`` is an integer of at least 10;
* ``convention`` is one of ``analyze.metrics.CONVENTIONS``.
"""
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Optional

from .metrics import CONVENTIONS
from .registry import ScoreError

MIN_RESAMPLES = 10


def check_ood_sets(id_name, ood_names, csid=()):
    """Raise ValueError when there is no OOD set, the ID set is among them, or a
    covariate-shifted ID set (``csid``) is the ID set or also an OOD set."""
    if id_name in ood_names:
        raise ValueError(f"OOD set {id_name!r} (--ood): that is the ID set (--id); an OOD set must be another cache")
    if not ood_names:
        raise ValueError("no OOD set to evaluate against")
    for name in csid:
        if name == id_name:
            raise ValueError(f"--csid {name}: that is the ID test set (--id); a covariate-shifted ID set is another cache")
        if name in ood_names:
            raise ValueError(f"--csid {name} is also an OOD set (--ood): a covariate-shifted ID set holds images "
                             "of the ID classes, counted as in-distribution; drop it from --ood")
    twice = [n for i, n in enumerate(csid) if n in csid[:i]]
    if twice:
        raise ValueError(f"--csid {twice[0]} is given twice")


def as_items(value, option, split=False, pairs=False):
    """A tuple of the items of ``value``: None and "" give (); one string is one item (or,
    with ``split``, its comma-separated parts); any other iterable is taken item by item.
    Items must be strings, or, with ``pairs``, also pairs of strings (kept as tuples);
    ``option`` names the argument in errors."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    try:
        items = list(value)
    except TypeError:
        raise ValueError(f"{option}: expected a name or a list of names, got {value!r}") from None
    out = []
    for item in items:
        if isinstance(item, str):
            out += [p.strip() for p in item.split(",") if p.strip()] if split else [item]
        elif pairs and isinstance(item, (tuple, list)) and all(isinstance(n, str) for n in item):
            out.append(tuple(item))
        else:
            raise ValueError(f"{option}: expected names (strings), got {item!r}")
    return tuple(out)


def check_level(value, option):
    """``value`` as a float level in percent, strictly between 1 and 100; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{option}={value!r}: expected a level in percent, e.g. 95")
    if 0 < value < 1:
        raise ValueError(f"{option}={value:g} is a {value:g}% interval: levels are in percent; "
                         f"did you mean {100 * value:g}?")
    if not 1 <= value < 100:
        raise ValueError(f"{option}={value:g}: a level in percent, at least 1 and below 100 (e.g. 95)")
    return float(value)


def check_resamples(value, option="resamples"):
    """``value`` as an int of at least ``MIN_RESAMPLES``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_RESAMPLES:
        raise ValueError(f"{option}={value!r}: an integer of at least {MIN_RESAMPLES}")
    return value


def compare_pairs(items, canonical):
    """``((a, b), ...)`` of ``items`` (``AnalysisRequest.compare``: "A,B" strings or pairs),
    names made canonical by ``canonical``; each pair names two different scores."""
    pairs = []
    for item in items:
        pair = tuple(canonical(n.strip()) for n in (item.split(",") if isinstance(item, str) else item))
        if len(pair) != 2 or pair[0] == pair[1]:
            raise ScoreError(f"compare {','.join(pair)}: give two different scores, A,B")
        pairs.append(pair)
    return tuple(pairs)


@dataclass(frozen=True)
class AnalysisRequest:
    """One analysis, as ``pipeline.py analyze`` takes it (each field is an option of the
    same name).

    cache_dir / checkpoint_dirs: one cache folder, or several checkpoints' folders. id: the
    ID test set. scores: names (comma-separated allowed) or "all". ood: OOD sets (default:
    every other cache of the folder). convention: the metric convention. fit_on: the
    training cache of training-fitted scores. params: ``{score: {name: value}}``.
    tune_on / tune_id: OOD / ID validation caches of the parameter search. benchmark /
    arch: a preset's folder and ID set. allow_partial, allow_overlap: accept unfinished
    caches, fitting caches sharing images with test caches. fitted_dir: where fits are
    kept. ci: an interval level in percent; resamples, seed: the bootstrap's. compare:
    ``("A,B", ...)`` or pairs; compare_level: their level without ``ci``. ensemble: the
    deep-ensemble row of a several-checkpoint table. csid: covariate-shifted ID sets, the
    ID side of the full-spectrum (FS-OOD) tables (default: the benchmark preset's that the
    folder holds). progress: a progress bar.
    """
    cache_dir: Optional[str] = None
    id: Optional[str] = None
    scores: tuple = ("all",)
    ood: tuple = ()
    convention: str = "sklearn"
    fit_on: Optional[str] = None
    params: dict = field(default_factory=dict)
    tune_on: Optional[str] = None
    tune_id: Optional[str] = None
    benchmark: Optional[str] = None
    arch: Optional[str] = None
    allow_partial: bool = False
    fitted_dir: Optional[str] = None
    allow_overlap: bool = False
    ci: Optional[float] = None
    resamples: int = 1000
    seed: int = 0
    compare: tuple = ()
    compare_level: float = 95
    checkpoint_dirs: tuple = ()
    ensemble: bool = True
    csid: Optional[tuple] = None
    progress: bool = False

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)
        put("scores", as_items(self.scores, "scores", split=True) or ("all",))
        put("ood", as_items(self.ood, "ood"))
        if self.csid is not None:
            put("csid", as_items(self.csid, "csid"))
        put("compare", as_items(self.compare, "compare", pairs=True))
        put("checkpoint_dirs", as_items(self.checkpoint_dirs, "checkpoint_dirs", split=True))
        if self.convention not in CONVENTIONS:
            raise ValueError(f"convention {self.convention!r}: choose one of {', '.join(CONVENTIONS)}")
        if self.params is not None and not hasattr(self.params, "items"):
            raise ValueError(f"params: expected {{score: {{name: value}}}}, got {self.params!r}")
        put("params", MappingProxyType({s: MappingProxyType(dict(p)) for s, p in (self.params or {}).items()}))
        put("ci", check_level(self.ci, "ci"))
        put("compare_level", check_level(self.compare_level, "compare_level"))
        put("resamples", check_resamples(self.resamples))
        if self.checkpoint_dirs and self.cache_dir:
            raise ValueError("give checkpoint_dirs (--checkpoint-dirs) or cache_dir (--cache-dir), not both")
        if self.checkpoint_dirs and self.csid:
            raise ValueError("csid (--csid): full-spectrum tables apply to one checkpoint's folder (--cache-dir), "
                             "not to a mean over checkpoints")
