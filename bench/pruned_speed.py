"""Forward latency and peak memory of SmolLM2 pruned by 30% against the unpruned model, on CPU, one run.

The pruned model is built here with the library's planner and slicer (magnitude importance: which
structures go does not change the speed, only the sizes do) and saved as a standard checkpoint; both
models are loaded from their directories with plain `AutoModelForCausalLM.from_pretrained`.

- **latency**: a full forward (logits included) on random token ids, batch 1 and batch 16, sequence 256,
  fp32, under `torch.inference_mode`; the two models alternate round by round after a warm-up, and each
  figure is the fastest round (on a shared machine noise only ever adds time). With `--threads 1` (the
  default) the figure is the CPU time of the process during the forward: on a machine shared with other
  jobs, wall time mostly measures their load, while one thread's CPU time is the latency the forward has
  on a free core. With more threads, wall time is used (CPU time would add the threads up); the
  wall-clock ratio is printed in both cases.
- **peak memory**: each model is loaded and run once, at batch 1 and at batch 16, in a fresh subprocess
  per model and batch, whose peak RSS (`VmHWM`) is reported, so no run's allocations leak into another's
  figure. `--memory-only` skips the latency rounds.

Target: at least 1.25x faster at batch 16 for a 30% cut.

    python bench/pruned_speed.py
    python bench/pruned_speed.py --rounds 3 --threads 2 --json /tmp/pruned_speed.json
    python bench/pruned_speed.py --memory-only      # parameters and peak memory, no latency rounds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from core.models import DEFAULT_MODEL, load_model, load_tokenizer, local_model_dir
from training.pruning.importance import magnitude_importance
from training.pruning.prune import allocate, save_pruned
from training.pruning.structures import count_params, layout_of, slice_structures

TARGET_BATCH16 = 1.25
SEQUENCE = 256


def build_pruned(model_name: str, ratio: float, out: str) -> None:
    model = load_model(model_name)
    layout = layout_of(model.config)
    plan = allocate(magnitude_importance(model, layout), layout, ratio)
    slice_structures(model, plan.keep_groups, plan.keep_channels)
    save_pruned(model, load_tokenizer(model_name), out)


def time_forward(model, batch: int, generator: torch.Generator) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one forward."""
    ids = torch.randint(0, model.config.vocab_size, (batch, SEQUENCE), generator=generator)
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    return time.perf_counter() - wall, time.process_time() - cpu


def status_mb(field: str) -> float:
    """A field of /proc/self/status (VmRSS, VmHWM), in MB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:")) / 1024


def memory_child(directory: str, batch: int) -> None:
    """Run in a subprocess: load, one forward at `batch`, print peak RSS in MB."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    time_forward(model, batch, torch.Generator().manual_seed(0))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's peak.
    print(json.dumps({"peak_rss_mb": status_mb("VmHWM")}))


def peak_rss(directory: str, batch: int, threads: int) -> float:
    command = [sys.executable, __file__, "--memory-child", directory, "--batch", str(batch), "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def measure_memory(directories: dict[str, str], threads: int) -> dict:
    """Peak RSS of a fresh process per model and batch size (1: mostly weights; 16: the 16 x 256 x 49,152
    fp32 logits, 805 MB, weigh as much as the unpruned weights)."""
    results: dict = {"peak_rss_mb": {}, "memory_ratio": {}}
    for batch in (1, 16):
        peaks = {name: peak_rss(directory, batch, threads) for name, directory in directories.items()}
        ratio = peaks["unpruned"] / peaks["pruned"]
        results["peak_rss_mb"][f"batch{batch}"], results["memory_ratio"][f"batch{batch}"] = peaks, ratio
        print(
            f"peak RSS at batch {batch:>2} (fresh process each): unpruned {peaks['unpruned']:,.0f} MB, "
            f"pruned {peaks['pruned']:,.0f} MB, ratio {ratio:.2f}x",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--ratio", type=float, default=0.30)
    parser.add_argument("--pruned", default=None, help="a pruned checkpoint to time instead of building one")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--memory-only", action="store_true", help="measure parameters and peak memory only")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.batch)
        return

    base_dir = local_model_dir(args.model)
    pruned_dir = args.pruned
    if pruned_dir is None:
        pruned_dir = tempfile.mkdtemp(prefix="finescope-pruned-speed-")
        build_pruned(args.model, args.ratio, pruned_dir)
    models = {
        "unpruned": AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval(),
        "pruned": AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.float32).eval(),
    }
    params = {name: count_params(model) for name, model in models.items()}
    print(
        f"parameters: unpruned {params['unpruned']:,}, pruned {params['pruned']:,} "
        f"({1 - params['pruned'] / params['unpruned']:.3f} removed); threads {args.threads}, seq {SEQUENCE}"
    )
    results: dict = {"params": params, "latency_s": {}}
    clock = "cpu" if args.threads == 1 else "wall"
    for model in models.values() if not args.memory_only else ():
        time_forward(model, 1, torch.Generator().manual_seed(0))  # warm-up: lazy initialisation
    for batch in (1, 16) if not args.memory_only else ():
        generator = torch.Generator().manual_seed(batch)
        rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, model in models.items():
                rounds[name].append(time_forward(model, batch, generator))
        best = {
            name: {"wall": min(t[0] for t in times), "cpu": min(t[1] for t in times)} for name, times in rounds.items()
        }
        results["latency_s"][f"batch{batch}"] = best
        speedup = best["unpruned"][clock] / best["pruned"][clock]
        results[f"speedup_batch{batch}"] = speedup
        wall_speedup = best["unpruned"]["wall"] / best["pruned"]["wall"]
        print(
            f"batch {batch:>2}: unpruned {best['unpruned'][clock] * 1000:8.1f} ms, "
            f"pruned {best['pruned'][clock] * 1000:8.1f} ms ({clock} time), speedup {speedup:.2f}x "
            f"(wall-clock speedup {wall_speedup:.2f}x)",
            flush=True,
        )
    del models
    results.update(measure_memory({"unpruned": base_dir, "pruned": pruned_dir}, args.threads))
    if not args.memory_only:
        verdict = "met" if results["speedup_batch16"] >= TARGET_BATCH16 else "NOT met"
        print(f"target >= {TARGET_BATCH16}x at batch 16: {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
