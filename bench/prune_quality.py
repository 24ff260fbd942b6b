"""Domain perplexity of SmolLM2 pruned by 30%: Taylor importance on domain text (with the removal losses that
choose which attention groups go, and without: `taylor-first-order`) vs magnitude vs random.

The domain set comes from the demo corpus (Wikipedia summaries with `meta.topic`): the documents of one
topic are shuffled with a fixed seed and split into importance documents, written as a curated-style
Parquet directory (`id, text, domain`) and read by the job's own code, and held-out documents, on which
perplexity is measured. Every method runs through `run_pruning` exactly as `python -m jobs.prune` does,
writes its checkpoint, and the checkpoint is reloaded with plain `AutoModelForCausalLM.from_pretrained`
for the evaluation. No recovery training: these are the numbers straight after pruning.

    python -m bench.prune_quality                                   # Biology, ratio 0.3
    python -m bench.prune_quality --topic Mathematics --importance-docs 160 --heldout-docs 96
    python -m bench.prune_quality --json /tmp/prune_quality.json --work /tmp/pq   # a rerun reuses /tmp/pq

Perplexity is exp of the mean next-token loss over all held-out tokens (token-weighted), first 256
tokens of each document: the evaluation's own (`training.evaluation.perplexity`), one window per
document. Peak RSS of the Taylor run is the pruning process's high-water mark, recorded in its
prune_report.json (the Taylor run goes first, so nothing bigger has run before it).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch
from transformers import AutoModelForCausalLM

from bench.measure import bench_parser, settings_of, write_json
from core import storage
from core.batching import tokenize_texts
from core.models import DEFAULT_MODEL, load_model, load_tokenizer
from curation.demo_corpus import load_summaries
from training.evaluation.perplexity import document_nll, perplexity
from training.pruning.prune import PruneConfig, read_report, run_pruning

NAME = "prune_quality"
METHODS = ("taylor", "taylor-first-order", "magnitude", "random")
FIRST_ORDER = "taylor-first-order"
"""Taylor with `removal_docs: 0`: groups chosen by their Taylor scores alone, as before the removal losses."""


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser(NAME, __doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--topic", default="Biology and health sciences")
    parser.add_argument("--ratio", type=float, default=0.30)
    parser.add_argument("--importance-docs", type=int, default=256)
    parser.add_argument("--heldout-docs", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--ranking", default="global", choices=["global", "per_layer"])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="directory for the data and checkpoints (default: a temp dir)")
    parser.add_argument(
        "--force", action="store_true", help="re-prune even where --work holds a finished run of the same config"
    )
    return parser


def split_domain(topic: str, importance_docs: int, heldout_docs: int, seed: int) -> tuple[list[str], list[str]]:
    texts = [row["text"] for row in load_summaries() if row["meta"]["topic"] == topic]
    if len(texts) < importance_docs + heldout_docs:
        raise SystemExit(f"topic {topic!r} has {len(texts)} documents; ask for fewer")
    random.Random(seed).shuffle(texts)
    return texts[:importance_docs], texts[importance_docs : importance_docs + heldout_docs]


def heldout_perplexity(model, tokenizer, texts: list[str], max_tokens: int) -> float:
    """Token-weighted perplexity of the texts' first `max_tokens` tokens, each document's first token
    unscored: the evaluation's perplexity, with one window per document."""
    token_lists = tokenize_texts(tokenizer, texts, max_tokens)
    nll, counts = document_nll(model, token_lists, tokenizer.pad_token_id, window=max_tokens, stride=max_tokens)
    return perplexity(nll, counts)


def write_domain_data(work: Path, texts: list[str], topic: str) -> str:
    """The importance documents as a curated-style Parquet directory (`id, text, domain`), for the job."""
    data_dir = str(work / "curated")
    table = pa.table({"id": [str(i) for i in range(len(texts))], "text": texts, "domain": [topic] * len(texts)})
    storage.makedirs(data_dir)
    storage.write_parquet_atomic(table, storage.join(data_dir, "part-00000.parquet"))
    return data_dir


def prune_and_score(method: str, args, data_dir: str, work: Path, tokenizer, heldout: list[str]) -> tuple[dict, float]:
    """Prune with `method` through the job's own code, reload the checkpoint, score it on the held-out text.
    Returns its figures and the pruning process's peak RSS (measured by the job, where the importance ran)."""
    started = time.perf_counter()
    config = PruneConfig(
        model=args.model,
        data=data_dir,
        out=str(work / f"pruned-{method}"),
        ratio=args.ratio,
        method="taylor" if method == FIRST_ORDER else method,  # type: ignore[arg-type]
        removal_docs=0 if method == FIRST_ORDER else PruneConfig.removal_docs,
        ranking=args.ranking,  # type: ignore[arg-type]
        max_docs=args.importance_docs,
        max_tokens=args.max_tokens,
        seed=args.seed,
        force=args.force,
    )
    run_pruning(config)
    report = read_report(config.out)
    prune_seconds = time.perf_counter() - started
    model = AutoModelForCausalLM.from_pretrained(config.out, dtype=torch.float32).eval()
    row = {
        "ppl": heldout_perplexity(model, tokenizer, heldout, args.max_tokens),
        "ratio": report["ratio_achieved"],
        "decoder_ratio": report["decoder_ratio_achieved"],
        "sizes": report["sizes_after"],
        "prune_seconds": round(prune_seconds, 1),
    }
    return row, report["peak_rss_mb"]


def print_table(results: dict[str, dict], args, heldout: list[str]) -> None:
    print(f"\nheld-out perplexity on {args.topic!r}, {len(heldout)} documents, ratio asked {args.ratio}")
    print(f"{'model':<20} {'ppl':>12} {'total cut':>10} {'decoder cut':>12}  sizes (heads/kv/mlp)")
    for name, row in results.items():
        sizes = row.get("sizes")
        shape = (
            f"{sizes['num_attention_heads']}/{sizes['num_key_value_heads']}/{sizes['intermediate_size']}"
            if sizes
            else "9/3/1536"
        )
        print(f"{name:<20} {row['ppl']:>12.2f} {row['ratio']:>10.3f} {row.get('decoder_ratio', 0.0):>12.3f}  {shape}")
    if "taylor" in results:
        print(f"\npeak RSS after the Taylor importance run: {results['taylor']['peak_rss_mb']:.0f} MB")
        others = [m for m in (FIRST_ORDER, "magnitude", "random") if m in results]
        beats = all(results["taylor"]["ppl"] < results[m]["ppl"] for m in others)
        print(f"taylor beats {', '.join(others)}: {'yes' if beats else 'NO'}")


def main() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="finescope-prune-quality-"))
    importance_texts, heldout = split_domain(args.topic, args.importance_docs, args.heldout_docs, args.seed)
    data_dir = write_domain_data(work, importance_texts, args.topic)
    tokenizer = load_tokenizer(args.model)
    print(f"topic {args.topic!r}: {len(importance_texts)} importance docs, {len(heldout)} held-out docs, work {work}")

    results: dict[str, dict] = {}
    for method in args.methods.split(","):
        results[method], peak_rss = prune_and_score(method, args, data_dir, work, tokenizer, heldout)
        print(f"{method}: {json.dumps(results[method])}", flush=True)
        if method == "taylor":  # the Taylor run goes first, so nothing bigger has run before it
            taylor_rss = peak_rss
    if "taylor" in results:
        results["taylor"]["peak_rss_mb"] = round(taylor_rss, 1)
    results["unpruned"] = {"ppl": heldout_perplexity(load_model(args.model), tokenizer, heldout, args.max_tokens),
                           "ratio": 0.0}  # fmt: skip
    print_table(results, args, heldout)
    if args.json:
        unpruned = results["unpruned"]["ppl"]
        ratios = {f"{name} / unpruned perplexity": row["ppl"] / unpruned for name, row in results.items()
                  if name != "unpruned"}  # fmt: skip
        write_json(args.json, NAME, settings_of(args), results, ratios)


if __name__ == "__main__":
    main()
