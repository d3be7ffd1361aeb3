"""Extraction stage: run a classifier once over a dataset and cache what every score needs.

This package is the only one that imports torch (its modules ``runner``, ``hooks``,
``models``, ...); importing the package itself does not: ``ExtractConfig`` and
``Provenance`` (``extract.config``) are plain data, built by the torch-free command line.
Its output is an HDF5 cache whose layout is fixed by :mod:`gradood.store.schema`.

From Python::

    from gradood import analyze
    from gradood.extract import ExtractConfig, Provenance
    from gradood.extract.runner import extract_to_cache
    needs, passes = analyze.requirements(["gaia_z", "msp"])
    extract_to_cache(model, dataset, "caches/x/set.h5",
                     ExtractConfig(arch="resnet18", needs=needs, passes=passes),
                     Provenance(dataset="set"))
"""
from .config import ExtractConfig, Provenance

__all__ = ["ExtractConfig", "Provenance"]
