"""Shared test configuration and session fixtures. The package under test is ``gradood``
as installed (``make install``: an editable install of this checkout). What the tests
share with the benchmarks (small models, in-memory extraction, the authors' passes
re-implemented) is the package ``bench`` of this checkout (``pythonpath = .`` in
setup.cfg)."""
import pytest

from bench.helpers import demo_workspace


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory):
    """``(data, ckpt)``: the demo images and a random-norm demo-layout checkpoint, built once
    per session. Read-only: a test that changes images or weights makes its own."""
    return demo_workspace(tmp_path_factory.mktemp("demo_files"))
