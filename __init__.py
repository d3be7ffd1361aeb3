"""gradood: gradient-based out-of-distribution detection in two stages.

One import name, four parts (the repository's top-level folders, mapped into this package
by ``setup.cfg``'s ``package_dir``):

    gradood.extract    run the classifier once, write HDF5 caches (needs the ``extract`` extra: torch)
    gradood.store      the cache format: schema, writer, reader (no torch)
    gradood.analyze    scores, metrics and tables from caches (no torch)
    gradood.pipeline   the command line (``gradood``, ``python -m gradood``, ``python pipeline.py``)

Imports run one way: pipeline -> extract -> store <- analyze.
"""
__version__ = "0.1.0"
