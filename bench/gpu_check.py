"""GPU checks: each stage's core on the accelerator against the CPU, and the whole pipeline on a GPU cluster.

`--mode core` (the default) imports no Ray, DeepSpeed or vLLM, so it runs on any machine with torch and
transformers. It runs every stage's pure core on `--device` in `--dtype` and the same core on the CPU in
fp32, on models built from a config with seeded random weights (SmolLM2-135M's shape for agreement, a
1B shape for MFU on CUDA), and asserts agreement (see `bench/gpu_cores.py` for each check and its
threshold). Exit status 0 when every check holds, 1 otherwise.

    python bench/gpu_check.py                                     # CUDA, bf16, SmolLM2's shape
    python bench/gpu_check.py --device cpu --dtype bfloat16 --shape tiny --docs 96   # the CPU's bf16 path
    python bench/gpu_check.py --json runs/gpu-core.json           # also write the figures as JSON

`--mode pipeline` needs a CUDA GPU, Ray and the `gpu` extra (`pip install -e '.[gpu]'`, which brings vLLM
through `ray[llm]`). It writes a slice of the demo corpus, then runs `jobs.pipeline` with every GPU path
switched on:

- encode on CUDA: SAE training and curation with GPU encode actors (`gpus_per_actor: 1`);
- the vLLM teacher through `ray.data.llm` (`backend: vllm`, bfloat16);
- DeepSpeed ZeRO-3 on CUDA in bfloat16 (`use_gpu: true`), one worker per GPU;
- evaluation on CUDA.

It then reads the stages' manifests and metrics and prints encode tokens/s, SAE training tokens/s, the
teacher's generated tokens/s, fine-tuning tokens/s and MMLU questions/s, and checks what each stage
produced. Exit status 0 when every check holds, 1 otherwise, 2 without a GPU or vLLM.

    python bench/gpu_check.py --mode pipeline
    python bench/gpu_check.py --mode pipeline --docs 4000 --out runs/gpu-check --max-steps 60
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["core", "pipeline"], default="core", help="stage cores or the pipeline")
    parser.add_argument("--device", default="cuda", help="core mode: the candidate device")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="core mode: its dtype")
    parser.add_argument("--shape", choices=["tiny", "smollm2-135m"], default="smollm2-135m", help="core mode")
    parser.add_argument("--checks", default="encode,sae,prune,teacher,mmlu,train", help="core mode: which")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: by GPU name)")
    parser.add_argument("--json", default=None, help="core mode: also write the results to this JSON file")
    parser.add_argument("--docs", type=int, default=None, help="documents (core: 256; pipeline: 2000)")
    parser.add_argument("--out", default="runs/gpu-check", help="the pipeline's root")
    parser.add_argument("--max-steps", type=int, default=40, help="fine-tuning steps")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="teacher tokens per row at most")
    return parser.parse_args()


def spec_values(args: argparse.Namespace) -> dict:
    gpu = {"encode_actors": 1, "cpus_per_actor": 2, "gpus_per_actor": 1}
    return {
        "root": args.out,
        "model": "smollm2-135m",
        "corpus": [f"{args.out}/corpus/*.jsonl.gz"],
        "seeds": "jobs/seeds/demo.jsonl",
        "domains": {"mathematics": {"mmlu": ["elementary_mathematics", "high_school_mathematics"]}},
        "ratios": [0.3],
        "backend": "vllm",
        "control": "none",
        "sae": {"layer": 15, "coords": "all", "expansion_factor": 4, "k": 32, "max_train_tokens": 400_000, **gpu},
        "curate": {"rule": "per_seed_topn", "top_n": 20, "batch_size": 256, **gpu},
        "prune": {"dtype": "bfloat16"},
        "distill": {
            "max_new_tokens": args.max_new_tokens,
            "batch_size": 64,
            "engine_kwargs": {"dtype": "bfloat16", "max_model_len": 2048, "gpu_memory_utilization": 0.5},
        },
        "finetune": {"zero_stage": 3, "use_gpu": True, "num_workers": 1, "max_steps": args.max_steps,
                     "micro_batch": 8, "max_tokens": 512, "checkpoint_every": args.max_steps, "log_every": 10},
        "evaluate": {"limit": 300, "gpus_per_model": 1, "dtype": "bfloat16"},
    }  # fmt: skip


def core_main(args: argparse.Namespace) -> int:
    import torch
    from gpu_cores import as_dict, format_results, peak_flops, run_core_checks

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here (use --device cpu to check the CPU's bf16 path)")
        return 2
    dtype = getattr(torch, args.dtype)
    only = [name.strip() for name in args.checks.split(",") if name.strip()]
    peak = peak_flops(args.device, args.peak_tflops)
    cuda = args.device.startswith("cuda")
    where = torch.cuda.get_device_name(0) if cuda else f"CPU, {torch.get_num_threads()} threads"
    started = time.perf_counter()
    results = run_core_checks(args.shape, args.device, dtype, args.docs or 256, only)
    print(f"\nstage cores on {where} in {args.dtype} against the CPU in float32, {args.shape} shape:")
    print("\n".join(format_results(results, peak)))
    if args.device.startswith("cuda") and args.shape != "tiny":  # MFU at a size that can fill the GPU
        large = run_core_checks("1b", args.device, dtype, args.docs or 256, ["encode", "train"])
        print("\n1B shape (throughput and MFU; agreement as above):")
        print("\n".join(format_results(large, peak)))
        results += large
    imported = [name for name in ("ray", "deepspeed", "vllm") if sys.modules.get(name) is not None]
    print(f"took {time.perf_counter() - started:.0f} s; imported of Ray, DeepSpeed, vLLM: {imported or 'none'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "device": where,
            "dtype": args.dtype,
            "shape": args.shape,
            "peak_flops": peak,
            "date": time.strftime("%Y-%m-%d"),
            "results": [as_dict(r, peak) for r in results],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2, default=float))  # fmt: skip
    return 0 if all(result.passed for result in results) else 1


def main() -> int:
    args = parse_args()
    if args.mode == "core":
        return core_main(args)
    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None:
        print("needs a CUDA GPU and vLLM (pip install -e '.[gpu]')")
        return 2
    args.docs = args.docs or 2000
    from core import cli, logs
    from curation.demo_corpus import write_demo_corpus
    from pipeline import PipelineSpec, run_pipeline

    logs.setup_logging()
    root = Path(args.out)
    write_demo_corpus(str(root / "corpus"), shards=8, limit=args.docs)
    spec = cli.from_mapping(PipelineSpec, spec_values(args), origin="bench/gpu_check.py")
    started = time.perf_counter()
    state = run_pipeline(spec)
    total = time.perf_counter() - started

    def manifest(step: str) -> dict:
        return json.loads((Path(state["steps"][step]["out"]) / "manifest.json").read_text())

    sae, curate, distill = manifest("sae"), manifest("curate"), manifest("distill/mathematics")
    finetune_out = Path(state["steps"]["finetune/mathematics/0.30"]["out"])
    metrics = [json.loads(line) for line in (finetune_out / "metrics.jsonl").read_text().splitlines()]
    train_rates = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m][1:]  # the first includes warm-up
    results = json.loads((root / "mathematics" / "eval" / "results.json").read_text())
    evaluate = manifest("evaluate/mathematics")

    figures = {
        "encode tokens/s (curate, CUDA)": curate["counts"]["tokens"] / curate["timings_s"]["encode"],
        "SAE training tokens/s (CUDA)": sae["counts"]["tokens_per_s"],
        "teacher generated tokens/s (vLLM)": distill["counts"]["generated_tokens_per_s"],
        "fine-tuning tokens/s (ZeRO-3, bf16, CUDA)": sum(train_rates) / max(len(train_rates), 1),
        "MMLU questions/s per model (CUDA)": results["mmlu"]["sample"]["questions"]
        * len(results["models"])
        / max(sum(evaluate["timings_s"].values()), 1e-9),
    }
    checks = {
        "curated rows > 0": curate["counts"]["curated_rows"] > 0,
        "teacher ran on vLLM": distill.get("backend") == "vllm" and distill["counts"]["generated_rows"] > 0,
        "fine-tuning finished its steps": bool(metrics) and metrics[-1].get("step", 0) >= args.max_steps,
        "fine-tuned model exported": (finetune_out / "model" / "config.json").is_file(),
        "every model evaluated": len(results["models"]) == 3,
    }
    print(f"\nGPU check on {torch.cuda.get_device_name(0)}: pipeline took {total:.0f} s")
    for name, value in figures.items():
        print(f"  {name:<44} {value:>12,.1f}")
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
