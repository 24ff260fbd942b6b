"""Questions per second of MMLU scoring: shared-prefix batches against one forward per choice.

On the same questions of the fixed sample (zero-shot prompts, the evaluation job's format), in one process:

- **batched**: `score_items`, the job's path: each question's context and its four choices packed into one
  row (4-D attention mask), many questions per forward, sorted by length, LM head only where a token is
  scored;
- **per choice**: `score_naive`, one forward of the whole model per (question, choice) at batch size 1,
  full logits.

Each method runs `--rounds` times after a warm-up, interleaved, and its best round counts (on a shared
machine noise only ever adds time). Both must give the same log-likelihoods; the largest difference is
printed. Target: batched >= 3x per choice. A benchmark, not a test: absolute numbers on a shared machine
mean little, the ratio is the point.

    .venv/bin/python bench/eval_throughput.py
    .venv/bin/python bench/eval_throughput.py --questions 100 --threads 2 --json /tmp/eval_throughput.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from core.models import DEFAULT_MODEL, load_model, load_tokenizer
from training.evaluation import mmlu
from training.evaluation.scoring import encode_item, score_items, score_naive

TARGET = 3.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--questions", type=int, default=40, help="questions of the fixed sample (seed 0)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fairest on a shared machine)")
    parser.add_argument("--max-batch-tokens", type=int, default=4096)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer, model = load_tokenizer(args.model), load_model(args.model)
    dev, test = mmlu.split_dev(mmlu.load_mmlu().questions)
    questions = mmlu.sample_questions(test, args.questions, seed=0)
    items = [
        encode_item(tokenizer, mmlu.build_context(q, []), [mmlu.continuation(c) for c in q.choices], 2048)
        for q in questions
    ]
    packed_tokens = sum(item.length for item in items)
    naive_tokens = sum(len(item.context) * 4 + sum(len(c) for c in item.choices) for item in items)

    methods = {
        "batched": lambda: score_items(model, items, tokenizer.pad_token_id, args.max_batch_tokens),
        "per_choice": lambda: score_naive(model, items),
    }
    scores = {name: run() for name, run in methods.items()}  # warm-up, and the values to compare
    best = {name: float("inf") for name in methods}
    for _ in range(args.rounds):
        for name, run in methods.items():
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)

    rates = {name: len(items) / seconds for name, seconds in best.items()}
    ratio = rates["batched"] / rates["per_choice"]
    difference = float(np.abs(scores["batched"] - scores["per_choice"]).max())
    same = bool((scores["batched"].argmax(1) == scores["per_choice"].argmax(1)).all())
    print(f"{len(items)} questions, {args.threads} torch thread(s), best of {args.rounds} rounds")
    print(f"  tokens through the model: batched {packed_tokens:,}, per choice {naive_tokens:,}")
    for name in methods:
        print(f"  {name:<11} {rates[name]:7.2f} questions/s  ({best[name]:.1f} s)")
    print(f"  batched is {ratio:.2f}x per choice (target >= {TARGET:.0f}x): {'met' if ratio >= TARGET else 'NOT met'}")
    print(f"  largest log-likelihood difference {difference:.2e}; same predictions: {same}")
    if args.json:
        figures = {"questions": len(items), "threads": args.threads, "questions_per_s": rates, "ratio": ratio,
                   "max_abs_difference": difference, "same_predictions": same,
                   "tokens": {"batched": packed_tokens, "per_choice": naive_tokens}}  # fmt: skip
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
