"""Forward latency and peak memory of SmolLM2 pruned by 30% against the unpruned model, on CPU, one run.

The pruned model is built here with the library's planner and slicer (magnitude importance: which
structures go does not change the speed, only the sizes do) and saved as a standard checkpoint; both
models are loaded from their directories with plain `AutoModelForCausalLM.from_pretrained`.

- **latency**: a full forward (logits included) on random token ids (the same for both models), batch 1
  and batch 16, sequence 256, fp32, under `torch.inference_mode`; the two models alternate round by round
  after a warm-up, and each figure is the fastest round (on a shared machine noise only ever adds time).
  With `--threads 1` (the default) the figure is the CPU time of the process during the forward: on a
  machine shared with other jobs, wall time mostly measures their load, while one thread's CPU time is
  the latency the forward has on a free core. With more threads, wall time is used (CPU time would add
  the threads up); the wall-clock ratio is printed in both cases.
- **peak memory**: each model is loaded and run once, at batch 1 and at batch 16, in a fresh subprocess
  per model and batch, whose peak RSS (`VmHWM`, `bench.measure.peak_rss_mb`) is reported, so no run's
  allocations leak into another's figure. `--memory-only` skips the latency rounds.

Target: at least 1.25x faster at batch 16 for a 30% cut.

    python -m bench.pruned_speed
    python -m bench.pruned_speed --rounds 3 --threads 2 --json /tmp/pruned_speed.json
    python -m bench.pruned_speed --memory-only      # parameters and peak memory, no latency rounds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from bench.measure import bench_parser, best_of_rounds, peak_rss_mb, settings_of, write_json
from core.models import DEFAULT_MODEL, load_model, load_tokenizer, local_model_dir
from training.pruning.importance import magnitude_importance
from training.pruning.prune import allocate, save_pruned
from training.pruning.structures import count_params, layout_of, slice_structures

NAME = "pruned_speed"
REPO = Path(__file__).resolve().parents[1]
TARGET_BATCH16 = 1.25
SEQUENCE = 256


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser(NAME, __doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--ratio", type=float, default=0.30)
    parser.add_argument("--pruned", default=None, help="a pruned checkpoint to time instead of building one")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-only", action="store_true", help="measure parameters and peak memory only")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    return parser


def build_pruned(model_name: str, ratio: float, out: str) -> None:
    model = load_model(model_name)
    layout = layout_of(model.config)
    plan = allocate(magnitude_importance(model, layout), layout, ratio)
    slice_structures(model, plan.keep_groups, plan.keep_channels)
    save_pruned(model, load_tokenizer(model_name), out)


def random_ids(model, batch: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (batch, SEQUENCE), generator=generator)


def forward(model, ids: torch.Tensor) -> None:
    """One full forward, logits included, no KV cache."""
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)


def memory_child(directory: str, batch: int) -> None:
    """Run in a subprocess: load, one forward at `batch`, print peak RSS in MB."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    forward(model, random_ids(model, batch, torch.Generator().manual_seed(0)))
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def peak_rss(directory: str, batch: int, threads: int) -> float:
    command = [sys.executable, "-m", f"bench.{NAME}", "--memory-child", directory, "--batch", str(batch),
               "--threads", str(threads)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
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


def measure_latency(models: dict, rounds: int, clock: str) -> dict:
    """Per batch size, each model's fastest forward over `rounds` rounds, the models alternating; the
    speed-up by `clock` (CPU time with one thread, else wall time) and by wall time."""
    results: dict = {"latency_s": {}}
    for model in models.values():
        forward(model, random_ids(model, 1, torch.Generator().manual_seed(0)))  # warm-up: lazy initialisation
    for batch in (1, 16):
        generator = torch.Generator().manual_seed(batch)
        # Drawn before the timing; the ids do not change a forward's cost, so both models run the same ones.
        ids = random_ids(next(iter(models.values())), batch, generator)
        calls = {name: (lambda m=model, x=ids: forward(m, x)) for name, model in models.items()}
        timings = best_of_rounds(calls, rounds)
        best = {name: {"wall": t.best("wall"), "cpu": t.best("cpu")} for name, t in timings.items()}
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
    return results


def main() -> None:
    args = build_parser().parse_args()
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
    if not args.memory_only:
        results.update(measure_latency(models, args.rounds, "cpu" if args.threads == 1 else "wall"))
    del models
    results.update(measure_memory({"unpruned": base_dir, "pruned": pruned_dir}, args.threads))
    if not args.memory_only:
        verdict = "met" if results["speedup_batch16"] >= TARGET_BATCH16 else "NOT met"
        print(f"target >= {TARGET_BATCH16}x at batch 16: {verdict}")
    if args.json:
        ratios = {f"unpruned / pruned latency, {key.removeprefix('speedup_')}": value
                  for key, value in results.items() if key.startswith("speedup_")}  # fmt: skip
        ratios |= {f"unpruned / pruned peak RSS, {key}": value for key, value in results["memory_ratio"].items()}
        settings = {key: value for key, value in settings_of(args).items() if key not in ("memory_child", "batch")}
        write_json(args.json, NAME, settings, results, ratios)


if __name__ == "__main__":
    main()
