"""The HDF5 cache: the contract between ``extract`` and ``analyze``.

Everything about the file layout lives in :mod:`store.schema`; the writer and reader
follow it, and the reader validates it. This package never imports torch.
"""
from .schema import SCHEMA_VERSION, CacheError  # noqa: F401
