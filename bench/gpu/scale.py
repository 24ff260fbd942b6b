"""The measurements at the paper's scale in one process, for one call on a lent GPU machine.

Runs, in this order, each as its own command (`python -m bench.gpu.NAME`) would, by calling its `main` with
the same flags, and writes each one's JSON under `--out`:

| run | what it measures |
|---|---|
| `width --shape 1b` | curation's encode at Llama-3.2-1B's width: tokens/s, MFU, peak memory, GPU-hours |
| `width --shape 8b` | the same at Llama-3.1-8B's width, against the goal of 40% MFU |
| `prune_scale --shape 8b` | the Taylor importance pass and the 30% slice of an 8B model: time, peak memory, ratio |
| `prune_scale --shape 1b` | the same on the 1B shape |
| `train_scale --shape 1b` | fine-tuning steps without DeepSpeed: tokens/s, MFU, peak memory |

`--shape S` runs every script on S instead (tiny on a CPU is the tests' run: each script at its cheapest, in
float32, since a CPU without native bf16 emulates it many times slower); `--only` picks scripts. A run that
fails is reported with its traceback and the others still run: on a first visit to a machine one broken path
must not hide what the rest measure. At the end it prints one line per run and writes them all to `--json`.
Before any model is built it imports every script, so a package the machine lacks stops it at once, named.

Expected run time on one H100: about 5 minutes for the five runs (an estimate from the FLOP counts; each
script's docstring has its share). Needs CUDA unless `--device cpu --shape tiny` (exit 2 otherwise).

    PYTHONUNBUFFERED=1 python -m bench.gpu.scale --out runs/gpu-scale --json runs/gpu-scale/scale.json
    python -m bench.gpu.scale --only width --shape 8b
    python -m bench.gpu.scale --device cpu --shape tiny
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

from bench.gpu.scale_models import SCALE_SHAPES, refusal, release
from bench.measure import bench_parser, settings_of, write_json

NAME = "gpu.scale"
PLAN = (("width", "1b"), ("width", "8b"), ("prune_scale", "8b"), ("prune_scale", "1b"), ("train_scale", "1b"))
SCRIPTS = ("width", "prune_scale", "train_scale")
CPU_FLAGS = {
    "width": ["--weights", "float32", "--dtype", "float32", "--tokens", "600", "--sizes", "8192x64,65536x1024"],
    "prune_scale": ["--dtype", "float32", "--batches", "2", "--seq", "32"],
    "train_scale": ["--dtype", "float32", "--sizes", "2x32", "--steps", "2", "--warmup", "1"],
}
"""Each script at its cheapest, for a run on a CPU."""


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser(NAME, __doc__)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu with --shape tiny")
    parser.add_argument("--shape", choices=list(SCALE_SHAPES), default=None, help="every run on this shape")
    parser.add_argument("--only", default=",".join(SCRIPTS), help="scripts to run, comma-separated")
    parser.add_argument("--out", default="runs/gpu-scale", help="directory of each run's JSON file")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: by GPU name)")
    return parser


def planned(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(script, shape) pairs in order: the plan, or every chosen script once on `--shape`."""
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    if unknown := sorted(set(only) - set(SCRIPTS)):
        raise ValueError(f"--only: unknown scripts {unknown}; choose from {', '.join(SCRIPTS)}")
    if args.shape is not None:
        return [(script, args.shape) for script in SCRIPTS if script in only]
    return [(script, shape) for script, shape in PLAN if script in only]


def flags(script: str, shape: str, args: argparse.Namespace) -> list[str]:
    argv = ["--shape", shape, "--device", args.device, "--json", str(Path(args.out) / f"{script}-{shape}.json")]
    if args.peak_tflops:
        argv += ["--peak-tflops", str(args.peak_tflops)]
    return argv + (CPU_FLAGS[script] if args.device == "cpu" else [])


def run_one(script: str, shape: str, args: argparse.Namespace) -> dict:
    """One script's `main`; a failure is caught, printed and recorded, and memory is handed back either way."""
    module = importlib.import_module(f"bench.gpu.{script}")
    argv = flags(script, shape, args)
    print(f"\n== python -m bench.gpu.{script} {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    try:
        status = module.main(argv)
    except SystemExit as stop:  # a flag the script refused
        status = stop.code if isinstance(stop.code, int) else 2
    except Exception:  # noqa: BLE001 - reported with its traceback; the next run still gets its turn
        traceback.print_exc()
        status = 1
    release(args.device)
    path = Path(argv[argv.index("--json") + 1])
    results = json.loads(path.read_text())["results"] if status == 0 and path.is_file() else None
    line = module.summary(results) if results else f"{script} {shape}: exit status {status}, no figures"
    return {"script": script, "shape": shape, "exit": status, "seconds": time.perf_counter() - started,
            "json": str(path), "summary": line, "results": results}  # fmt: skip


def missing_import(scripts: set[str]) -> str | None:
    """The first script that does not import here, with why; None when all do."""
    for script in sorted(scripts):
        try:
            importlib.import_module(f"bench.gpu.{script}")
        except ImportError as error:
            return f"bench.gpu.{script} does not import here: {error}"
    return None


def header(args: argparse.Namespace) -> str:
    import torch
    import transformers

    from bench.gpu.scale_models import device_name

    return (f"measurements at scale on {device_name(args.device)}: torch {torch.__version__}, "
            f"transformers {transformers.__version__}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        runs = planned(args)
    except ValueError as error:
        parser.error(str(error))
    for shape in sorted({shape for _, shape in runs}):
        if line := refusal(NAME, shape, args.device):
            print(line)
            return 2
    if line := missing_import({script for script, _ in runs}):
        print(f"python -m bench.{NAME}: {line}")
        return 2
    print(header(args), flush=True)
    done = [run_one(script, shape, args) for script, shape in runs]
    print("\nsummary:")
    for run in done:
        print(f"  {run['summary']} ({run['seconds']:.0f} s)")
    imported = [name for name in ("ray", "deepspeed", "vllm") if sys.modules.get(name) is not None]
    print(f"imported of Ray, DeepSpeed, vLLM: {imported or 'none'}", flush=True)
    if args.json:
        ratios = {f"{run['script']} {run['shape']}: seconds": run["seconds"] for run in done}
        write_json(args.json, NAME, settings_of(args), {"runs": done}, ratios)
    return 0 if all(run["exit"] == 0 for run in done) else 1


if __name__ == "__main__":
    sys.exit(main())
