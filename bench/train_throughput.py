"""Training tokens/s of the Ray Train + DeepSpeed loop against a plain single-process torch loop, at equal compute.

Both train the same model on the same rows, in the same micro-batches and global batch, with AdamW, on
the same cores: the plain loop runs in this process with one torch thread per Ray worker (--workers
threads), the Ray loop runs `training.finetuning.finetune` with --workers workers (ZeRO stage
--zero-stage, gloo on CPU), each with the torch threads it picks by default. With --grad-accum N each
worker accumulates N micro-batches per optimizer step, and the plain loop N x --workers. Steady-state
tokens/s is taken from the per-step timings (first step left out); start-up (Ray, workers, model load,
DeepSpeed init) and teardown are reported apart, as the fit's wall time minus its step times.

The two are measured in alternation, --repeats times each plus one more plain run at the end, so that
load from other processes falls on both; the ratio of the best runs is the headline, next to the median
of the per-round ratios. A breakdown of the best Ray run's steps (training.finetuning.step_clock) says
where its time goes, next to the plain loop's. Last, a bare gloo all-reduce of the model's gradients
between --workers processes gives the communication floor, and with it the best ratio any data-parallel
loop could reach here without overlapping communication with the backward pass.

    python -m bench.train_throughput                      # synthetic Llama (hidden 256, 4 layers)
    python -m bench.train_throughput --rows 768 --grad-accum 2 --zero-stage 1   # one all-reduce per step
    python -m bench.train_throughput --model smollm2-135m --rows 96 --max-tokens 128 --json /tmp/train.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bench.measure import bench_parser, settings_of, write_json
from core import models
from training.finetuning.finetune import SUMMARY_FILE, FinetuneConfig, run_finetune
from training.finetuning.losses import causal_lm_loss
from training.finetuning.sft_data import BatchShape, Example, collate, encode_example, training_target, window_order
from training.finetuning.step_clock import PHASES, StepClock

NAME = "train_throughput"


def synthetic_model(directory: Path, hidden: int, layers: int) -> str:
    """A Llama with a word-level tokenizer, like the tests' tiny model but wider."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(tok_models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>", "</s>"])
    tokenizer.train_from_iterator([" ".join(f"w{i}" for i in range(2000))], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    config = LlamaConfig(
        vocab_size=fast.vocab_size, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return str(directory)


def synthetic_data(directory: Path, rows: int, words: int) -> Path:
    rng = random.Random(0)
    records = []
    for i in range(rows):
        prompt = " ".join(f"w{rng.randrange(1000)}" for _ in range(rng.randrange(words // 4, words // 2)))
        answer = " ".join(f"w{rng.randrange(1000, 2000)}" for _ in range(rng.randrange(words // 4, words)))
        records.append(
            {"id": str(i), "prompt": prompt, "original": answer, "teacher": answer, "accepted": True, "reason": ""}
        )
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), directory / "part-0.parquet")
    return directory


def plain_loop(model_dir: str, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One process, torch AdamW, the same global batch per step as the Ray run, one thread per Ray worker."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads or args.workers)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = pq.read_table(data).to_pylist()
    examples = [
        Example(*encode_example(tokenizer, row["prompt"], training_target(row), args.max_tokens)) for row in rows
    ]
    # world_size=1 and micro-batches of the Ray run's global batch per step: same rows per optimizer step.
    per_step = args.workers * args.grad_accum
    shape = BatchShape(args.micro_batch, per_step, 1, len(rows))
    micro = window_order([len(e.input_ids) for e in examples], shape, 0, 0, 0)
    clock = StepClock()
    step_phases, tokens = [], []
    for step in range(len(micro) // per_step):
        step_tokens = 0
        for ids in micro[step * per_step : (step + 1) * per_step]:
            with clock.phase("data"):
                batch = collate([examples[i] for i in ids], tokenizer.pad_token_id)
            with clock.phase("forward"):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss, _ = causal_lm_loss(logits, batch["labels"])
            with clock.phase("backward"):
                (loss / per_step).backward()
            step_tokens += int(batch["attention_mask"].sum())
        with clock.phase("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step_phases.append(clock.lap())
        tokens.append(step_tokens)
    step_seconds = [sum(phases.values()) for phases in step_phases]
    return {
        "tokens_per_s": sum(tokens[1:]) / sum(step_seconds[1:]),
        "steps": len(step_seconds),
        "phases_s": mean_phases(step_phases[1:]),
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def ray_loop(model_dir: str, data: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One fit of the fine-tuning job; steady state from its metrics.jsonl, start-up as the rest of its wall time."""
    config = FinetuneConfig(
        model=model_dir, data=str(data), out=str(out), zero_stage=args.zero_stage, actors=args.workers,
        micro_batch=args.micro_batch, grad_accum=args.grad_accum, window_steps=1000, max_tokens=args.max_tokens,
        epochs=1, lr=1e-4, warmup_steps=1, checkpoint_every=10**6, log_every=10**6, force=True,
    )  # fmt: skip
    started = time.perf_counter()
    run_finetune(config)
    wall = time.perf_counter() - started
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    step_seconds = [row["step_s"] for row in metrics]
    steady_tokens = sum(row["tokens"] for row in metrics[1:])
    return {
        "tokens_per_s": steady_tokens / sum(step_seconds[1:]),
        "steps": len(metrics),
        "startup_s": wall - sum(step_seconds),
        "wall_s": wall,
        "phases_s": mean_phases([row["phases_s"] for row in metrics[1:]]),
        "wait_s": statistics.fmean(row["wait_s"] for row in metrics[1:]),
        "threads": summary["threads"],
        "omp_num_threads": summary["omp_num_threads"],
        "niceness": summary.get("niceness"),
    }


def _allreduce_worker(rank: int, workers: int, numel: int, port: int, rounds: int, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=workers)
    tensor = torch.randn(numel)
    for _ in range(3):
        dist.all_reduce(tensor)
    times = []
    for _ in range(rounds):
        dist.barrier()
        started = time.perf_counter()
        dist.all_reduce(tensor)
        times.append(time.perf_counter() - started)
    if rank == 0:
        results.put(statistics.median(times))
    dist.destroy_process_group()


def allreduce_floor(numel: int, workers: int, rounds: int = 20) -> float:
    """Median seconds of a bare gloo all-reduce of `numel` float32 between `workers` processes of one
    thread each: the least any data-parallel step pays to average this model's gradients here."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(target=_allreduce_worker, args=(rank, workers, numel, port, rounds, results))
        for rank in range(workers)
    ]
    for process in processes:
        process.start()
    seconds = results.get(timeout=300)
    for process in processes:
        process.join(timeout=60)
    return seconds


def mean_phases(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean seconds per step of each phase."""
    return {name: statistics.fmean(row[name] for row in rows) for name in PHASES}


def print_breakdown(plain: dict[str, Any], ray_run: dict[str, Any]) -> None:
    """Milliseconds per optimizer step, phase by phase, and each phase's share of the step."""
    plain_step, ray_step = sum(plain["phases_s"].values()), sum(ray_run["phases_s"].values())
    print(f"\n{'ms per step':<34}{'plain':>9}{'':>7}{'Ray+DS':>9}")
    for name in PHASES:
        p, r = plain["phases_s"][name], ray_run["phases_s"][name]
        print(f"  {name:<32}{p * 1e3:9.1f}{p / plain_step:6.0%} {r * 1e3:9.1f}{r / ray_step:6.0%}")
        if name == "grad_reduce":
            print(f"    {'of which waiting for a peer':<30}{'':>16}{ray_run['wait_s'] * 1e3:9.1f}")
    print(f"  {'step':<32}{plain_step * 1e3:9.1f}{'':>7}{ray_step * 1e3:9.1f}")


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser(NAME, __doc__)
    parser.add_argument("--model", default=None, help="HF directory or embedded name; default: a synthetic Llama")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=192)
    parser.add_argument("--words", type=int, default=96, help="longest answer in words (synthetic data)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per worker per optimizer step")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="plain loop's torch threads; 0: one per worker")
    parser.add_argument("--repeats", type=int, default=3, help="Ray fits, each after a plain run")
    return parser


def alternate(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Plain runs and Ray fits in alternation, `--repeats` of each plus one more plain run at the end."""
    plain_runs, ray_runs = [], []
    with tempfile.TemporaryDirectory(prefix="finescope-bench-") as tmp:
        root = Path(tmp)
        model_dir = (
            models.local_model_dir(args.model)
            if args.model
            else synthetic_model(root / "model", args.hidden, args.layers)
        )
        data = synthetic_data(root / "data", args.rows, args.words)
        for repeat in range(args.repeats):
            plain_runs.append(plain_loop(model_dir, data, args))
            ray_runs.append(ray_loop(model_dir, data, root / f"out-{repeat}", args))
        plain_runs.append(plain_loop(model_dir, data, args))
    return plain_runs, ray_runs


def report_rounds(plain_runs: list[dict], ray_runs: list[dict], args: argparse.Namespace) -> dict[str, float]:
    """Each round's ratio and the best runs'; returns the ratios (best runs, median of rounds)."""
    print(f"model: {args.model or f'synthetic llama hidden={args.hidden} layers={args.layers}'}, rows={args.rows}")
    label = f"Ray Train + DeepSpeed ZeRO-{args.zero_stage}, {args.workers} workers"
    print(f"{'round':<7}{'plain tokens/s':>16}{'Ray+DS tokens/s':>17}{'ratio':>7}{'start-up s':>12}")
    ratios = []
    for repeat, ray_run in enumerate(ray_runs):
        # Each Ray fit is bracketed by two plain runs; it is compared with the better of them.
        plain = max(plain_runs[repeat : repeat + 2], key=lambda run: run["tokens_per_s"])
        ratios.append(ray_run["tokens_per_s"] / plain["tokens_per_s"])
        print(f"{repeat:<7}{plain['tokens_per_s']:16.0f}{ray_run['tokens_per_s']:17.0f}{ratios[-1]:7.2f}"
              f"{ray_run['startup_s']:12.1f}")  # fmt: skip
    best_plain = max(plain_runs, key=lambda run: run["tokens_per_s"])
    best_ray = max(ray_runs, key=lambda run: run["tokens_per_s"])
    best_ratio = best_ray["tokens_per_s"] / best_plain["tokens_per_s"]
    print(f"plain torch loop (1 process, {best_plain['threads']} threads): best {best_plain['tokens_per_s']:.0f} "
          f"tokens/s over {best_plain['steps']} steps")  # fmt: skip
    print(f"{label} ({best_ray['threads']} torch threads each, OMP_NUM_THREADS={best_ray['omp_num_threads']}, "
          f"nice {best_ray['niceness']}): "
          f"best {best_ray['tokens_per_s']:.0f} tokens/s over {best_ray['steps']} steps")  # fmt: skip
    print(f"throughput ratio (Ray+DS / plain): best runs {best_ratio:.2f}, "
          f"median of rounds {statistics.median(ratios):.2f}")  # fmt: skip
    startups = ", ".join(f"{run['startup_s']:.1f}" for run in ray_runs)
    print(f"Ray+DS start-up and teardown: {startups} s (the first fit starts Ray)")
    return {"Ray+DS / plain, best runs": best_ratio, "Ray+DS / plain, median of rounds": statistics.median(ratios)}


def report_floor(best_plain: dict, best_ray: dict, workers: int) -> dict[str, float]:
    """The bare all-reduce and the best ratio a loop without overlap could reach with it."""
    floor = allreduce_floor(best_plain["parameters"], workers)
    phases = best_ray["phases_s"]
    ceiling = phases["forward"] + phases["backward"] + floor + best_plain["phases_s"]["optimizer"]
    plain_step = sum(best_plain["phases_s"].values())
    print(f"bare gloo all-reduce of the {best_plain['parameters']:,} gradients ({workers} processes, 1 thread "
          f"each): {floor * 1e3:.1f} ms; Ray's forward and backward plus that and the plain optimizer step: "
          f"{ceiling * 1e3:.1f} ms, at best {plain_step / ceiling:.2f}x the plain loop without overlapping "
          "communication with backward")  # fmt: skip
    return {"allreduce_s": floor, "ceiling_step_s": ceiling, "ceiling_ratio": plain_step / ceiling}


def main() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(models.cache_root() / "torch_extensions"))
    plain_runs, ray_runs = alternate(args)
    ratios = report_rounds(plain_runs, ray_runs, args)
    best_plain = max(plain_runs, key=lambda run: run["tokens_per_s"])
    best_ray = max(ray_runs, key=lambda run: run["tokens_per_s"])
    print_breakdown(best_plain, best_ray)
    floor = report_floor(best_plain, best_ray, args.workers)
    if args.json:
        ratios["at best without overlap / plain"] = floor["ceiling_ratio"]
        figures = {"plain_runs": plain_runs, "ray_runs": ray_runs, "allreduce_floor": floor}
        write_json(args.json, NAME, settings_of(args), figures, ratios)


if __name__ == "__main__":
    main()
