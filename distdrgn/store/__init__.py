"""Zarr v3 particle stores: ``ingest`` writes them, :class:`ParticleStore` reads them.

Format specification: storage/FORMAT.md. Layout constants and chunk/shard sizing:
:mod:`distdrgn.store.layout`.
"""

from distdrgn.store.layout import FORMAT_NAME, FORMAT_VERSION
from distdrgn.store.reader import ParticleStore


def ingest(*args, **kwargs):
    """See :func:`distdrgn.store.writer.ingest` (imported lazily: it pulls in torch and dask)."""
    from distdrgn.store.writer import ingest as _ingest

    return _ingest(*args, **kwargs)


__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "ParticleStore", "ingest"]
