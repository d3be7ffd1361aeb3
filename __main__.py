"""``python -m gradood``: the command line (``gradood.pipeline``)."""
from gradood.pipeline import cli

cli()
