"""Where model work runs: the device a worker uses, the Ray tasks that carry a stage's resources, and a
record of every model load (docs/design.md, "Placement").

The driver plans, schedules and merges small results; it never loads a model. Model work runs in a Ray
task, actor or Train worker that asks for the stage's CPUs and GPUs, and picks its device there, from what
Ray gave it: CUDA when it was given a GPU, the CPU when it was given none. `FINESCOPE_FORCE_CPU=1` makes a
worker that was given a GPU use the CPU instead; it exists so that a GPU configuration, placed on a local
cluster whose worker node only advertises a GPU, runs end to end on a machine without one (tests).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from core.errors import ConfigError

logger = logging.getLogger(__name__)

FORCE_CPU = "FINESCOPE_FORCE_CPU"
LOAD_LOG = "FINESCOPE_LOAD_LOG"
ACCELERATOR = "accelerator"
"""A spec's device meaning "the GPU Ray gave this worker": resolved in the worker, never on the driver."""
PROPAGATED = (FORCE_CPU, LOAD_LOG)
"""Placement settings a driver passes on to every worker of its job (core.runtime.init_ray)."""

T = TypeVar("T")


def cpu_forced() -> bool:
    return os.environ.get(FORCE_CPU, "") not in ("", "0")


def requested_device(gpus: float) -> str:
    """The device a driver writes into a spec: `accelerator` when the stage asks for GPUs, else cpu."""
    return ACCELERATOR if gpus > 0 else "cpu"


def resolve_device(device: str) -> str:
    """A spec's device as this process runs it: `accelerator` becomes cuda (or cpu when forced)."""
    if device != ACCELERATOR:
        return device
    if cpu_forced():
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            f"this worker was given a GPU but CUDA is not available here "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); ask for no GPUs "
            f"(gpus: 0 and the like), or set {FORCE_CPU}=1 to run a GPU configuration on CPU"
        )
    return "cuda"


def worker_device(gpus: float) -> str:
    """The device of a worker that holds `gpus` GPUs, decided in that worker."""
    return resolve_device(requested_device(gpus))


AUTO_DTYPE = "auto"
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
"""CPU flags (x86 /proc/cpuinfo `flags`, arm64 `Features`) of cores that compute bfloat16 natively."""


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The first core's feature flags; empty where /proc/cpuinfo does not exist (macOS, Windows)."""
    try:
        with open(cpuinfo) as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[-1].split())
    except OSError:
        pass
    return set()


BF16_MIN_SPEEDUP = 1.25
"""On a CPU with a bf16 flag, `auto` picks bf16 only where its matmuls run at least this much faster than
float32's. The flag says the instructions exist, not that they are fast: on an Intel Xeon VM with
avx512_bf16 and no AMX exposed (2026-12-04), oneDNN's avx512_core_bf16 kernels ran at 0.54x fp32's rate
and the bf16 encode at 0.62x (docs/results.md, "bfloat16 encode")."""


def native_bf16(device: str) -> bool:
    """Whether `device` (cpu or cuda) computes bfloat16 matmuls natively and faster than float32: a CUDA
    GPU with bf16; a CPU with a bf16 flag whose bf16 matmuls measure `BF16_MIN_SPEEDUP` times fp32's."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(BF16_FLAGS & cpu_flags()) and bf16_matmul_speedup() >= BF16_MIN_SPEEDUP


@functools.cache
def bf16_matmul_speedup(size: tuple[int, int, int] = (1024, 576, 1536), repeats: int = 5) -> float:
    """bf16 over float32 matmul throughput on this CPU, at this process's torch threads, measured once per
    process (about 0.1 s): the best of `repeats` (m, k) x (k, n) products each, interleaved."""
    import time

    import torch

    m, k, n = size
    a, b = torch.randn(m, k), torch.randn(k, n)
    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    for _ in range(repeats + 1):  # the first round warms both kernels up
        for dtype in best:
            x, y = a.to(dtype), b.to(dtype)
            started = time.perf_counter()
            torch.mm(x, y)
            best[dtype] = min(best[dtype], time.perf_counter() - started)
    speedup = best[torch.float32] / best[torch.bfloat16]
    logger.info("bf16 matmuls run at %.2fx float32's on this CPU (%d threads)", speedup, torch.get_num_threads())
    return speedup


def shape_free_attention(device: Any) -> None:
    """On CUDA, take cuDNN's kernels out of torch's scaled_dot_product_attention, for this process.

    cuDNN's attention builds an execution plan for every (batch, length) shape it has not seen before, and
    every micro-batch of documents, every prefill and every decode step here has a new one: plan building,
    not attention, then takes most of a forward's time (`python -m bench.gpu.encode`). Flash and
    memory-efficient attention need no plan. A no-op on other devices."""
    import torch

    if torch.device(device).type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def resolve_dtype(name: str, device: str) -> str:
    """A spec's dtype as this worker runs it: `auto` becomes bfloat16 where the device computes it natively
    (a GPU with bf16, a CPU with AVX512-BF16, AMX or arm64 BF16), float32 elsewhere."""
    if name != AUTO_DTYPE:
        return name
    return "bfloat16" if native_bf16(device) else "float32"


def record_model_load(what: str, device: Any) -> None:
    """Append where a model was just loaded (pid, Ray node, driver or worker) to $FINESCOPE_LOAD_LOG, if set."""
    path = os.environ.get(LOAD_LOG)
    if not path:
        return
    row: dict[str, Any] = {"pid": os.getpid(), "node": None, "driver": True, "task": None}
    ray = sys.modules.get("ray")  # never import Ray here: the stage cores run without it
    if ray is not None and ray.is_initialized():
        context = ray.get_runtime_context()
        row["node"] = context.get_node_id()
        row["driver"] = context.worker.mode != ray.WORKER_MODE
        row["task"] = None if row["driver"] else context.get_task_name()
    row.update(what=str(what), device=str(device))
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def run_remote(fn: Callable[..., T], /, *args: Any, num_cpus: float, num_gpus: float = 0, **kwargs: Any) -> T:
    """Run `fn(*args, **kwargs)` in one Ray task holding these resources, and return its result.

    Ray must be initialised. `fn` must be importable by the workers (a module-level function).
    """
    import ray

    task = ray.remote(fn).options(num_cpus=num_cpus, num_gpus=num_gpus, name=getattr(fn, "__qualname__", None))
    try:
        return ray.get(task.remote(*args, **kwargs))
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, ConfigError):  # a setting the task found wrong: the user's to fix
            raise error.cause from None
        raise


def dtype_decision(name: str, device: str) -> dict[str, Any]:
    """What `name` means on `device` in this process, and what decided it, for manifests and reports:
    `asked`, `device`, `dtype`, and for `auto` the CPU's bf16 flags and the measured bf16/fp32 matmul ratio
    (on a CPU), or the GPU's name. Two machines that resolve `auto` differently select different documents,
    so the record says which one ran."""
    resolved = resolve_dtype(name, device)
    decision: dict[str, Any] = {"asked": name, "device": device, "dtype": resolved}
    if name != AUTO_DTYPE:
        return decision
    if device.startswith("cuda"):
        import torch

        decision["gpu"] = torch.cuda.get_device_name()
        return decision
    flags = sorted(BF16_FLAGS & cpu_flags())
    decision["cpu_bf16_flags"] = flags
    if flags:
        decision["bf16_matmul_speedup"] = round(bf16_matmul_speedup(), 3)
        decision["bf16_min_speedup"] = BF16_MIN_SPEEDUP
    return decision


def _decide_in_worker(name: str, device: str, threads: int) -> dict[str, Any]:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    return dtype_decision(name, resolve_device(device))


def decide_dtype(name: str, device: str, threads: int, *, num_cpus: float, num_gpus: float) -> dict[str, Any]:
    """:func:`dtype_decision` taken once for a whole stage, in a Ray task holding one model actor's resources
    (its device and threads), so every actor runs the dtype the manifest records. Ray must be initialised;
    a dtype other than `auto` needs no task."""
    if name != AUTO_DTYPE:
        return {"asked": name, "device": "cuda" if device == ACCELERATOR else device, "dtype": name}
    return run_remote(_decide_in_worker, name, device, threads, num_cpus=num_cpus, num_gpus=num_gpus)


def describe_dtype(decision: dict[str, Any] | None) -> str:
    """One line for reports: `bfloat16 on cpu (auto: bf16 matmuls 5.91x float32's)`."""
    if not decision:
        return "not recorded"
    text = f"{decision['dtype']} on {decision['device']}"
    if decision.get("asked") != AUTO_DTYPE:
        return text
    if "gpu" in decision:
        return f"{text} (auto: {decision['gpu']})"
    if "bf16_matmul_speedup" in decision:
        speedup, needed = decision["bf16_matmul_speedup"], decision["bf16_min_speedup"]
        return f"{text} (auto: bf16 matmuls measured {speedup}x float32's; bf16 is chosen at {needed}x or more)"
    return f"{text} (auto: no native bf16 on this CPU)"
