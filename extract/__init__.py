"""Extraction stage: run a classifier once over a dataset and cache what every score needs.

This package is the only one that imports torch. Its output is an HDF5 cache whose
layout is fixed by :mod:`store.schema`.
"""
