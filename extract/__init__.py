"""Extraction stage: run a classifier once over a dataset and cache what every score needs.

This package is the only one that imports torch. Its output is an HDF5 cache whose
layout is fixed by :mod:`store.schema`.

From Python::

    from gradood.extract import ExtractConfig, Provenance, extract_to_cache
    needs, passes = analyze.requirements(["gaia_z", "msp"])
    extract_to_cache(model, dataset, "caches/x/set.h5",
                     ExtractConfig(arch="resnet18", needs=needs, passes=passes),
                     Provenance(dataset="set"))
"""
from .config import ExtractConfig, Provenance
from .runner import ExtractionPlan, extract_to_cache

__all__ = ["ExtractConfig", "Provenance", "ExtractionPlan", "extract_to_cache"]
