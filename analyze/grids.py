"""Sweep grids: which variants of the scores a sweep or a parameter search tries.

A variant is a score name plus parameters. A grid gives, per score, lists of values whose
product is swept; its keys are the score's parameters (``analyze.registry``), so a
plugin's keyword parameters are sweepable too. The special ``layers`` values are ``all``
(the score's default layers), ``each`` (every layer of the score's ``layer_set`` on its
own: the per-layer contribution) or names joined by ``+``.

Grids come from TOML (one table per score) or the command line
(``gaia_z:spatial=nonzero,mean;channel=sq_mean,l2;layers=all,each``). The default grid is
the union of the entries' ``grid`` (``registry.default_grid``).
"""
import itertools
import json
import tomllib

from .registry import all_entries, entry


def _check_table(name, table, where):
    e = entry(name)
    for key, values in table.items():
        if key not in e.params:
            raise ValueError(f"{where}: {name} has no parameter {key!r} (its parameters: "
                             f"{', '.join(e.params) or 'none'})")
        if key != "layers":
            for v in values:
                e.resolve({key: v})


def parse_grid_text(items):
    """``{score: [table]}`` from command-line grids ``score:key=v1,v2;key=v3``."""
    grid = {}
    for item in items:
        name, sep, body = item.partition(":")
        if name not in all_entries():
            raise ValueError(f"--grid {item!r}: unknown score {name!r}; choose one of: {', '.join(all_entries())}")
        table = {}
        for part in filter(None, body.split(";")):
            key, eq, values = part.partition("=")
            if not eq:
                raise ValueError(f"--grid {item!r}: expected key=v1,v2 in {part!r}")
            table[key.strip()] = [_value(v) for v in values.split(",")]
        _check_table(name, table, f"--grid {item!r}")
        grid.setdefault(name, []).append(table)
    return grid


def _value(text):
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        return text


def load_grid_file(path):
    """``{score: [table]}`` from a TOML file: ``[score]`` tables or ``[[score]]`` arrays of tables."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"grid file {path}: not valid TOML ({err})") from None
    grid = {}
    for name, tables in raw.items():
        if name not in all_entries():
            raise ValueError(f"{path}: unknown score table [{name}]; choose from: {', '.join(all_entries())}")
        for table in tables if isinstance(tables, list) else [tables]:
            table = {k: v if isinstance(v, list) else [v] for k, v in table.items()}
            _check_table(name, table, path)
            grid.setdefault(name, []).append(table)
    return grid


def _label(name, params):
    shown = ", ".join(f"{k}={'+'.join(v) if isinstance(v, list) else v}" for k, v in params.items()
                      if k != "hyper")
    return f"{entry(name).title} {shown}".strip()


def expand(grid, attrs):
    """List of ``(label, score, params)`` variants of ``grid`` for a cache with ``attrs``."""
    out = []
    for name, tables in grid.items():
        e = entry(name)
        for table in tables:
            keys = list(table)
            for combo in itertools.product(*(table[k] for k in keys)):
                params = dict(zip(keys, combo))
                layers = params.pop("layers", "all")
                if layers == "all":
                    choices = [None]
                elif layers == "each":
                    if e.layer_set is None:
                        raise ValueError(f"{name} has no per-layer variants (layers=each)")
                    choices = [[l] for l in e.layer_set(attrs)]
                else:
                    choices = [layers.split("+") if isinstance(layers, str) else list(layers)]
                for chosen in choices:
                    p = dict({"layers": chosen} if chosen is not None else {}, **params)
                    out.append((_label(name, p), name, p))
    return out


def candidates(name, attrs, base=None):
    """Parameter dicts to try for score ``name``: the defaults (updated by ``base``), then
    the grid's variants, in grid order, those the cache with ``attrs`` can serve."""
    e = entry(name)
    base = dict(base or {})
    tables = [t for t in e.grid if "each" not in t.get("layers", [])]
    found = [base]
    for _, _, params in expand({name: tables}, attrs) if tables else []:
        p = {**base, **params}
        if p not in found and not e.problems(attrs, p):
            found.append(p)
    return found
