"""`python -m bench.gpu.train_scale --zero N`: the fine-tuning stage itself (Ray Train, DeepSpeed ZeRO-N) on the
random model of a shape, for the figures the plain step cannot give: DeepSpeed's bf16 weights and master copies,
its gradient buckets, its partitioned optimizer step.

Imported only for `--zero` (it needs Ray, DeepSpeed and pyarrow); nothing here runs on a machine without them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from bench.gpu.cores import word_tokenizer
from bench.gpu.scale_models import FIRST_WORD, attention_flops, build_model, device_name, parse_sizes
from bench.measure import flops_per_token, mfu, peak_flops

ROWS_PER_STEP_SPARE = 2
"""Rows beyond the steps asked for, so that the last window still fills its steps."""


def save_model(shape: str, directory: Path, seed: int) -> tuple[str, torch.nn.Module]:
    """The shape's random model (built on the CPU, in float32, as the job loads it) and a word-level tokenizer,
    saved as a Hugging Face directory; the model is returned for its FLOP count."""
    model = build_model(shape, "cpu", torch.float32, seed)
    tokenizer = word_tokenizer(model.config.vocab_size)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory), model


def write_distilled(path: Path, vocab: int, rows: int, seq: int, prompt_share: float, seed: int) -> str:
    """A distilled set of `rows` accepted rows of random words: about `seq` tokens each, `prompt_share` prompt."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    generator = torch.Generator().manual_seed(seed)
    prompt = max(1, int(seq * prompt_share))

    def words(count: int) -> str:
        ids = torch.randint(0, vocab - FIRST_WORD, (count,), generator=generator).tolist()
        return " ".join(f"w{i}" for i in ids)

    prompts = [words(prompt) for _ in range(rows)]
    answers = [words(seq - prompt) for _ in range(rows)]
    table = pa.table({"id": [f"r{i}" for i in range(rows)], "prompt": prompts, "original": answers,
                      "teacher": answers, "accepted": [True] * rows})  # fmt: skip
    path.mkdir(parents=True)
    pq.write_table(table, path / "part-0.parquet")
    return str(path)


def finetune_config(args: argparse.Namespace, model: str, data: str, out: str, size: tuple[int, int]):
    from training.finetuning.config import FinetuneConfig

    steps = args.warmup + args.steps
    return FinetuneConfig(
        model=model, data=data, out=out, zero_stage=args.zero, gpus=1 if args.device.startswith("cuda") else 0,
        actors=1, micro_batch=size[0], max_tokens=size[1], max_steps=steps, window_steps=steps, lr=args.lr,
        grad_clip=args.grad_clip, warmup_steps=1, seed=args.seed, checkpoint_every=steps, log_every=steps,
    )  # fmt: skip


def steps_figures(metrics: list[dict], args: argparse.Namespace, flops: float, size: tuple[int, int]) -> dict:
    """The stage's own per-step metrics after the warm-up steps, in the plain step's shape."""
    timed = metrics[args.warmup :]
    seconds = sum(row["step_s"] for row in timed)
    tokens = sum(row["tokens"] for row in timed)
    tokens_per_s = tokens / seconds
    phases = {name: sum(row["phases_s"][name] for row in timed) / len(timed) for name in timed[0]["phases_s"]}
    return {"micro_batch": size[0], "seq": size[1], "steps": len(timed), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens_per_s, "flops_per_token": flops, "tflops": tokens_per_s * flops / 1e12,
            "mfu": mfu(tokens_per_s, flops, peak_flops(args.device, args.peak_tflops)), "peak_gib": None,
            "phases_s": phases, "loss_first": timed[0]["loss"], "loss_last": timed[-1]["loss"]}  # fmt: skip


def run_zero(args: argparse.Namespace) -> dict:
    """The first `--sizes` setting through `training.finetuning.run_finetune`, one Ray Train worker."""
    from training.finetuning.finetune import run_finetune

    size = parse_sizes(args.sizes)[0]
    rows = (args.warmup + args.steps + ROWS_PER_STEP_SPARE) * size[0]
    with tempfile.TemporaryDirectory(prefix="finescope-train-zero-") as work:
        root = Path(work)
        model_dir, model = save_model(args.shape, root / "model", args.seed)
        config = model.config
        flops = flops_per_token(model, training=True)
        flops += attention_flops(config, [size[1]], config.num_hidden_layers, training=True) / size[1]
        params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        del model
        data = write_distilled(root / "distilled", config.vocab_size, rows, size[1], args.prompt_share, args.seed)
        run_finetune(finetune_config(args, model_dir, data, str(root / "out"), size))
        metrics = [json.loads(line) for line in (root / "out" / "metrics.jsonl").read_text().splitlines()]
    row = steps_figures(metrics, args, flops, size)
    path = f"training.finetuning through Ray Train, DeepSpeed ZeRO-{args.zero}"
    # The stage trains in bf16 on a GPU (DeepSpeed's bf16 weights, float32 master copies) and float32 on a CPU.
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return {"shape": args.shape, "device": device_name(args.device), "path": path, "dtype": dtype,
            "weights": dtype, "optimizer": "AdamW, fused", "params": params,
            "peak_flops": peak_flops(args.device, args.peak_tflops), "sizes": [row], "best": row}  # fmt: skip
