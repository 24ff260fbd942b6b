"""Native memory of model actors: the trimmed heap and the bounded kernel caches."""

from __future__ import annotations

import ctypes
import os

import pytest

from core.heap import BOUNDED_KERNEL_CACHES, model_actor_runtime_env, release_free_heap

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_release_free_heap_hands_freed_pages_back():
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        pytest.skip("not glibc")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    # 64 KiB blocks sit on the heap (below glibc's mmap threshold); one kept block above them stops free()
    # from shrinking the heap by itself, as a live tensor does in an encode actor.
    blocks = [libc.malloc(64 * 1024) for _ in range(2048)]
    keep = libc.malloc(64 * 1024)
    for block in blocks:
        ctypes.memset(block, 1, 64 * 1024)
    for block in blocks:
        libc.free(block)
    held = resident_bytes()
    assert release_free_heap() is True
    released = held - resident_bytes()
    libc.free(keep)
    assert released > 64 * 2**20, f"only {released / 2**20:.0f} MiB of 128 MiB freed went back"


def test_model_actors_start_with_the_bounded_caches(ray_local):
    """The capacities are read at a process's first matmul: they reach the actor through its runtime env."""
    import ray

    class EnvProbe:  # defined here, so that Ray ships it by value
        def __call__(self, batch):
            batch["env"] = [",".join(os.environ.get(name, "") for name in BOUNDED_KERNEL_CACHES)] * len(batch["id"])
            return batch

    dataset = ray.data.range(4).map_batches(
        EnvProbe, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25, runtime_env=model_actor_runtime_env()
    )
    assert {row["env"] for row in dataset.take_all()} == {"64,64"}
    assert "LRU_CACHE_CAPACITY" not in os.environ  # the driver's own settings are left alone
