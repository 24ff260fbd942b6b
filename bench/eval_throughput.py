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

    .venv/bin/python -m bench.eval_throughput
    .venv/bin/python -m bench.eval_throughput --questions 100 --threads 2 --json /tmp/eval_throughput.json
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from bench.measure import bench_parser, best_of_rounds, settings_of, write_json
from core.models import DEFAULT_MODEL, load_model, load_tokenizer
from training.evaluation import mmlu
from training.evaluation.likelihood import PackedItem, encode_item, score_items, score_naive

NAME = "eval_throughput"
TARGET = 3.0


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser(NAME, __doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--questions", type=int, default=40, help="questions of the fixed sample (seed 0)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fairest on a shared machine)")
    parser.add_argument("--max-batch-tokens", type=int, default=4096)
    return parser


def zero_shot_items(tokenizer, questions: int) -> list[PackedItem]:
    """The first `questions` of the fixed sample (seed 0), zero-shot, in the evaluation job's format."""
    _, test = mmlu.split_dev(mmlu.load_mmlu().questions)
    return [
        encode_item(tokenizer, mmlu.build_context(q, []), [mmlu.continuation(c) for c in q.choices], 2048)
        for q in mmlu.sample_questions(test, questions, seed=0)
    ]


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    tokenizer, model = load_tokenizer(args.model), load_model(args.model)
    items = zero_shot_items(tokenizer, args.questions)
    packed_tokens = sum(item.length for item in items)
    naive_tokens = sum(len(item.context) * 4 + sum(len(c) for c in item.choices) for item in items)

    methods = {
        "batched": lambda: score_items(model, items, tokenizer.pad_token_id, args.max_batch_tokens),
        "per_choice": lambda: score_naive(model, items),
    }
    scores = {name: run() for name, run in methods.items()}  # warm-up, and the values to compare
    best = {name: rounds.best() for name, rounds in best_of_rounds(methods, args.rounds).items()}

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
        figures = {"questions": len(items), "threads": args.threads, "questions_per_s": rates, "seconds": best,
                   "max_abs_difference": difference, "same_predictions": same,
                   "tokens": {"batched": packed_tokens, "per_choice": naive_tokens}, "target": TARGET}  # fmt: skip
        write_json(args.json, NAME, settings_of(args), figures, {"batched / per choice": ratio})


if __name__ == "__main__":
    main()
