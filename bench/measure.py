"""What every bench measures the same way: time, peak memory, FLOPs and MFU, the machine, and the JSON file.

- **Time**: a method is timed in units (one call, or one micro-batch of a call), every unit once per round,
  the methods taking turns. Its figure is the sum over its units of each unit's fastest round: on a shared
  machine noise only ever adds time, and per-unit minima shed it better than a best whole round. Wall and
  CPU time are both kept. On CUDA the device is synchronised before and after each unit, so a unit's time
  is the work it queued, not only its launch.
- **Peak memory**: on the CPU, the resident-set high-water mark (`VmHWM` in /proc) of each process of a
  process tree, this process or a child; on CUDA, `torch.cuda.max_memory_allocated`.
- **FLOPs and MFU**: a forward multiplies each weight of the decoder blocks and the LM head once per
  token, 2 FLOPs each (`linear_params`); a training step costs 3 forwards. MFU is tokens/s x FLOPs per
  token over the device's dense bf16 peak.
- **JSON** (`--json PATH` on every bench): `name`, `date`, `machine` (CPU model, cores, torch version, GPU
  name or null), `settings` (the flags), `results` (the figures) and `ratios` (what the bench compares).

Imports no Ray, DeepSpeed or vLLM (the GPU checks run where none is installed), and torch and psutil only
inside the functions that need them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MB = 1024 * 1024
GIB = 1024**3

# Dense bf16 peak FLOP/s of common accelerators (vendor datasheets, no sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


# The command line and the JSON file ------------------------------------------------------------------------


def bench_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """A bench's parser: its docstring as help, flags never abbreviated, and `--json PATH`.

    `name` is the module under `bench` (`eval_throughput`, `gpu.check`): the usage line shows the command that
    runs it, and the JSON file names it."""
    parser = argparse.ArgumentParser(
        prog=f"python -m bench.{name}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures to this JSON file")
    return parser


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The flags a bench ran with, as the JSON file's `settings` (where the file goes is left out)."""
    return {key: value for key, value in vars(args).items() if key != "json"}


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), or what the platform says."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Where a bench ran: CPU model, logical cores, torch version, and the GPU's name (None without CUDA)."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "gpu": gpu}


def _plain(value: object) -> object:
    """JSON for what `json` does not know: numpy scalars and arrays, tensors, paths, dataclasses."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(value)
    return str(value)


def write_json(
    path: str, name: str, settings: Mapping[str, Any], results: Mapping[str, Any], ratios: Mapping[str, Any]
) -> None:
    """Write a bench's figures in the one shape every bench shares (see the module's docstring)."""
    payload = {
        "name": name,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": dict(settings),
        "results": dict(results),
        "ratios": dict(ratios),
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2, default=_plain) + "\n")


def publish(name: str, args: argparse.Namespace, lines: Sequence[str], results: Mapping[str, Any],
            ratios: Mapping[str, Any]) -> int:  # fmt: skip
    """A bench's ending: its table printed, and its JSON written where `--json` says. Returns exit status 0."""
    print("\n".join(lines), flush=True)
    if args.json:
        write_json(args.json, name, settings_of(args), results, ratios)
    return 0


# Time ------------------------------------------------------------------------------------------------------


def synchronize(device: str | None) -> None:
    """Wait for the work queued on a CUDA device; nothing for the CPU."""
    if device is not None and str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: str | None = None) -> tuple[object, float]:
    """One call: its result and its wall seconds, the device synchronised on both sides."""
    synchronize(device)
    started = time.perf_counter()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - started


@dataclass
class Rounds:
    """One method's timings: per unit, its wall and CPU seconds in each round, and its last result."""

    name: str
    wall: list[list[float]]
    cpu: list[list[float]]
    results: list[object] = field(default_factory=list)

    def record(self, unit: int, function: Callable[[], object], device: str | None) -> None:
        synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        self.results[unit] = function()
        synchronize(device)
        self.wall[unit].append(time.perf_counter() - wall)
        self.cpu[unit].append(time.process_time() - cpu)

    def _clock(self, clock: str) -> list[list[float]]:
        return self.cpu if clock == "cpu" else self.wall

    def round_seconds(self, clock: str = "wall") -> list[float]:
        """Seconds of each whole round (every unit's time in that round, summed)."""
        return [sum(times) for times in zip(*self._clock(clock), strict=True)]

    def best(self, clock: str = "wall") -> float:
        """The sum over units of each unit's fastest round."""
        return sum(min(times) for times in self._clock(clock))

    def median(self, clock: str = "wall") -> float:
        """The median whole round, for comparison with `best`."""
        return statistics.median(self.round_seconds(clock))


def best_of_rounds(
    methods: Mapping[str, Callable[[], object] | Sequence[Callable[[], object]]],
    rounds: int,
    device: str | None = None,
    rotate: bool = False,
    after_round: Callable[[int, dict[str, Rounds]], None] | None = None,
) -> dict[str, Rounds]:
    """Time every unit of every method once per round, the methods interleaved unit by unit.

    A method is one callable or a sequence of them (its units). Interleaving puts the methods side by side in
    time, so a burst of load from another process hits all of them rather than one; with `rotate` the order
    also turns at every step, so no method always runs first. `after_round(index, timings)` runs after each
    round (progress lines, a load sample)."""
    units = {name: list(unit) if isinstance(unit, Sequence) else [unit] for name, unit in methods.items()}
    timings = {name: Rounds(name, [[] for _ in calls], [[] for _ in calls], [None] * len(calls))
               for name, calls in units.items()}  # fmt: skip
    names = list(units)
    steps = max(len(calls) for calls in units.values())
    for index in range(rounds):
        for step in range(steps):
            shift = (index + step) % len(names) if rotate else 0
            for name in names[shift:] + names[:shift]:
                if step < len(units[name]):
                    timings[name].record(step, units[name][step], device)
        if after_round is not None:
            after_round(index, timings)
    return timings


# Peak memory -----------------------------------------------------------------------------------------------


def _status_bytes(pid: int | str, fields: Sequence[str]) -> dict[str, int]:
    """Memory fields of /proc/PID/status (VmHWM, VmRSS, RssAnon, ...) in bytes; missing ones are absent."""
    wanted, found = set(fields), {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in wanted:
                found[key] = int(rest.split()[0]) * 1024
    return found


def peak_rss_mb(pid: int | None = None) -> float:
    """The peak resident set (the kernel's high-water mark, `VmHWM`) of a process, this one by default, in MB.

    Not `ru_maxrss`: Linux carries it across exec, so a fresh child would report its parent's peak."""
    return _status_bytes(pid or "self", ["VmHWM"])["VmHWM"] / MB


def cuda_peak_gib(device: str | None = None) -> float:
    """The most GPU memory torch has held since the last `reset_cuda_peak`, in GiB."""
    import torch

    return torch.cuda.max_memory_allocated(device) / GIB


def reset_cuda_peak(device: str | None = None) -> None:
    """Start a new `cuda_peak_gib` window."""
    import torch

    torch.cuda.reset_peak_memory_stats(device)


class TreeMonitor:
    """Peak memory of a process and of each of its descendants, sampled on a thread until `stop`: the peak
    RSS (`VmHWM`, exact between samples) and anonymous RSS (RSS less file-backed and shared pages) every
    `interval` seconds, the peak USS every `uss_every`-th time.

    USS is read from /proc/PID/smaps, a walk of the process's page tables under its memory-map lock. At 5
    sweeps a second over a local Ray's ~13 processes that took about a third of a core and stalled the
    sampled processes' own allocations: SAE training's stage (100k tokens, 2 cores) took 435 s instead of
    332 s. /proc/PID/status, where the RSS figures come from, costs next to nothing.
    """

    def __init__(self, pid: int, interval: float = 0.2, uss_every: int = 10):
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.uss_every = uss_every
        # pid -> (latest process title, peak rss, peak uss, peak anonymous rss), in bytes
        self.peaks: dict[int, tuple[str, int, int, int]] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self, process, with_uss: bool) -> None:
        import psutil

        try:
            title = " ".join(process.cmdline())[:120]
            memory = _status_bytes(process.pid, ["VmHWM", "RssAnon"])
            uss = process.memory_full_info().uss if with_uss else 0
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            return
        if "VmHWM" not in memory:  # a process exiting: its memory is gone already
            return
        _, peak_rss, peak_uss, peak_anon = self.peaks.get(process.pid, ("", 0, 0, 0))
        # Ray renames a worker process after the task or actor it runs: keep the most specific title.
        keep = title if title.startswith("ray::") and "IDLE" not in title else self.peaks.get(process.pid, (title,))[0]
        peaks = (max(peak_rss, memory["VmHWM"]), max(peak_uss, uss), max(peak_anon, memory.get("RssAnon", 0)))
        self.peaks[process.pid] = (keep or title, *peaks)

    def _run(self) -> None:
        import psutil

        sweeps = 0
        while not self._done.is_set():
            try:
                family = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for process in family:
                self._sample(process, with_uss=sweeps % self.uss_every == 0)
            sweeps += 1
            self._done.wait(self.interval)

    def stop(self) -> None:
        """Stop sampling; the peaks stay readable."""
        self._done.set()
        self._thread.join()

    def peak(self, marker: str | None = None, uss: bool = False, anon: bool = False) -> float:
        """MB: the root process's peak RSS (marker None) or the largest among processes whose title has
        `marker`; their peak USS with `uss`, their peak anonymous RSS with `anon`."""
        column = 2 if uss else 3 if anon else 1
        if marker is None:
            return self.peaks.get(self.root.pid, ("", 0, 0, 0))[column] / MB
        return max((peaks[column] for peaks in self.peaks.values() if marker in peaks[0]), default=0) / MB


# FLOPs and MFU ---------------------------------------------------------------------------------------------


def linear_params(model: torch.nn.Module, layers: int | None = None) -> int:
    """Weights a forward multiplies each token by: the decoder blocks' matrices (only the first `layers`
    blocks, for a truncated forward, which has no LM head) and the LM head."""
    decoder = model.get_decoder()
    blocks = decoder.layers if layers is None else decoder.layers[:layers]
    count = sum(p.numel() for block in blocks for p in block.parameters() if p.dim() == 2)
    return count + (model.get_output_embeddings().weight.numel() if layers is None else 0)


def flops_per_token(model: torch.nn.Module, layers: int | None = None, training: bool = False) -> float:
    """2 FLOPs per weight a forward multiplies by, per token; a training step (forward and backward) 6."""
    return (6 if training else 2) * linear_params(model, layers)


def mfu(tokens_per_s: float, flops: float, peak: float | None) -> float | None:
    """Model-FLOPs utilisation: tokens/s x FLOPs per token over the device's peak (None: no peak known)."""
    return tokens_per_s * flops / peak if peak else None


def peak_flops(device: str, override_tflops: float | None = None) -> float | None:
    """The device's dense bf16 peak FLOP/s: `override_tflops` if given, else by the CUDA device's name from
    `PEAK_BF16`; None for a CPU or an unknown GPU."""
    if override_tflops:
        return override_tflops * 1e12
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)
