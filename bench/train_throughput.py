"""Training tokens/s of the Ray Train + DeepSpeed loop against a plain single-process torch loop.

Both train the same model on the same rows, in the same micro-batches and global batch, with AdamW.
The plain loop runs in this process with every core; the Ray loop runs `training.finetuning.finetune` with
--workers workers (ZeRO stage --zero-stage, gloo on CPU). Steady-state tokens/s is taken from the
per-step timings (first step left out); start-up (Ray, workers, model load, DeepSpeed init) is
reported separately as the fit's wall time minus its step times.

    python bench/train_throughput.py                      # synthetic Llama (hidden 256, 4 layers)
    python bench/train_throughput.py --model smollm2-135m --rows 96 --max-tokens 128
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import models  # noqa: E402
from training.finetuning.finetune import FinetuneConfig, run_finetune  # noqa: E402
from training.finetuning.losses import causal_lm_loss  # noqa: E402
from training.finetuning.sft_data import BatchShape, Example, collate, encode_example, plan_window, training_target  # noqa: E402


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


def plain_loop(model_dir: str, data: Path, args: argparse.Namespace) -> dict[str, float]:
    """One process, torch AdamW, the same global batch per step as the Ray run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = pq.read_table(data).to_pylist()
    examples = [
        Example(*encode_example(tokenizer, row["prompt"], training_target(row), args.max_tokens)) for row in rows
    ]
    # world_size=1 and micro-batches of the Ray run's global batch per step: same rows per optimizer step.
    shape = BatchShape(args.micro_batch, args.workers, 1, len(rows))
    micro = plan_window([len(e.input_ids) for e in examples], shape, 0, 0, 0)
    step_times, tokens = [], []
    for step in range(len(micro) // args.workers):
        started = time.perf_counter()
        step_tokens = 0
        for ids in micro[step * args.workers : (step + 1) * args.workers]:
            batch = collate([examples[i] for i in ids], tokenizer.pad_token_id)
            loss, _ = causal_lm_loss(
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
            )
            (loss / args.workers).backward()
            step_tokens += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - started)
        tokens.append(step_tokens)
    return {"tokens_per_s": sum(tokens[1:]) / sum(step_times[1:]), "steps": len(step_times)}


def ray_loop(model_dir: str, data: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    config = FinetuneConfig(
        model=model_dir, data=str(data), out=str(out), zero_stage=args.zero_stage, num_workers=args.workers,
        micro_batch=args.micro_batch, grad_accum=1, window_steps=1000, max_tokens=args.max_tokens, epochs=1,
        lr=1e-4, warmup_steps=1, checkpoint_every=10**6, log_every=10**6, force=True,
    )  # fmt: skip
    started = time.perf_counter()
    run_finetune(config)
    wall = time.perf_counter() - started
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_seconds = [row["tokens"] / row["tokens_per_s"] for row in metrics]
    steady_tokens = sum(row["tokens"] for row in metrics[1:])
    return {
        "tokens_per_s": steady_tokens / sum(step_seconds[1:]),
        "steps": len(metrics),
        "startup_s": wall - sum(step_seconds),
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF directory or embedded name; default: a synthetic Llama")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=192)
    parser.add_argument("--words", type=int, default=96, help="longest answer in words (synthetic data)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(models.cache_root() / "torch_extensions"))
    with tempfile.TemporaryDirectory(prefix="finescope-bench-") as tmp:
        root = Path(tmp)
        model_dir = (
            models.local_model_dir(args.model)
            if args.model
            else synthetic_model(root / "model", args.hidden, args.layers)
        )
        data = synthetic_data(root / "data", args.rows, args.words)
        plain = plain_loop(model_dir, data, args)
        ray_run = ray_loop(model_dir, data, root / "out", args)
    print(f"model: {args.model or f'synthetic llama hidden={args.hidden} layers={args.layers}'}, rows={args.rows}")
    print(f"plain torch loop (1 process):        {plain['tokens_per_s']:9.0f} tokens/s over {plain['steps']} steps")
    label = f"Ray Train + DeepSpeed ZeRO-{args.zero_stage} ({args.workers} workers):"
    print(f"{label} {ray_run['tokens_per_s']:9.0f} tokens/s over {ray_run['steps']} steps")
    print(f"throughput ratio (Ray+DS / plain):   {ray_run['tokens_per_s'] / plain['tokens_per_s']:9.2f}")
    print(f"Ray+DS start-up and teardown:        {ray_run['startup_s']:9.1f} s of a {ray_run['wall_s']:.1f} s fit")


if __name__ == "__main__":
    main()
