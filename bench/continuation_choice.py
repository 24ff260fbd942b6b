"""Is the continuation task above chance for the base model? Accuracy per domain against chance (25%).

From the packaged corpus's labelled summaries (`curation.demo_corpus.load_summaries`), per domain (the
replication's: mathematics, biology, history), every document of the domain's topic in a seeded order
gives a question (`training.evaluation.continuation`): its first `--context-words` words, then its next
`--choice-words` words among three spans of other documents of the same topic at the same offset (with
`--spans N`, up to N questions, one per consecutive span, each after every word before it). The
first `--questions` questions of each domain are scored by the shared-prefix scorer, as evaluate scores
MMLU; a domain whose topic has fewer usable documents gives all it has, and says why the others gave none.

Each domain's accuracy is printed with its Wilson interval for every scoring rule; `char` (per character,
evaluate's MMLU headline) is the task's rule. A domain is above chance when its interval's lower bound is.

    .venv/bin/python -m bench.continuation_choice                        # SmolLM2-135M, 300 per domain
    .venv/bin/python -m bench.continuation_choice --quick                # a tiny random model, 24 per domain
    .venv/bin/python -m bench.continuation_choice --json /tmp/continuation_choice.json
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.measure import bench_parser, settings_of, timed, write_json
from core.models import DEFAULT_MODEL, load_model, load_tokenizer
from core.reader import doc_id
from curation.demo_corpus import load_summaries
from training.evaluation import continuation, stats
from training.evaluation.evaluate import NORMS

NAME = "continuation_choice"
DOMAINS = {"mathematics": "Mathematics", "biology": "Biology and health sciences", "history": "History"}
"""Domain -> `meta.topic`, as the shipped replication spec maps them."""
CHANCE = 1 / (continuation.DISTRACTORS + 1)
QUICK_QUESTIONS = 24


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser(NAME, __doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--quick", action="store_true", help="a tiny random model built here, few questions")
    parser.add_argument("--domains", nargs="+", choices=sorted(DOMAINS), default=list(DOMAINS))
    parser.add_argument(
        "--questions", type=int, default=None, help=f"per domain; default 300 ({QUICK_QUESTIONS} quick)"
    )
    parser.add_argument("--context-words", type=int, default=continuation.CONTEXT_WORDS)
    parser.add_argument("--choice-words", type=int, default=continuation.CHOICE_WORDS)
    parser.add_argument("--spans", type=int, default=1, help="questions per document at most (consecutive spans)")
    parser.add_argument("--seed", type=int, default=0, help="document order, distractors and answer positions")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--max-batch-tokens", type=int, default=4096)
    return parser


def domain_documents(rows: list[dict[str, Any]], topic: str, seed: int) -> list[continuation.Document]:
    """The summaries of one topic, with their content ids, in a seeded order."""
    documents = [continuation.Document(doc_id(row["text"].strip()), row["text"], topic)
                 for row in rows if row["meta"]["topic"] == topic]  # fmt: skip
    random.Random(seed).shuffle(documents)
    return documents


def tiny_model(directory: Path, texts: list[str]) -> str:
    """A 2-layer Llama with random weights and a word-level tokenizer over `texts`, saved as a directory."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(tok_models.WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainer=trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=fast.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=fast.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return str(directory)


def score_domain(model, tokenizer, built: continuation.QuestionSet, args: argparse.Namespace) -> dict[str, Any]:
    """Score one domain's questions: per rule, the accuracy with its Wilson interval; and the seconds taken."""
    questions = built.questions[: args.questions]
    scores, seconds = timed(
        lambda: continuation.score_questions(model, tokenizer, questions, max_batch_tokens=args.max_batch_tokens)
    )
    return {
        "documents": built.documents,
        "usable_questions": len(built.questions),
        "skipped": built.skipped,
        "questions": len(questions),
        "seconds": round(seconds, 1),
        "accuracy": {
            norm: stats.accuracy(continuation.question_hits(scores, questions, norm)).to_dict() for norm in NORMS
        },
    }


def report(domain: str, figures: dict[str, Any]) -> list[str]:
    """A domain's lines: its headline accuracy against chance, the other rules, and the documents skipped."""
    head = figures["accuracy"][continuation.NORM]
    verdict = "above chance" if head["ci_low"] > CHANCE else "NOT above chance"
    others = ", ".join(
        f"{norm} {figures['accuracy'][norm]['accuracy']:.1%}" for norm in NORMS if norm != continuation.NORM
    )
    return [
        f"  {domain:<12} {head['accuracy']:6.1%} [{head['ci_low']:.1%}, {head['ci_high']:.1%}] on "
        f"{figures['questions']} questions, chance {CHANCE:.0%}: {verdict}  ({others}; {figures['seconds']} s)",
        f"  {'':<12} {figures['documents']} documents of the topic, {figures['usable_questions']} usable; "
        f"skipped {figures['skipped'] or 'none'}",
    ]


def main() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # the scorer's progress lines
    args.questions = args.questions or (QUICK_QUESTIONS if args.quick else 300)
    continuation.check_sizes(args.context_words, args.choice_words, continuation.DISTRACTORS, args.seed, args.spans)
    torch.set_num_threads(args.threads)
    rows = load_summaries()
    built = {
        domain: continuation.build_questions(
            domain_documents(rows, DOMAINS[domain], args.seed),
            args.context_words,
            args.choice_words,
            seed=args.seed,
            spans=args.spans,
        )
        for domain in args.domains
    }
    with tempfile.TemporaryDirectory() as scratch:
        if args.quick:
            texts = [
                q.context + choice
                for b in built.values()
                for q in b.questions[: args.questions]
                for choice in q.choices
            ]
            args.model = tiny_model(Path(scratch), texts)
        tokenizer, model = load_tokenizer(args.model), load_model(args.model)
        started = time.perf_counter()
        figures = {domain: score_domain(model, tokenizer, questions, args) for domain, questions in built.items()}
    seconds = time.perf_counter() - started
    print(f"{args.model}: which span continues the document (at least {args.context_words} words of context, "
          f"{args.choice_words}-word choices, 1 of 4, up to {args.spans} per document), per character")  # fmt: skip
    for domain, entry in figures.items():
        print("\n".join(report(domain, entry)))
    print(f"  scored in {seconds:.0f} s with {args.threads} torch thread(s)")
    if args.json:
        above = {domain: entry["accuracy"][continuation.NORM]["ci_low"] > CHANCE for domain, entry in figures.items()}
        write_json(args.json, NAME, settings_of(args), {"domains": figures, "chance": CHANCE, "seconds": seconds},
                   {"above_chance": above})  # fmt: skip


if __name__ == "__main__":
    main()
