"""Native memory of long-lived model actors: bounded per-shape kernel caches and a trimmed C heap.

A CPU matmul in bf16 runs through ideep and oneDNN, and each keeps a compiled primitive per input
shape, up to 1,024 of them. Length-bucketed micro-batches bring new (rows x tokens) shapes all the
time, so an encode actor's memory grew with the corpus, by about 90 MB per 1,024 documents of the
demo corpus, and glibc kept about 400 MB of freed heap besides (docs/results.md, "Scaling"). With 64
primitives each and the heap trimmed after every batch it stays flat, at no measured cost in speed.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

# Both are read once, when the process first runs such a matmul: they belong in the actor's runtime env,
# set before its process starts, not in os.environ of a process that may have run one already.
BOUNDED_KERNEL_CACHES = {"LRU_CACHE_CAPACITY": "64", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}


def model_actor_runtime_env() -> dict[str, Any]:
    """The runtime env for a Ray actor that runs a model over many batch shapes (Ray merges the job's)."""
    return {"env_vars": dict(BOUNDED_KERNEL_CACHES)}


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: macOS, musl
        return None


def release_free_heap() -> bool:
    """Hand the C heap's free pages back to the system (glibc's `malloc_trim`). False where there is none."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
