"""On-disk layout of a distdrgn particle store (storage/FORMAT.md is the specification).

A store is one Zarr v3 group::

    STORE.zarr/
      images            (N, D, D)  float32|float16, chunks of whole images inside shards
      images_<d>        (N, d, d)  optional Fourier-cropped copies (one per extra level d < D)
      crc32c/images     (n_chunks,) uint32, crc32c of each chunk's little-endian values
      crc32c/images_<d> (n_chunks_d,) uint32
      poses/rots        (N, 3, 3) float32   (only if poses are known)
      poses/trans       (N, 2)    float32   (fraction of the box)
      ctf               (N, 9)    float32   (ctf.pkl layout, box/apix of the source images)
      original_index    (N,)      int64     (position in the source particle list)
      source/...        the source .star/.cs rows of each particle, every column (source_table.py)

and group attributes (format, version, complete, levels, provenance, norm, ...).

Chunk and shard sizes come from :func:`plan_layout`; the defaults were chosen with
``benchmarks/store_layout.py`` (docs/data.md, "Layout choices"; benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

FORMAT_NAME = "distdrgn-particles"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)

IMAGES = "images"
CHECKSUM_GROUP = "crc32c"
ROTS = "poses/rots"
TRANS = "poses/trans"
CTF = "ctf"
ORIGINAL_INDEX = "original_index"
SOURCE_GROUP = "source"  # the source .star/.cs metadata, lossless (distdrgn/store/source_table.py)
SOURCE_ATTR = "source_metadata"  # root attribute summarising it: {"kind", "group", "rows", ...}

PARTIAL_SUFFIX = ".partial"

# Attributes beside the format's own: ``nonfinite`` (a store ingested with allow_nonfinite:
# {"count", "positions"} of images with NaN/inf pixels, the first MAX_RECORDED_NONFINITE
# positions) and ``verification`` (the result of the last ``store verify``, see verify.py).
NONFINITE_ATTR = "nonfinite"
VERIFICATION_ATTR = "verification"
MAX_RECORDED_NONFINITE = 1000
PROGRESS_DIR = "progress"  # inside the partial store: one JSON record per finished shard

MiB = 1 << 20
# Measured on simulated noisy particles (benchmarks/store_layout.py): read throughput is flat
# from 2 to 16 MiB chunks, so a chunk of ~4 MiB keeps random access fine-grained; shards of
# up to 128 MiB keep the file count at ~2000 for 1M particles of 256 px while an ingest
# worker holds only a few shards' worth of memory.
TARGET_CHUNK_BYTES = 4 * MiB
TARGET_SHARD_BYTES = 128 * MiB
# A small dataset gets at least this many shards so that ingest can still run in parallel
# (and each worker holds less).
MIN_SHARDS = 32
# Default number of ingest workers is capped so that workers * TASK_MEMORY_FACTOR * shard bytes
# stays within this budget: a task holds its shard once as read and twice more while zarr
# encodes it (measured: ~3.5x the shard's bytes at peak).
INGEST_MEMORY_BUDGET = 2 << 30
TASK_MEMORY_FACTOR = 4
MAX_DEFAULT_WORKERS = 8
# Lossless codecs buy ~7% on noisy float32 particles at a large read cost (docs/data.md, "Layout choices"; benchmarks/RESULTS.md),
# so stores are written uncompressed by default.
DEFAULT_CODEC = "none"
CODECS = ("none", "zstd", "blosc-zstd-bitshuffle", "blosc-lz4-shuffle")
DTYPES = ("float32", "float16")


def images_name(level: int, full_D: int) -> str:
    """Array name of the images at box size ``level`` (``images`` for the full size)."""
    return IMAGES if level == full_D else f"{IMAGES}_{level}"


def checksum_name(level: int, full_D: int) -> str:
    return f"{CHECKSUM_GROUP}/{images_name(level, full_D)}"


@dataclass(frozen=True)
class LevelLayout:
    """Chunking of one image array: ``chunk_images`` per chunk, ``shard_images`` per shard."""

    D: int
    chunk_images: int
    shard_images: int

    def to_dict(self) -> dict:
        return asdict(self)


def _chunk_images_for(image_bytes: int, target_chunk_bytes: int) -> int:
    return max(1, target_chunk_bytes // image_bytes)


def plan_layout(
    n: int,
    D: int,
    itemsize: int,
    levels: list[int],
    *,
    target_chunk_bytes: int = TARGET_CHUNK_BYTES,
    target_shard_bytes: int = TARGET_SHARD_BYTES,
    min_shards: int = MIN_SHARDS,
) -> dict[int, LevelLayout]:
    """Chunk/shard sizes (in images) for every level; ``levels`` includes the full box ``D``.

    All levels share ``shard_images`` so that one ingest task writes exactly one shard of
    every level and no two tasks ever touch the same shard file. The full level's chunk is
    ~``target_chunk_bytes``; its shard is ~``target_shard_bytes`` but at most ``n /
    min_shards`` images (rounded up to whole chunks), so small datasets still parallelise.
    A lower level's chunk is the largest multiple of the full chunk that divides the shard
    and stays within ``target_chunk_bytes``.
    """
    if n <= 0:
        raise ValueError("a store needs at least one image")
    image_bytes = D * D * itemsize
    chunk = min(n, _chunk_images_for(image_bytes, target_chunk_bytes))
    chunks_per_shard = max(1, target_shard_bytes // (chunk * image_bytes))
    small_cap = max(1, math.ceil(math.ceil(n / min_shards) / chunk))
    chunks_per_shard = min(chunks_per_shard, small_cap)
    shard = chunk * chunks_per_shard
    plan = {D: LevelLayout(D=D, chunk_images=chunk, shard_images=shard)}
    for d in levels:
        if d == D:
            continue
        want = _chunk_images_for(d * d * itemsize, target_chunk_bytes)
        mult = max(m for m in range(1, chunks_per_shard + 1) if chunks_per_shard % m == 0 and chunk * m <= max(want, chunk))
        plan[d] = LevelLayout(D=d, chunk_images=chunk * mult, shard_images=shard)
    return plan


def default_workers(plan: dict[int, LevelLayout], itemsize: int, cpus: int) -> int:
    """Parallel ingest tasks: one per CPU, at most MAX_DEFAULT_WORKERS, within INGEST_MEMORY_BUDGET."""
    task_bytes = TASK_MEMORY_FACTOR * sum(p.shard_images * p.D * p.D * itemsize for p in plan.values())
    return max(1, min(cpus, MAX_DEFAULT_WORKERS, INGEST_MEMORY_BUDGET // max(task_bytes, 1)))


def parse_levels(text: str | None) -> tuple[int, ...]:
    """``"64,128"`` -> ``(64, 128)``; empty or None -> ``()``."""
    if not text:
        return ()
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--levels must be comma-separated integers, got {text!r}") from None


def compressors_for(codec: str, itemsize: int):
    """The zarr ``compressors=`` argument for a codec name from :data:`CODECS`."""
    from zarr.codecs import BloscCodec, ZstdCodec

    if codec == "none":
        return None
    if codec == "zstd":
        return (ZstdCodec(level=3),)
    if codec == "blosc-zstd-bitshuffle":
        return (BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle", typesize=itemsize),)
    if codec == "blosc-lz4-shuffle":
        return (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=itemsize),)
    raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
