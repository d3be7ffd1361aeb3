"""Whether an existing cache can stand in for an extraction run: the cache-reuse policy,
beside the run identity it compares (``store.writer.run_identity``).

A complete cache with the same run identity is reused as it is; one from the same model
and rows that holds everything the run's needs and passes read is reused too, whatever
else it holds; any other is refused with what differs or what it lacks, unless the run
overwrites it. Library code: raises, and reports what it decided through ``log``.
"""
import os
import shutil

from .reader import CacheReader
from .recipes import comparable, layers_of, missing
from .schema import CacheError, differing, odin_name, odin_pairs
from .writer import parts_dir, run_identity


_ROWS = ("dataset", "dataset_root", "split", "subset", "n_samples")


def _source(attrs, needs, passes, sets):
    """What a cache must share with a run to stand in for it: the model parts the needs
    read (``store.recipes.comparable``) among the hook sets ``sets`` (those the cache
    holds; the others are what it lacks) and the rows (data, split, subset, count)."""
    needs = [n for n in needs if layers_of(sets, n[0])]
    return {"model": comparable(attrs, needs, passes),
            **{k: attrs.get(k) for k in _ROWS}}


def _change(key, was, now):
    """``key: <cached value> in the cache, <value> now`` for a short scalar, else ``key``."""
    for part in key.split("."):
        was = was.get(part) if isinstance(was, dict) else None
        now = now.get(part) if isinstance(now, dict) else None
    if all(v is None or isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) < 80)
           for v in (was, now)):
        return f"{key}: {was} in the cache, {now} now"
    return key


def _lacks(old, needs, passes, odin):
    """What the complete cache ``old`` lacks for ``needs``, ``passes`` and the ODIN passes."""
    lacks = missing(needs, passes, old)
    if "odin" in passes:
        have = {tuple(p) for p in odin_pairs(old)}
        absent = [p for p in odin if tuple(p) not in have]
        if absent:
            lacks.append("ODIN passes " + ", ".join(odin_name(*p) for p in absent))
    return lacks


def check_existing(target, attrs, overwrite, log, needs=(), passes=(), scores=()):
    """Decide what to do with an existing cache file ``target`` for a run writing ``attrs``:
    True = skip it (it is complete and equal, or it comes from the same model and rows and
    holds everything ``needs`` and ``passes`` read, whatever else it holds); False =
    extract (after removing it with ``overwrite``); raises CacheError naming what it lacks
    or where it differs otherwise."""
    if not os.path.exists(target):
        if overwrite and os.path.isdir(parts_dir(target)):
            shutil.rmtree(parts_dir(target))
            log(f"{attrs['dataset']}: --overwrite: removed the unfinished run {parts_dir(target)}")
        return False
    if overwrite:
        os.remove(target)
        log(f"{attrs['dataset']}: --overwrite: removed {target}")
        return False
    try:
        with CacheReader(target) as r:
            old = r.attrs
    except CacheError as err:
        raise CacheError(f"{target} exists but cannot be used ({err}); pass --overwrite to "
                         "re-extract it") from None
    diff = differing(run_identity(old), run_identity(attrs))
    if not diff:
        log(f"{attrs['dataset']}: {target} is complete and up to date (same model, data and plan); skipped")
        return True
    sets = old.get("hook_sets") or {}
    source = differing(_source(old, needs, passes, sets), _source(attrs, needs, passes, sets))
    lacks = [] if source else _lacks(old, needs, passes, odin_pairs(attrs))
    if not source and not lacks:
        log(f"{attrs['dataset']}: {target} already serves {', '.join(scores) or 'the requested scores'} "
            "(same model and images); skipped")
        return True
    if source:
        was, now = _source(old, needs, passes, sets), _source(attrs, needs, passes, sets)
        what = ("other rows of the set" if all(k.split(".")[0] in _ROWS for k in source)
                else "another model or other images")
        why = f"it holds {what} ({'; '.join(_change(k, was, now) for k in source)})"
    else:
        why = f"it lacks {'; '.join(lacks)}"
    raise CacheError(f"{target} exists and cannot serve {', '.join(scores) or 'this run'}: {why}; pass "
                     "--overwrite (make: OVERWRITE=1) to replace it, or choose another --cache-dir or "
                     "dataset name")
