"""Shared test configuration. The package under test is ``gradood`` as installed
(``make install``: an editable install of this checkout). What the tests share with the
benchmarks (small models, in-memory extraction, the authors' passes re-implemented) is
the package ``bench`` of this checkout (``pythonpath = .`` in setup.cfg)."""
