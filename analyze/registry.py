"""The score registry: one self-describing entry per score, built-in or from a plugin.

A score is registered with ``register_score`` on either

* a function ``f(data, **params) -> (n,) array`` (unfitted scores), or
* a class following scikit-learn's conventions: parameters in ``__init__`` (stored under
  their own names), ``fit(data) -> self`` setting fitted attributes whose names end in
  ``_``, and ``score(data) -> (n,) array``. ``fit`` receives every usable row of the
  fitting cache at once; ``score`` one block of rows of the cache being scored.

``data`` is an ``analyze.data.CacheData``. Scores return float64 ``(n,)``, higher = more
in-distribution. The keyword parameters (function) or ``__init__`` parameters (class)
and their defaults are the score's parameters: settable with ``--param SCORE.NAME=V``,
sweepable with ``--grid``.

Everything else the tool knows about a score is derived from its entry: what extraction
records (``needs``, ``passes``, ``default``), which caches it is fitted on (``fit_on``),
the sweep grid (``grid``), the published configurations (``paper``), the per-layer
variants (``layer_set``), the tables' titles.
"""
import importlib.util
import inspect
import os
import pkgutil
import re
import sys
from typing import Callable, NamedTuple, Optional

from gradood.store.recipes import PASSES, check_needs, missing
from gradood.store.schema import has_linear_head

SCORES = {}
ALIASES = {}
_PLUGIN_DIGESTS = {}      # plugin path -> SHA-256 of the file as last loaded
_BUILTIN_PREFIX = __name__.rpartition(".")[0] + "."     # "gradood.analyze.": built-in scores live below it


class ScoreError(ValueError):
    """A score cannot be computed as asked: bad parameters, or it failed on a cache."""


class ScoreCrash(ScoreError):
    """A score raised an unexpected exception (a bug in it, not a property of the cache):
    never turned into a "left out" note, even under ``--score all``."""


class ScoreEntry(NamedTuple):
    """Everything about one score.

    name: registry key (``--score NAME``). title: table title. reference: paper and the
    official code the score follows. impl: the function or class. needs: ``(hook set,
    source, stat)`` triples it reads (``source`` "act" or an objective; ``stat`` one of
    ``store.schema.STATS`` or "map"), or a callable ``needs(params) -> triples`` when the
    parameters change what is read. passes: extra extraction passes (``store.recipes.PASSES``).
    fit_on: None, "train" (the ID training cache, ``--fit-on``) or "validation" (a
    validation cache named by the ``validation`` parameter, default the ID test cache).
    fit_params: parameters that change the fit (the others apply at scoring only).
    params: ``{name: default}``. choices: ``{name: allowed values}``. grid: sweep tables
    ``[{param: [values]}]`` (``layers`` takes ``all``/``each``/names joined by ``+``).
    paper: ``{label: params}`` published configurations. default: extraction records it
    when no ``--score`` is given. layer_set: callable ``attrs -> [layer]`` of the layers
    ``layers=each`` iterates, or None. family: table group ("gradient", "logits",
    "features"). describe: optional ``describe(params, attrs) -> str`` naming the setting
    that ran (printed under tables). defined_on: optional ``defined_on(params, attrs) ->
    str``, the reason the score is not defined on the model a cache (or a model's
    description, ``pipeline.py scores --arch``) comes from, empty where it is.
    fit_requires: optional ``fit_requires(attrs) -> str``, the reason a fitting cache (its
    root ``attrs``) cannot fit the score although it holds what ``needs`` names, empty
    where it can. fit_memory: what a fit holds in memory (``pipeline.py scores``).
    plugin: the file that registered it (None for built-ins). linear_head: True when the
    score reads the head's weight and bias, or assumes the logits are ``W x + b`` of the
    cached features (closed-form last-layer gradients): refused on a model without a
    linear head (a cosine classifier, SqueezeNet, two averaged heads); or a callable
    ``linear_head(params) -> bool`` when the parameters decide it.
    """
    name: str
    title: str
    reference: str
    impl: Callable
    needs: object
    passes: tuple
    fit_on: Optional[str]
    fit_params: tuple
    params: dict
    choices: dict
    grid: list
    paper: dict
    default: bool
    layer_set: Optional[Callable]
    family: str
    describe: Optional[Callable]
    plugin: Optional[str]
    defined_on: Optional[Callable] = None
    fit_memory: str = ""
    fit_requires: Optional[Callable] = None
    linear_head: object = False

    @property
    def fit_grows(self):
        """True when what a fit holds grows with the fitting set: its ``fit_memory`` names
        ``n``, the number of fitting rows."""
        return bool(re.search(r"\bn\b", self.fit_memory))

    @property
    def fitted(self):
        """True when the score is fitted before scoring (a class entry)."""
        return inspect.isclass(self.impl)

    def needs_for(self, params=None):
        """``[(hook set, source, stat)]`` the score reads with ``params``."""
        needs = self.needs(self.resolve(params)) if callable(self.needs) else self.needs
        return [tuple(n) for n in needs]

    def problems(self, attrs, params=None):
        """What keeps a cache (its root ``attrs``) from serving this score with ``params``:
        the parts it lacks (``store.recipes.missing``), then ``defined_on``'s reason."""
        reason = self.model_problem(params, attrs)
        out = [f"{self.name} is not defined on this model: {reason}"] if reason else []
        return out + missing(self.needs_for(params), self.passes, attrs)

    def reads_head(self, params=None):
        """True when the score, with ``params``, needs the model's linear head (``linear_head``)."""
        return bool(self.linear_head(self.resolve(params)) if callable(self.linear_head) else self.linear_head)

    def model_problem(self, params, attrs):
        """Why the model a cache (its root ``attrs``, or a model's description,
        ``extract.adapters.serves.model_attrs``) comes from cannot serve this score with
        ``params``, or "": no linear head for a ``linear_head`` score, then ``defined_on``."""
        if self.reads_head(params) and not has_linear_head(attrs):
            return ("it reads the linear head (logits = W x + b of the features), and no nn.Linear or 1x1 "
                    "nn.Conv2d of the model outputs its logits (docs/models.md: models without a linear head)")
        return self.defined_on(self.resolve(params), attrs) if self.defined_on is not None else ""

    def resolve(self, params=None):
        """Defaults updated by ``params``; unknown names or values outside ``choices`` raise."""
        params = dict(params or {})
        unknown = [k for k in params if k not in self.params]
        if unknown:
            known = ", ".join(self.params) or "none"
            raise ScoreError(f"score {self.name} has no parameter {unknown[0]!r} (its parameters: {known})")
        for key, value in params.items():
            params[key] = _coerce(self.name, key, value, self.params[key], self.choices.get(key))
        return {**self.params, **params}

    def make(self, params=None):
        """The estimator for ``params``: an object with ``score(data)`` (and ``fit(data)``)."""
        full = self.resolve(params)
        if self.fitted:
            return self.impl(**full)
        return _FunctionScore(self.impl, full)

    def fit_key(self, params=None):
        """The parameters a saved fit depends on."""
        full = self.resolve(params)
        return {k: full[k] for k in self.fit_params}


class _FunctionScore:
    """Adapter giving a score function the estimator interface."""

    def __init__(self, fn, params):
        self.fn, self.params = fn, params

    def score(self, data):
        return self.fn(data, **self.params)


def _coerce(score, key, value, default, choices):
    """``value`` checked against the type of ``default`` and ``choices``."""
    where = f"{score}.{key}={value!r}"
    if choices is not None:
        if value not in choices:
            raise ScoreError(f"{where}: choose one of {', '.join(map(str, choices))}")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ScoreError(f"{where}: expected true or false")
    elif isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ScoreError(f"{where}: expected an integer")
    elif isinstance(default, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ScoreError(f"{where}: expected a number")
        value = float(value)
    return value


def _parameters(impl):
    """``{name: default}`` of a score function's keyword parameters or a class's ``__init__``."""
    target = impl.__init__ if inspect.isclass(impl) else impl
    sig = inspect.signature(target)
    names = list(sig.parameters.values())[1:]    # skip ``data`` / ``self``
    out = {}
    for p in names:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise ValueError(f"score parameter {p.name!r} of {impl.__name__} needs a default value")
        out[p.name] = p.default
    return out


def register_score(name, *, title=None, reference="", needs=(), passes=(), fit_on=None,
                   fit_params=None, choices=None, grid=None, paper=None, default=False,
                   layer_set=None, family="custom", describe=None, aliases=(), replace=False,
                   defined_on=None, fit_memory=None, fit_requires=None, linear_head=False):
    """Decorator registering a score function or class under ``name``; returns it unchanged.

    See ``ScoreEntry`` for the fields. A function's first argument (a class's ``fit`` and
    ``score`` argument) is an ``analyze.data.CacheData`` block; it returns ``(n,)``
    scores, higher = more in-distribution. ``fit_on`` defaults to "train" for classes.
    ``fit_params`` defaults to every parameter of a class. ``aliases``: other names that
    select the same entry (e.g. OpenOOD's names). Registering the name of a built-in score
    raises unless ``replace=True``; the same function again (a re-run notebook cell) or a
    plugin's score registered by another plugin replaces it.
    """
    def decorate(impl):
        old = SCORES.get(name)
        same = old is not None and (old.impl.__module__, old.impl.__qualname__) == (impl.__module__, impl.__qualname__)
        # a plugin may replace another plugin's score (the last one loaded wins); built-ins stay
        by_plugin = old is not None and old.plugin is not None and not impl.__module__.startswith(_BUILTIN_PREFIX)
        if old is not None and not (replace or same or by_plugin):
            raise ValueError(f"a score named {name!r} is already registered "
                             f"({SCORES[name].plugin or 'built in'}); choose another name")
        if not name.isidentifier():
            raise ValueError(f"score name {name!r} must be a Python identifier (letters, digits, _)")
        is_class = inspect.isclass(impl)
        if is_class and not (callable(getattr(impl, "fit", None)) and callable(getattr(impl, "score", None))):
            raise ValueError(f"score class {impl.__name__} needs fit(data) and score(data) methods")
        if not callable(needs):
            check_needs(needs, where=f"score {name}")
        bad = [p for p in passes if p not in PASSES]
        if bad:
            raise ValueError(f"score {name}: unknown extraction pass {bad[0]!r}; choose from {', '.join(PASSES)}")
        params = _parameters(impl)
        source = None if not is_class else (fit_on or "train")
        if source not in (None, "train", "validation"):
            raise ValueError(f"score {name}: fit_on must be 'train' or 'validation', got {source!r}")
        for table in grid or []:
            for key in table:
                if key not in params:
                    raise ValueError(f"score {name}: grid key {key!r} is not a parameter ({', '.join(params)})")
        plugin = getattr(sys.modules.get(impl.__module__), "__file__", None)
        builtin = impl.__module__.startswith(_BUILTIN_PREFIX)
        SCORES[name] = ScoreEntry(
            name=name, title=title or name, reference=reference, impl=impl,
            needs=needs if callable(needs) else [tuple(n) for n in needs], passes=tuple(passes),
            fit_on=source, fit_params=tuple(params if fit_params is None else fit_params) if is_class else (),
            params=params, choices=dict(choices or {}), grid=list(grid or []), paper=dict(paper or {}),
            default=default, layer_set=layer_set, family=family, describe=describe,
            plugin=None if builtin else plugin, defined_on=defined_on, fit_requires=fit_requires,
            fit_memory=(fit_memory or "n D") if is_class else "",
            linear_head=linear_head if callable(linear_head) else bool(linear_head))
        for alias in aliases:
            ALIASES[alias] = name
        return impl
    return decorate


def entry(name):
    """The entry of score ``name``; unknown names list the registered ones."""
    _load_builtins()
    name = ALIASES.get(name, name)
    if name not in SCORES:
        raise ScoreError(f"unknown score {name!r}; choose one of: {', '.join(SCORES)} (or all)")
    return SCORES[name]


def canonical(name):
    """The registered name of ``name`` (an alias resolves to its entry's name)."""
    return entry(name).name


def all_entries():
    """Every registered entry, built-ins first, in registration order."""
    _load_builtins()
    return dict(SCORES)


def default_scores():
    """Scores extraction records when no ``--score`` is given."""
    return [n for n, e in all_entries().items() if e.default]


def paper_variants():
    """``{label: (score, params)}`` of every published configuration."""
    return {label: (n, p) for n, e in all_entries().items() for label, p in e.paper.items()}


def default_grid():
    """``{score: [table]}`` of every entry's sweep grid."""
    return {n: e.grid for n, e in all_entries().items() if e.grid}


def requirements(names, params=None):
    """``(needs, passes)`` an extraction must record to serve the scores ``names`` with
    ``params`` ({score: {parameter: value}}): for ``extract.ExtractConfig``."""
    params = params or {}
    needs, passes = [], []
    for name in names:
        e = entry(name)
        for need in e.needs_for(params.get(name)):
            if need not in needs:
                needs.append(need)
        passes += [p for p in e.passes if p not in passes]
    return needs, tuple(passes)


def load_plugin(path):
    """Import the Python file at ``path``; the scores it registers join the registry.

    Returns the names it added. A file loaded again unchanged is not re-run; an edited
    file (another SHA-256) is re-run, its earlier scores replaced (a notebook's edit-reload
    cycle). Every file gets its own module, so ``a-b.py`` and ``a_b.py`` never collide.
    """
    import hashlib
    _load_builtins()
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ScoreError(f"plugin file not found: {path}")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    module_name = "gradood_plugin_" + hashlib.sha256(path.encode()).hexdigest()[:16]
    if module_name in sys.modules and _PLUGIN_DIGESTS.get(path) == digest:
        return [n for n, e in SCORES.items() if e.plugin == path]
    for name in [n for n, e in SCORES.items() if e.plugin == path]:      # an edited file: re-run it
        del SCORES[name]
        for alias in [a for a, n in ALIASES.items() if n == name]:
            del ALIASES[alias]
    sys.modules.pop(module_name, None)
    _PLUGIN_DIGESTS[path] = digest
    before = set(SCORES)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        raise ScoreError(f"plugin {path} failed to load: {type(err).__name__}: {err}") from err
    added = [n for n in SCORES if n not in before]
    for n in added:
        SCORES[n] = SCORES[n]._replace(plugin=path)
    if not added:
        raise ScoreError(f"plugin {path} registered no score (decorate a function or class with "
                         "@register_score, from gradood.analyze import register_score)")
    return added


_BUILTINS_LOADED = []


def builtin_modules(package=None):
    """Names of the built-in score modules, discovered (never listed): the modules of
    ``gradood.analyze.scores`` in alphabetical order (the gradient scores), then those of
    each subpackage (``baselines``), each in alphabetical order. That is the order of the
    registry, of ``--score all`` and of the tables. Adding a detector is adding a module."""
    package = package or _BUILTIN_PREFIX + "scores"
    root = importlib.import_module(package)
    found = sorted(pkgutil.iter_modules(root.__path__), key=lambda m: m.name)
    modules = [f"{package}.{m.name}" for m in found if not m.ispkg]
    for sub in (m for m in found if m.ispkg):
        modules += builtin_modules(f"{package}.{sub.name}")
    return modules


def _load_builtins():
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED.append(True)
        for module in builtin_modules():
            importlib.import_module(module)
