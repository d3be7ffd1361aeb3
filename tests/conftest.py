"""Shared test configuration. The package under test is ``gradood`` as installed
(``make install``: an editable install of this checkout); ``helpers`` and
``authors_reference`` sit beside the tests (pytest puts this folder on ``sys.path``)."""
