"""GPU checks: each stage's core on the accelerator against the CPU, and the whole pipeline on a GPU cluster.

`--mode core` (the default) imports no Ray, DeepSpeed or vLLM, so it runs on any machine with torch and
transformers. It runs every stage's pure core on `--device` in `--dtype` and the same core on the CPU in
fp32, on models built from a config with seeded random weights (SmolLM2-135M's shape for agreement, a
1B shape for MFU on CUDA), and asserts agreement (see `bench/gpu/cores.py` for each check and its
threshold). Exit status 0 when every check holds, 1 otherwise.

    python -m bench.gpu.check                                     # CUDA, bf16, SmolLM2's shape
    python -m bench.gpu.check --device cpu --dtype bfloat16 --shape tiny --docs 96   # the CPU's bf16 path
    python -m bench.gpu.check --json runs/gpu-core.json           # also write the figures as JSON

`--mode pipeline` needs a CUDA GPU, Ray and the `gpu` extra (`pip install -e '.[gpu]'`, which brings vLLM
through `ray[llm]`). It writes a slice of the demo corpus, then runs `jobs.pipeline` with every GPU path
switched on:

- encode on CUDA: SAE training and curation with GPU encode actors (`gpus: 1`);
- the vLLM teacher through `ray.data.llm` (`backend: vllm`, bfloat16);
- DeepSpeed ZeRO-3 on CUDA in bfloat16 (`gpus: 1`), one worker per GPU;
- evaluation on CUDA in bfloat16.

Then it runs the same work on the CPU in fp32 (`--mode cpu-reference`, in a child process that sees no
GPU and starts a Ray of its own; `bench/gpu/pipeline_checks.py`'s `reference_configs`): curation of the same
corpus with the same seeds and the GPU run's SAE; the transformers teacher on the first `--ref-rows`
input rows; ZeRO-2 fine-tuning of the same pruned model on the same distilled set for `--ref-steps`
steps; evaluation of the same models on the same MMLU sample. It compares (thresholds in
`bench/gpu/pipeline_checks.py`):

- curation: `seed_sims` per document, cosine >= 0.99 on every document; document vectors of
  `--sample-docs` documents re-encoded here on CUDA and on the CPU, cosine >= 0.99 (with bf16 weights:
  reported); curated ids, overlap >= 95%;
- teacher: vLLM's greedy text identical to the transformers backend's on >= 90% of rows, the others
  listed with the first token where they part;
- fine-tuning: per-step loss within a mean relative gap of 3% and a largest of 10%, at equal learning
  rates;
- MMLU: predicted answers identical on >= 98% of questions, for every model.

It prints each stage's tokens/s and MFU (2 x parameters run x tokens/s over the GPU's bf16 peak; 6 x for
fine-tuning; the truncated forward for encode) and writes every figure to `--json`. Exit status 0 when
every check holds, 1 otherwise, 2 without a GPU or vLLM.

    python -m bench.gpu.check --mode pipeline --json runs/gpu-pipeline.json
    python -m bench.gpu.check --mode pipeline --docs 4000 --out runs/gpu-check --max-steps 60
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

from bench.measure import bench_parser, peak_flops, settings_of, write_json

NAME = "gpu.check"
REPO = Path(__file__).resolve().parents[2]


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser(NAME, __doc__)
    parser.add_argument(
        "--mode",
        choices=["core", "pipeline", "cpu-reference"],
        default="core",
        help="stage cores, or the pipeline (cpu-reference: the CPU runs pipeline mode starts itself)",
    )
    parser.add_argument("--device", default="cuda", help="core mode: the candidate device")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="core mode: its dtype")
    parser.add_argument("--shape", choices=["tiny", "smollm2-135m"], default="smollm2-135m", help="core mode")
    parser.add_argument("--checks", default="encode,sae,prune,teacher,mmlu,train", help="core mode: which")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: by GPU name)")
    parser.add_argument("--docs", type=int, default=None, help="documents (core: 256; pipeline: 2000)")
    parser.add_argument("--out", default="runs/gpu-check", help="the pipeline's root")
    parser.add_argument("--max-steps", type=int, default=40, help="fine-tuning steps")
    parser.add_argument(
        "--teacher",
        choices=sorted(TEACHERS),
        default="vllm",
        help="pipeline: the teacher's backend (transformers where vLLM cannot be installed)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, help="teacher tokens per row at most")
    parser.add_argument("--ref-rows", type=int, default=64, help="pipeline: teacher rows generated on the CPU too")
    parser.add_argument("--ref-steps", type=int, default=10, help="pipeline: fine-tuning steps run on the CPU too")
    parser.add_argument("--sample-docs", type=int, default=64, help="pipeline: documents re-encoded on both devices")
    return parser


TEACHERS = {
    "vllm": {"engine_kwargs": {"dtype": "bfloat16", "max_model_len": 2048, "gpu_memory_utilization": 0.5}},
    # In fp32, so that the agreement check compares one backend on two devices, as core mode does.
    "transformers": {"dtype": "float32", "gpus": 1},
}
"""The pipeline's teacher settings per backend: vLLM where it is installed, else transformers on the GPU."""


def spec_values(args: argparse.Namespace) -> dict:
    # Half a GPU each: on a one-GPU machine the SAE trainer shares the device with the activation actor.
    gpu = {"actors": 1, "cpus": 2, "gpus": 0.5}
    return {
        "root": args.out,
        "model": "smollm2-135m",
        "corpus": [f"{args.out}/corpus/*.jsonl.gz"],
        "seeds": "jobs/seeds/demo.jsonl",
        "domains": {"mathematics": {"mmlu": ["elementary_mathematics", "high_school_mathematics"]}},
        "ratios": [0.3],
        "backend": args.teacher,
        "control": "none",
        "sae": {"layer": 15, "coords": "all", "expansion_factor": 4, "k": 32, "max_train_tokens": 400_000,
                "trainer_gpus": 0.5, **gpu},
        "curate": {"rule": "per_seed_topn", "top_n": 20, "batch_size": 2048, "max_batch_tokens": 65536,
                   "max_batch_rows": 1024, **gpu},
        "prune": {"dtype": "bfloat16", "gpus": 1},
        "distill": {"max_new_tokens": args.max_new_tokens, "batch_size": 64, **TEACHERS[args.teacher]},
        "finetune": {"zero_stage": 3, "gpus": 1, "actors": 1, "max_steps": args.max_steps,
                     "micro_batch": 8, "max_tokens": 512, "checkpoint_every": args.max_steps, "log_every": 10},
        "evaluate": {"limit": 300, "gpus": 1, "dtype": "bfloat16"},
    }  # fmt: skip


def core_main(args: argparse.Namespace) -> int:
    import torch

    from bench.gpu.cores import as_dict, format_results, run_core_checks

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here (use --device cpu to check the CPU's bf16 path)")
        return 2
    dtype = getattr(torch, args.dtype)
    only = [name.strip() for name in args.checks.split(",") if name.strip()]
    peak = peak_flops(args.device, args.peak_tflops)
    cuda = args.device.startswith("cuda")
    where = torch.cuda.get_device_name(0) if cuda else f"CPU, {torch.get_num_threads()} threads"
    started = time.perf_counter()
    shapes = {args.shape: run_core_checks(args.shape, args.device, dtype, args.docs or 256, only)}
    print(f"\nstage cores on {where} in {args.dtype} against the CPU in float32, {args.shape} shape:")
    print("\n".join(format_results(shapes[args.shape], peak)))
    if cuda and args.shape != "tiny":  # MFU at a size that can fill the GPU
        large = run_core_checks("1b", args.device, dtype, args.docs or 256, ["encode", "train"], cpu_rounding=False)
        shapes["1b"] = large
        print("\n1B shape (throughput and MFU; agreement as above):")
        print("\n".join(format_results(shapes["1b"], peak)))
    imported = [name for name in ("ray", "deepspeed", "vllm") if sys.modules.get(name) is not None]
    print(f"took {time.perf_counter() - started:.0f} s; imported of Ray, DeepSpeed, vLLM: {imported or 'none'}")
    if args.json:
        every = [(shape, result) for shape, results in shapes.items() for result in results]
        checks = [{**as_dict(result, peak), "shape": shape} for shape, result in every]
        ratios = {f"{shape}: MFU {result.name}": result.mfu(peak) for shape, result in every}
        write_json(args.json, NAME, settings_of(args), {"device": where, "peak_flops": peak, "checks": checks}, ratios)
    return 0 if all(result.passed for results in shapes.values() for result in results) else 1


def run_gpu_pipeline(args: argparse.Namespace):
    """The pipeline with every GPU path on; returns its spec, its steps and its wall time."""
    from core import cli, logs
    from curation.demo_corpus import write_demo_corpus
    from pipeline import PipelineSpec, run_pipeline
    from pipeline.steps import build_steps

    logs.setup_logging()
    write_demo_corpus(str(Path(args.out) / "corpus"), shards=8, limit=args.docs)
    spec = cli.from_mapping(PipelineSpec, spec_values(args), origin=f"python -m bench.{NAME}")
    started = time.perf_counter()
    run_pipeline(spec)
    return spec, build_steps(spec), time.perf_counter() - started


def run_cpu_references(args: argparse.Namespace) -> int:
    """The CPU references, in a child process that sees no GPU (so DeepSpeed, the teacher and the encode
    actors take the CPU) and starts a Ray of its own on this machine."""
    import os
    import subprocess

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    env.pop("RAY_ADDRESS", None)
    flags = ["--out", args.out, "--docs", str(args.docs), "--max-steps", str(args.max_steps),
             "--max-new-tokens", str(args.max_new_tokens), "--ref-rows", str(args.ref_rows),
             "--ref-steps", str(args.ref_steps), "--teacher", args.teacher]  # fmt: skip
    command = [sys.executable, "-m", f"bench.{NAME}", "--mode", "cpu-reference", *flags]
    return subprocess.run(command, env=env, cwd=REPO).returncode


def reference_main(args: argparse.Namespace) -> int:
    from bench.gpu.pipeline_checks import reference_configs, run_references
    from core import cli, logs
    from pipeline import PipelineSpec
    from pipeline.steps import build_steps

    logs.setup_logging()
    spec = cli.from_mapping(PipelineSpec, spec_values(args), origin=f"python -m bench.{NAME}")
    run_references(reference_configs(build_steps(spec), spec.root, args.ref_rows, args.ref_steps))
    return 0


def pipeline_main(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    if args.teacher == "vllm" and importlib.util.find_spec("vllm") is None:
        print("--teacher vllm needs vLLM (pip install -e '.[gpu]'); --teacher transformers runs without it")
        return 2
    import ray

    from bench.gpu import pipeline_checks as checks

    args.docs = args.docs or 2000
    spec, steps, total = run_gpu_pipeline(args)
    ray.shutdown()  # the references start a Ray of their own, without the GPU
    started = time.perf_counter()
    if run_cpu_references(args) != 0:
        print("the CPU reference runs failed; no agreement to check")
        return 1
    reference_s = time.perf_counter() - started
    references = checks.reference_configs(steps, spec.root, args.ref_rows, args.ref_steps)
    agreements = checks.completion_checks(steps, args.max_steps, args.teacher)
    agreements += checks.pipeline_agreements(steps, references, args.sample_docs)
    peak = peak_flops("cuda", args.peak_tflops)
    rates = checks.stage_rates(steps, peak)
    device = torch.cuda.get_device_name(0)
    print(f"\nGPU check on {device}: pipeline {total:.0f} s, CPU references {reference_s:.0f} s")
    print("\n".join(checks.format_rates(rates)))
    print("agreement with the CPU in fp32:")
    print("\n".join(checks.format_agreements(agreements)))
    if args.json:
        results = {"device": device, "peak_flops": peak, "pipeline_s": total, "reference_s": reference_s,
                   "rates": rates, "agreements": [checks.as_dict(a) for a in agreements]}  # fmt: skip
        write_json(args.json, NAME, settings_of(args), results, {f"MFU {row['stage']}": row["mfu"] for row in rates})
    return 0 if all(agreement.passed for agreement in agreements) else 1


def main() -> int:
    args = build_parser().parse_args()
    if args.mode == "core":
        return core_main(args)
    if args.mode == "cpu-reference":
        return reference_main(args)
    return pipeline_main(args)


if __name__ == "__main__":
    sys.exit(main())
