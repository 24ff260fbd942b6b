"""Curation quality on real text: precision of the curated set against Wikipedia topics.

Runs the real pipeline (jobs' library functions, local Ray) on the packaged Wikipedia summaries with
SmolLM2 and the shipped seeds, then measures, per domain, the share of selected documents whose
`meta.topic` is the domain's topic (precision), against three baselines on the same documents:

- base rate: the topic's share of the corpus;
- random: the same number of documents drawn uniformly (mean over 200 draws);
- dense: the same rule on mean-pooled layer-L hidden states without the SAE (position 0 left out too,
  so the comparison is with an honest baseline, not a length-dominated one);
- SAE mean: the same SAE with its codes mean-pooled instead of pooled by firing rate.

    python bench/curation_quality.py --docs 2000 --layer 15 --top-n 10 --coords all
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from core.batching import tokenize_texts
from curation.demo_corpus import write_demo_corpus
from curation.encode import DocumentEncoder, EncoderSpec
from curation.sae.train import TrainSAEConfig, run_train_sae
from curation.seeds import load_seeds
from curation.selection.curate import CurateConfig, run_curation
from curation.selection.rules import SelectionSpec, block_candidates, merge_candidates

REPO = Path(__file__).resolve().parents[1]
SEEDS = REPO / "jobs" / "seeds" / "demo.jsonl"
TOPICS = {
    "mathematics": "Mathematics",
    "biology": "Biology and health sciences",
    "technology": "Technology",
    "history": "History",
}


def selection(scored: list[dict], args, seeds, sae_dir: str | None, pooling: str = "mean") -> dict[str, set[str]]:
    """The same rule on other document vectors over the same documents: no SAE (dense), or other pooling."""
    encoder = DocumentEncoder(EncoderSpec(model="smollm2-135m", sae_dir=sae_dir, layer=args.layer, pooling=pooling))
    seed_vectors = encoder.encode(tokenize_texts(encoder.tokenizer, seeds.texts, args.max_tokens))
    doc_vectors = encoder.encode(tokenize_texts(encoder.tokenizer, [r["text"] for r in scored], args.max_tokens))
    sims = (doc_vectors @ seed_vectors.T).numpy()
    spec = SelectionSpec(rule="per_seed_topn", seed_domains=seeds.domains, top_n=args.top_n)
    ids = np.asarray([r["id"] for r in scored], dtype=object)
    selected = merge_candidates(block_candidates(ids, ids, sims, spec), spec)
    by_domain: dict[str, set[str]] = {domain: set() for domain in spec.domains}
    for doc_id, (_, keys) in selected.items():
        for key in keys:
            by_domain[seeds.domains[key]].add(doc_id)
    return by_domain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=2000, help="Wikipedia summaries in the corpus (max 10,033)")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--top-n", type=int, default=10, help="documents per seed (per_seed_topn)")
    parser.add_argument("--sae-tokens", type=int, default=120_000)
    parser.add_argument("--coords", default="all", choices=["jacobian", "magnitude", "all"])
    parser.add_argument("--num-coords", type=int, default=96)
    parser.add_argument("--expansion-factor", type=int, default=4)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: the jobs' default)")
    parser.add_argument("--work", default="runs/quality")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = Path(args.work)
    write_demo_corpus(str(work / "corpus"), shards=8, limit=args.docs)
    corpus = [str(work / "corpus" / "*.jsonl.gz")]
    run_train_sae(TrainSAEConfig(corpus=corpus, out=str(work / "sae"), layer=args.layer, seeds=str(SEEDS),
                                 coords=args.coords, num_coords=args.num_coords, k=args.k,
                                 expansion_factor=args.expansion_factor, max_train_tokens=args.sae_tokens,
                                 max_tokens=args.max_tokens, torch_threads=args.threads))  # fmt: skip
    run_curation(CurateConfig(corpus=corpus, seeds=str(SEEDS), sae=str(work / "sae"), out=str(work / "curated"),
                              top_n=args.top_n, max_tokens=args.max_tokens, torch_threads=args.threads))  # fmt: skip
    scored = pq.read_table(work / "curated" / "scored", columns=["id", "text", "meta"]).to_pylist()
    topic_of = {row["id"]: json.loads(row["meta"])["topic"] for row in scored}
    curated = pq.read_table(work / "curated" / "curated", columns=["id", "domain"]).to_pylist()
    seeds = load_seeds(str(SEEDS))
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    dense = selection(scored, args, seeds, sae_dir=None)
    sae_mean = selection(scored, args, seeds, sae_dir=str(work / "sae"), pooling="mean")
    rng = random.Random(0)
    all_ids = list(topic_of)
    figures = {}
    print(f"\n{len(scored)} documents, layer {args.layer}, per-seed top-{args.top_n} union\n")
    print(
        "| domain | selected | base rate | random | dense (no SAE) | SAE, mean pooling | FineScope (SAE, rate) |\n"
        "|---|---:|---:|---:|---:|---:|---:|"
    )
    for domain, topic in TOPICS.items():
        ours = [row["id"] for row in curated if row["domain"] == domain]
        base = sum(t == topic for t in topic_of.values()) / len(topic_of)
        random_precision = np.mean(
            [np.mean([topic_of[i] == topic for i in rng.sample(all_ids, len(ours))]) for _ in range(200)]
        )
        dense_precision = np.mean([topic_of[i] == topic for i in dense[domain]])
        mean_precision = np.mean([topic_of[i] == topic for i in sae_mean[domain]])
        sae_precision = np.mean([topic_of[i] == topic for i in ours])
        figures[domain] = {"selected": len(ours), "base_rate": base, "random": float(random_precision),
                           "dense": float(dense_precision), "sae_mean": float(mean_precision),
                           "sae": float(sae_precision)}  # fmt: skip
        print(f"| {domain} | {len(ours)} | {base:.3f} | {random_precision:.3f} | {dense_precision:.3f} "
              f"| {mean_precision:.3f} | {sae_precision:.3f} |")  # fmt: skip
    keys = ("base_rate", "random", "dense", "sae_mean", "sae")
    mean = {key: float(np.mean([f[key] for f in figures.values()])) for key in keys}
    print(f"| mean | | {mean['base_rate']:.3f} | {mean['random']:.3f} | {mean['dense']:.3f} | {mean['sae_mean']:.3f} "
          f"| {mean['sae']:.3f} |")  # fmt: skip
    print(f"\nSAE / dense precision ratio: {mean['sae'] / max(mean['dense'], 1e-9):.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"domains": figures, "mean": mean, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
