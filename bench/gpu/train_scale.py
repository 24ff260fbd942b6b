"""Fine-tuning step throughput, MFU and memory on a Llama-3.2-1B-shaped model on one GPU, in bf16.

The model is built from Llama-3.2-1B's config on the GPU with seeded random weights (`bench.gpu.scale_models`)
and trained on random token sequences, `--steps` optimizer steps after `--warmup` untimed ones, for each
micro-batch x sequence setting of `--sizes` (the first is the fine-tuning job's default, 4 x 512). A step is
fine-tuning's own step without DeepSpeed: batches made by `training.finetuning.sft_data.collate` (the first
`--prompt-share` of each sequence is prompt, labelled -100), the forward under bf16 autocast over float32
weights, `training.finetuning.losses.causal_lm_loss`, backward, gradient clipping and fused torch AdamW, the
optimizer the job hands DeepSpeed (as `bench.gpu.cores`'s training check does). Each phase is timed with the
GPU synchronised around it, so the phases add up to the step.

Per setting: tokens/s (every token of the batch, as the job's metrics count them), peak GPU memory
(`torch.cuda.max_memory_allocated`), achieved TFLOP/s and MFU against the GPU's dense bf16 peak (6 FLOPs per
weight per token, `bench.measure.flops_per_token`, plus causal attention's products), and the time per phase.

**What this is not**: ZeRO-2 itself. DeepSpeed keeps bf16 weights with float32 master copies and adds its
gradient bucketing and partitioned optimizer step; that is measured only where DeepSpeed is installed. With Ray
and DeepSpeed on the machine, `--zero 2` (or 1, 3) runs `training.finetuning` through Ray Train instead, one
worker on the GPU, on a saved copy of the same random model and a random distilled set, for the first `--sizes`
setting, and reads tokens/s from its `metrics.jsonl` (Ray, DeepSpeed and the stage are imported only then).
`--shape 8b` is refused: its weights, gradients and Adam states take 128 GB, which FineScope spreads over
several GPUs with ZeRO-3 (docs/finetuning.md).

Expected run time on one H100 (an estimate, not a measurement): 1b under a minute for both settings, with the
model's build; `--zero 2` adds Ray's start and saving the 5 GB model, a few minutes. Tiny on a CPU: seconds.
Needs CUDA for 1b (exit 2 without it).

    python -m bench.gpu.train_scale --shape 1b --json runs/gpu-train-1b.json
    python -m bench.gpu.train_scale --shape 1b --sizes 8x1024 --zero 2
    python -m bench.gpu.train_scale --shape tiny --device cpu --dtype float32
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

from bench.gpu.scale_models import (
    FIRST_WORD,
    PAD_ID,
    SCALE_SHAPES,
    add_scale_flags,
    attention_flops,
    build_model,
    device_name,
    gib,
    parse_sizes,
    peak_gib,
    percent,
    refusal,
    release,
    reset_peak,
    table,
)
from bench.measure import bench_parser, flops_per_token, mfu, peak_flops, publish, timed
from training.finetuning.losses import IGNORE_INDEX, causal_lm_loss
from training.finetuning.sft_data import Example, collate

NAME = "gpu.train_scale"
SIZES = "4x512,8x1024"
PHASES = ("data", "forward", "backward", "optimizer")
TOO_LARGE = {
    "8b": "8B's float32 weights, gradients and Adam states take 128 GB, more than one GPU holds; FineScope trains "
    "it with ZeRO-3 over several GPUs (docs/finetuning.md)"
}


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser(NAME, __doc__)
    add_scale_flags(parser, list(SCALE_SHAPES), default="1b")
    parser.add_argument("--sizes", default=SIZES, help="settings, micro-batch x sequence tokens, comma-separated")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="autocast dtype")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clipping threshold")
    parser.add_argument("--prompt-share", type=float, default=0.25, help="share of each sequence that is prompt")
    parser.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=0,
                        help="0: the step without DeepSpeed; 1-3: training.finetuning through Ray Train")  # fmt: skip
    return parser


def random_batch(vocab: int, rows: int, seq: int, prompt_share: float, generator: torch.Generator) -> dict:
    """One micro-batch as the job collates it: `rows` sequences of `seq` random words, prompt masked."""
    prompt = int(seq * prompt_share)
    examples = []
    for _ in range(rows):
        ids = torch.randint(FIRST_WORD, vocab, (seq,), generator=generator).tolist()
        examples.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return collate(examples, PAD_ID)


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> None:
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_step(model, optimizer, batch: dict, args: argparse.Namespace) -> dict:
    """One optimizer step on one micro-batch: seconds per phase (the GPU synchronised at each edge), loss, tokens."""
    device, autocast = args.device, args.dtype == "bfloat16"
    moved, data_s = timed(lambda: {name: tensor.to(device) for name, tensor in batch.items()}, device)

    def forward() -> torch.Tensor:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=moved["input_ids"], attention_mask=moved["attention_mask"]).logits
        return causal_lm_loss(logits, moved["labels"])[0]

    loss, forward_s = timed(forward, device)
    _, backward_s = timed(loss.backward, device)
    _, optimizer_s = timed(lambda: optimizer_step(model, optimizer, args.grad_clip), device)
    seconds = dict(zip(PHASES, (data_s, forward_s, backward_s, optimizer_s), strict=True))
    return {"seconds": seconds, "loss": float(loss.detach()), "tokens": int(batch["attention_mask"].sum())}


def measure_size(model, optimizer, size: tuple[int, int], args: argparse.Namespace, peak: float | None) -> dict:
    """`--warmup` then `--steps` steps of one setting: tokens/s, MFU, peak memory, phases, losses."""
    rows, seq = size
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    batches = [random_batch(vocab, rows, seq, args.prompt_share, generator) for _ in range(args.warmup + args.steps)]
    for batch in batches[: args.warmup]:
        train_step(model, optimizer, batch, args)
    reset_peak(args.device)
    steps = [train_step(model, optimizer, batch, args) for batch in batches[args.warmup :]]
    seconds = sum(sum(step["seconds"].values()) for step in steps)
    tokens = sum(step["tokens"] for step in steps)
    layers = model.config.num_hidden_layers
    flops = flops_per_token(model, training=True) + attention_flops(model.config, [seq] * rows, layers, True) / (
        rows * seq
    )
    tokens_per_s = tokens / seconds
    phases = {name: sum(step["seconds"][name] for step in steps) / len(steps) for name in PHASES}
    return {"micro_batch": rows, "seq": seq, "steps": len(steps), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens_per_s, "flops_per_token": flops, "tflops": tokens_per_s * flops / 1e12,
            "mfu": mfu(tokens_per_s, flops, peak), "peak_gib": peak_gib(args.device), "phases_s": phases,
            "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"]}  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    """Every setting of `--sizes`, without DeepSpeed: the figures `--json` writes."""
    model = build_model(args.shape, args.device, torch.float32, args.seed).train()
    model.config.use_cache = False
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    # Fused, as the job's worker builds it: one kernel over all parameters rather than one per operation.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
    peak = peak_flops(args.device, args.peak_tflops)
    measured = [measure_size(model, optimizer, size, args, peak) for size in parse_sizes(args.sizes)]
    best = max(measured, key=lambda row: row["tokens_per_s"])
    results = {"shape": args.shape, "device": device_name(args.device), "path": "torch step, no DeepSpeed",
               "dtype": args.dtype, "weights": "float32", "optimizer": "AdamW, fused", "params": params,
               "peak_flops": peak, "sizes": measured, "best": best}  # fmt: skip
    del model, optimizer
    release(args.device)
    return results


def missing_modules(names: tuple[str, ...]) -> list[str]:
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def report(results: dict) -> list[str]:
    lines = [f"fine-tuning steps on the {results['shape']} shape on {results['device']}: {results['params']:,} "
             f"parameters, {results['path']}, {results['dtype']}, {results['optimizer']}"]  # fmt: skip
    header = ["micro x seq", "steps", "tokens/s", "TFLOP/s", "MFU", "peak GiB", *(f"{p} s" for p in PHASES), "loss"]
    rows = [[f"{row['micro_batch']} x {row['seq']}", str(row["steps"]), f"{row['tokens_per_s']:,.0f}",
             f"{row['tflops']:.1f}", percent(row["mfu"]), gib(row["peak_gib"]),
             *(f"{row['phases_s'].get(p, float('nan')):.3f}" for p in PHASES),
             f"{row['loss_first']:.3f} -> {row['loss_last']:.3f}"]
            for row in results["sizes"]]  # fmt: skip
    lines += ["  " + line for line in table(header, rows)]
    lines.append(summary(results))
    return lines


def summary(results: dict) -> str:
    """One line: the best setting's rate, MFU and peak memory."""
    best = results["best"]
    return (f"train {results['shape']} ({results['path']}): best {best['micro_batch']} x {best['seq']}: "
            f"{best['tokens_per_s']:,.0f} tokens/s, MFU {percent(best['mfu'])}, "
            f"peak {gib(best['peak_gib'])} GiB")  # fmt: skip


def ratios(results: dict) -> dict:
    best, first = results["best"], results["sizes"][0]
    return {f"{results['shape']}: training MFU, best setting": best["mfu"],
            f"{results['shape']}: best setting / {first['micro_batch']} x {first['seq']}":
                best["tokens_per_s"] / first["tokens_per_s"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        parse_sizes(args.sizes)
    except ValueError as error:
        parser.error(f"--sizes: {error}")
    if args.shape in TOO_LARGE:
        print(f"python -m bench.{NAME}: --shape {args.shape}: {TOO_LARGE[args.shape]}")
        return 2
    if line := refusal(NAME, args.shape, args.device):
        print(line)
        return 2
    if args.zero and (missing := missing_modules(("ray", "deepspeed"))):
        print(f"python -m bench.{NAME}: --zero {args.zero} runs Ray Train with DeepSpeed; missing here: "
              f"{', '.join(missing)} (--zero 0 measures the step without them)")  # fmt: skip
        return 2
    if args.zero:
        from bench.gpu.train_zero import run_zero

        results = run_zero(args)
    else:
        results = run(args)
    return publish(NAME, args, report(results), results, ratios(results))


if __name__ == "__main__":
    sys.exit(main())
