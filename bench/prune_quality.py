"""Domain perplexity of SmolLM2 pruned by 30%: Taylor importance on domain text vs magnitude vs random.

The domain set comes from the demo corpus (Wikipedia summaries with `meta.topic`): the documents of one
topic are shuffled with a fixed seed and split into importance documents, written as a curated-style
Parquet directory (`id, text, domain`) and read by the job's own code, and held-out documents, on which
perplexity is measured. Every method runs through `run_pruning` exactly as `python -m jobs.prune` does,
writes its checkpoint, and the checkpoint is reloaded with plain `AutoModelForCausalLM.from_pretrained`
for the evaluation. No recovery training: these are the numbers straight after pruning.

    python bench/prune_quality.py                                   # Biology, ratio 0.3
    python bench/prune_quality.py --topic Mathematics --importance-docs 160 --heldout-docs 96
    python bench/prune_quality.py --json /tmp/prune_quality.json --work /tmp/pq   # a rerun reuses /tmp/pq

Perplexity is exp of the mean next-token loss over all held-out tokens (token-weighted), first 256
tokens of each document. Peak RSS of the Taylor run is the pruning process's high-water mark, recorded in its
prune_report.json (the Taylor run goes first, so nothing bigger has run before it).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch
from transformers import AutoModelForCausalLM

from core import storage
from core.models import DEFAULT_MODEL, load_model, load_tokenizer
from curation.demo_corpus import load_summaries
from training.pruning.prune import PruneConfig, domain_batches, read_report, run_pruning

METHODS = ("taylor", "magnitude", "random")


def split_domain(topic: str, importance_docs: int, heldout_docs: int, seed: int) -> tuple[list[str], list[str]]:
    texts = [row["text"] for row in load_summaries() if row["meta"]["topic"] == topic]
    if len(texts) < importance_docs + heldout_docs:
        raise SystemExit(f"topic {topic!r} has {len(texts)} documents; ask for fewer")
    random.Random(seed).shuffle(texts)
    return texts[:importance_docs], texts[importance_docs : importance_docs + heldout_docs]


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], max_tokens: int) -> float:
    """exp(mean next-token loss) over every real token of the texts."""
    total_loss, total_tokens = 0.0, 0
    for ids, mask in domain_batches(texts, tokenizer, max_tokens, batch_size=8):
        labels = ids.masked_fill(mask == 0, -100)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total_loss += float(loss)
        total_tokens += int((targets != -100).sum())
    return math.exp(total_loss / total_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
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
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--force", action="store_true", help="re-prune even where --work holds a finished run of the same config"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)

    work = Path(args.work or tempfile.mkdtemp(prefix="finescope-prune-quality-"))
    importance_texts, heldout = split_domain(args.topic, args.importance_docs, args.heldout_docs, args.seed)
    data_dir = str(work / "curated")
    table = pa.table(
        {
            "id": [str(i) for i in range(len(importance_texts))],
            "text": importance_texts,
            "domain": [args.topic] * len(importance_texts),
        }
    )
    storage.makedirs(data_dir)
    storage.write_parquet_atomic(table, storage.join(data_dir, "part-00000.parquet"))
    tokenizer = load_tokenizer(args.model)
    print(f"topic {args.topic!r}: {len(importance_texts)} importance docs, {len(heldout)} held-out docs, work {work}")

    results: dict[str, dict] = {}
    for method in args.methods.split(","):
        started = time.perf_counter()
        config = PruneConfig(
            model=args.model,
            data=data_dir,
            out=str(work / f"pruned-{method}"),
            ratio=args.ratio,
            method=method,  # type: ignore[arg-type]
            ranking=args.ranking,  # type: ignore[arg-type]
            max_docs=args.importance_docs,
            max_tokens=args.max_tokens,
            seed=args.seed,
            force=args.force,
        )
        run_pruning(config)
        report = read_report(config.out)
        prune_seconds = time.perf_counter() - started
        if method == "taylor":
            taylor_rss = report["peak_rss_mb"]  # measured by the job, in the process that ran the importance
        model = AutoModelForCausalLM.from_pretrained(config.out, dtype=torch.float32).eval()
        results[method] = {
            "ppl": perplexity(model, tokenizer, heldout, args.max_tokens),
            "ratio": report["ratio_achieved"],
            "decoder_ratio": report["decoder_ratio_achieved"],
            "sizes": report["sizes_after"],
            "prune_seconds": round(prune_seconds, 1),
        }
        print(f"{method}: {json.dumps(results[method])}", flush=True)
        del model

    base = load_model(args.model)
    results["unpruned"] = {"ppl": perplexity(base, tokenizer, heldout, args.max_tokens), "ratio": 0.0}

    print(f"\nheld-out perplexity on {args.topic!r}, {len(heldout)} documents, ratio asked {args.ratio}")
    print(f"{'model':<10} {'ppl':>9} {'total cut':>10} {'decoder cut':>12}  sizes (heads/kv/mlp)")
    for name, row in results.items():
        sizes = row.get("sizes")
        shape = (
            f"{sizes['num_attention_heads']}/{sizes['num_key_value_heads']}/{sizes['intermediate_size']}"
            if sizes
            else "9/3/1536"
        )
        print(f"{name:<10} {row['ppl']:>9.2f} {row['ratio']:>10.3f} {row.get('decoder_ratio', 0.0):>12.3f}  {shape}")
    if "taylor" in results:
        print(f"\npeak RSS after the Taylor importance run: {taylor_rss:.0f} MB")
        others = [m for m in ("magnitude", "random") if m in results]
        beats = all(results["taylor"]["ppl"] < results[m]["ppl"] for m in others)
        print(f"taylor beats {', '.join(others)}: {'yes' if beats else 'NO'}")
        results["taylor"]["peak_rss_mb"] = round(taylor_rss, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
