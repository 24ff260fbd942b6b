"""Generated tokens per second of the batched transformers teacher, against one-row-at-a-time `generate`.

Measured in one process on the embedded SmolLM2-135M-Instruct, with real distillation prompts: Wikipedia
summaries from the demo corpus, put through the continuation recipe and the model's chat template
(`training.distillation.distill.prepare_rows`), exactly as the distill job builds them.

- **batched**: `BatchedGenerator.generate` on all prompts (length-sorted micro-batches, left padding, KV
  cache, per-row stop at EOS), the teacher backend the distill job runs on CPU;
- **one-by-one**: `model.generate` on each prompt alone, the same model, greedy, the same max_new_tokens
  and EOS.

Both decode greedily, so both produce the same text up to float rounding. Only tokens each method really
generated count (up to and including EOS; the padding a finished row gets while the rest of its batch
goes on is never counted). Each method is timed `--repeats` times after a warm-up on two prompts and its best round is
kept: on a shared machine noise only adds time. Target: batched >= 3 x one-by-one. A benchmark, not a
test; absolute numbers on a shared machine mean little, the ratio is the point.

    .venv/bin/python bench/teacher_throughput.py
    .venv/bin/python bench/teacher_throughput.py --prompts 64 --max-new-tokens 64 --json /tmp/teacher.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch

from core.models import DEFAULT_MODEL, load_tokenizer
from curation.demo_corpus import load_summaries
from training.distillation.distill import PrepareSpec, prepare_rows
from training.distillation.teacher import BatchedGenerator, Generation, TeacherConfig, finish_row

TARGET = 3.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded model name, HF directory or .gguf file")
    parser.add_argument("--prompts", type=int, default=16, help="documents sampled from the demo corpus")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per prompt at most")
    parser.add_argument("--max-document-tokens", type=int, default=64, help="document window (prompt length)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per generate call (batched)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds per method, after one warm-up")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    return parser.parse_args()


def sample_prompts(model: str, count: int, max_document_tokens: int, max_new_tokens: int) -> list[list[int]]:
    tokenizer = load_tokenizer(model)
    rows = [row for row in load_summaries() if len(row["text"]) > 400]
    random.Random(0).shuffle(rows)
    spec = PrepareSpec(
        model,
        "continuation",
        "instruction",
        "response",
        "text",
        0.5,
        max_document_tokens,
        16,
        8192,
        max_new_tokens,
        "none",
    )
    prepared = prepare_rows(
        [{"id": str(i), "text": row["text"]} for i, row in enumerate(rows[:count])], spec, tokenizer
    )
    return [row["prompt_ids"] for row in prepared if not row["reason"]]


def one_by_one(generator: BatchedGenerator, prompts: list[list[int]]) -> list[Generation]:
    """The baseline: plain `model.generate` per prompt, no padding, the same settings."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt], dtype=torch.long)
        with torch.inference_mode():
            output = generator.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=generator.generation_config
            )
        new = output[0, ids.shape[1] :].tolist()
        config = generator.config
        out.append(
            finish_row(new, generator.tokenizer, generator.stop_ids, [], generator.pad_id, config.max_new_tokens)
        )
    return out


def timed(function, prompts: list[list[int]], repeats: int) -> tuple[float, list[Generation]]:
    function(prompts[:2])  # warm-up
    best, result = float("inf"), []
    for _ in range(repeats):
        started = time.perf_counter()
        result = function(prompts)
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    prompts = sample_prompts(args.model, args.prompts, args.max_document_tokens, args.max_new_tokens)
    config = TeacherConfig(
        model=args.model, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, max_batch_tokens=1 << 20
    )
    generator = BatchedGenerator(config, threads=args.threads)
    batched_s, batched = timed(generator.generate, prompts, args.repeats)
    single_s, single = timed(lambda chosen: one_by_one(generator, chosen), prompts, args.repeats)
    batched_tokens = sum(g.tokens for g in batched)
    single_tokens = sum(g.tokens for g in single)
    same = sum(a.text == b.text for a, b in zip(batched, single, strict=True))
    figures = {
        "model": args.model,
        "prompts": len(prompts),
        "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "batched_tokens": batched_tokens,
        "batched_s": round(batched_s, 3),
        "batched_tokens_per_s": round(batched_tokens / batched_s, 1),
        "one_by_one_tokens": single_tokens,
        "one_by_one_s": round(single_s, 3),
        "one_by_one_tokens_per_s": round(single_tokens / single_s, 1),
        "identical_outputs": f"{same}/{len(prompts)}",
    }
    figures["ratio"] = round(figures["batched_tokens_per_s"] / figures["one_by_one_tokens_per_s"], 2)
    figures["target"] = TARGET
    for name, value in figures.items():
        print(f"{name:>24}: {value}")
    print(f"batched vs one-by-one: {figures['ratio']}x generated tokens/s (target >= {TARGET}x)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
