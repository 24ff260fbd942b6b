"""Generated tokens per second of the batched transformers teacher, against one-row-at-a-time `generate`.

Measured in one process on the embedded SmolLM2-135M-Instruct, with real distillation prompts: Wikipedia
summaries from the demo corpus, put through the continuation recipe and the model's chat template
(`training.distillation.distill.prepare_rows`), exactly as the distill job builds them. Every method runs
the same model in the same dtype (`--dtype`, default float32 as the teacher's; auto is bf16 where native):

- **batched**: `BatchedGenerator.generate`, the teacher backend the distill job runs on CPU: micro-batches
  of up to `--batch-size` rows, each prompt prefilled alone, all rows decoded together on a slot KV cache
  allocated once, finished rows dropped from the batch;
- **padded generate**: the backend's previous path, `model.generate` on each micro-batch padded on the
  left (`BatchedGenerator.generate_padded`), for reference;
- **one-by-one**: `model.generate` on each prompt alone, greedy, the same max_new_tokens and EOS.

All decode greedily. A row is "identical" when its text, token count and finish reason equal the
one-by-one generation's. Only tokens each method really generated count (up to and including EOS). The
methods run in turns, round after round (`--repeats`), after a warm-up on two prompts, and each keeps its
best round: on a shared machine noise only adds time, and taking turns spreads a load change over all of
them. Target: batched >= 5 x one-by-one. A benchmark, not a test; absolute numbers on a shared machine mean
little, the ratio is the point.

    .venv/bin/python -m bench.teacher_throughput
    .venv/bin/python -m bench.teacher_throughput --prompts 64 --max-new-tokens 64 --repeats 2 --json /tmp/teacher.json
"""

from __future__ import annotations

import argparse
import os
import random

import torch

from bench.measure import Rounds, bench_parser, best_of_rounds, settings_of, write_json
from core.models import DEFAULT_MODEL, load_tokenizer
from curation.demo_corpus import load_summaries
from training.distillation.distill import PrepareSettings, prepare_rows
from training.distillation.teacher import BatchedGenerator, Generation, TeacherConfig, finish_row

NAME = "teacher_throughput"
TARGET = 5.0


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser(NAME, __doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded model name, HF directory or .gguf file")
    parser.add_argument("--prompts", type=int, default=16, help="documents sampled from the demo corpus")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per prompt at most")
    parser.add_argument("--max-document-tokens", type=int, default=64, help="document window (prompt length)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per generate call (batched)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds, methods taking turns, after a warm-up")
    parser.add_argument(
        "--dtype", default="float32", choices=["auto", "float32", "bfloat16"], help="every method's dtype"
    )
    parser.add_argument("--skip-padded", action="store_true", help="leave out the padded-generate reference")
    return parser


def sample_prompts(model: str, count: int, max_document_tokens: int, max_new_tokens: int) -> list[list[int]]:
    tokenizer = load_tokenizer(model)
    rows = [row for row in load_summaries() if len(row["text"]) > 400]
    random.Random(0).shuffle(rows)
    spec = PrepareSettings(
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


def same(a: Generation, b: Generation) -> bool:
    return (a.text, a.tokens, a.finish_reason) == (b.text, b.tokens, b.finish_reason)


def padded(generator: BatchedGenerator, prompts: list[list[int]]) -> list[Generation]:
    """The previous batched path: left-padded `model.generate` on the same micro-batches."""
    generator.use_slots = False
    try:
        return generator.generate(prompts)
    finally:
        generator.use_slots = True


def timed_methods(generator: BatchedGenerator, prompts: list[list[int]], args) -> tuple[dict[str, Rounds], list]:
    """Each method's rounds after a warm-up on two prompts, and the 1-minute load average before and after
    each round."""
    methods = {
        "batched": generator.generate,
        "padded_generate": lambda chosen: padded(generator, chosen),
        "one_by_one": lambda chosen: one_by_one(generator, chosen),
    }
    if args.skip_padded:
        methods.pop("padded_generate")
    for method in methods.values():  # warm-up
        method(prompts[:2])
    loads = [os.getloadavg()[0]]

    def after_round(index: int, timings: dict[str, Rounds]) -> None:
        for name, rounds in timings.items():
            print(f"round {index + 1} {name}: {rounds.wall[0][-1]:.1f} s", flush=True)
        loads.append(os.getloadavg()[0])

    calls = {name: (lambda method=method: method(prompts)) for name, method in methods.items()}
    return best_of_rounds(calls, args.repeats, after_round=after_round), loads


def figures_of(timings: dict[str, Rounds], prompts: list[list[int]], generator: BatchedGenerator, args, loads) -> dict:
    """Tokens, best seconds and tokens/s per method, rows identical to one-by-one's, and the ratios."""
    reference: list[Generation] = timings["one_by_one"].results[0]
    figures: dict = {
        "model": args.model,
        "dtype": generator.dtype,
        "prompts": len(prompts),
        "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "repeats": args.repeats,
        "load_average_1min": loads,
    }
    for name, rounds in timings.items():
        outputs: list[Generation] = rounds.results[0]
        tokens = sum(g.tokens for g in outputs)
        figures[f"{name}_tokens"] = tokens
        figures[f"{name}_s"] = round(rounds.best(), 3)
        figures[f"{name}_tokens_per_s"] = round(tokens / rounds.best(), 2)
        if name != "one_by_one":
            identical = sum(same(a, b) for a, b in zip(outputs, reference, strict=True))
            figures[f"{name}_identical_to_one_by_one"] = f"{identical}/{len(prompts)}"
    figures["ratio"] = round(figures["batched_tokens_per_s"] / figures["one_by_one_tokens_per_s"], 2)
    if "padded_generate" in timings:
        figures["padded_ratio"] = round(figures["padded_generate_tokens_per_s"] / figures["one_by_one_tokens_per_s"], 2)
    figures["target"] = TARGET
    return figures


def main() -> None:
    args = build_parser().parse_args()
    torch.set_num_threads(args.threads)
    prompts = sample_prompts(args.model, args.prompts, args.max_document_tokens, args.max_new_tokens)
    config = TeacherConfig(
        model=args.model,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        max_batch_tokens=1 << 20,
        dtype=args.dtype,
    )
    generator = BatchedGenerator(config, threads=args.threads)
    timings, loads = timed_methods(generator, prompts, args)
    figures = figures_of(timings, prompts, generator, args, loads)
    for name, value in figures.items():
        print(f"{name:>36}: {value}")
    print(f"batched vs one-by-one: {figures['ratio']}x generated tokens/s in {generator.dtype} (target >= {TARGET}x)")
    if args.json:
        ratios = {"batched / one-by-one": figures["ratio"]}
        if "padded_ratio" in figures:
            ratios["padded generate / one-by-one"] = figures["padded_ratio"]
        write_json(args.json, NAME, settings_of(args), figures, ratios)


if __name__ == "__main__":
    main()
