"""Benchmarks (``make bench``) and what they share with the tests: ``helpers`` (small
models, in-memory extraction) and ``authors_reference`` (the authors' per-score passes,
re-implemented). Not part of the installed package."""
