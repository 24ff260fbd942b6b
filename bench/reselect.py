"""Selecting again from a curate output's stored codes (`jobs.select`) against curating again (`jobs.curate`).

A new selection size, rule, weighting or set of seeds used to mean a new curate run: the whole corpus read,
tokenized and encoded again. `jobs.select` reads the codes curate stored in `scored/` and encodes only the
seeds. On the same corpus, SAE and seeds this bench:

1. curates once with `--top-n` (the output selected from);
2. times, in turns (`bench.measure.best_of_rounds`, `--rounds` each), a new curate run with `--new-top-n`
   against `jobs.select` from step 1's output with `--new-top-n`;
3. checks that each selection equals the curate run with the same settings: the same curated (id, domain)
   rows and scores within 1e-6 (at `--top-n` and at `--new-top-n`);
4. measures what keeping the codes costs: the compressed bytes of `code_latents` and `code_values` in
   step 1's `scored/`, against the whole of it.

The corpus is the demo corpus's first `--docs` documents (shuffled as `make demo` writes them) and the
SAE is trained here on it with a small budget (`--sae-tokens`, one epoch): the timings do not depend on
the SAE's quality. `--quick` uses a tiny Llama and a synthetic two-topic corpus instead (seconds, for a
check that the bench runs). Everything is written under `--work`; a rerun reuses the corpus and the SAE.

    python -m bench.reselect                      # 300 demo documents, SmolLM2-135M (a few minutes)
    python -m bench.reselect --quick              # tiny model and corpus
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from bench.measure import bench_parser, best_of_rounds, settings_of, write_json
from core.models import DEFAULT_MODEL
from curation.demo_corpus import write_demo_corpus
from curation.encode import CODE_COLUMNS
from curation.sae.train import TrainSAEConfig, run_train_sae
from curation.selection.curate import CurateConfig, run_curation
from curation.selection.reselect import ReselectConfig, run_reselect

NAME = "reselect"
REPO = Path(__file__).resolve().parents[1]
DEMO_SEEDS = REPO / "jobs" / "seeds" / "demo.jsonl"
SCORE_TOLERANCE = 1e-6

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser(NAME, __doc__)
    parser.add_argument("--quick", action="store_true", help="the tiny model and a synthetic corpus")
    parser.add_argument("--docs", type=int, default=300, help="demo corpus documents")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--sae-tokens", type=int, default=40_000, help="SAE training tokens (one epoch)")
    parser.add_argument("--top-n", type=int, default=10, help="the first curation's per-seed top-N")
    parser.add_argument("--new-top-n", type=int, default=20, help="the size selected again")
    parser.add_argument("--rounds", type=int, default=1, help="timed runs of each method")
    parser.add_argument("--cpus", type=float, default=1.0, help="CPUs of the encode actor and of the seeds' task")
    parser.add_argument("--work", default="runs/bench-reselect")
    return parser


# The corpus, the seeds and the SAE ----------------------------------------------------------------------------


def tiny_model(directory: Path) -> str:
    """A tiny Llama with a word-level tokenizer over the words `w0` to `w399`."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (directory / "config.json").is_file():
        return str(directory)
    tokenizer = Tokenizer(tok_models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>", "</s>"])
    tokenizer.train_from_iterator([" ".join(f"w{i}" for i in range(400))], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    import torch

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=fast.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return str(directory)


def synthetic_corpus(directory: Path, docs: int) -> tuple[str, str]:
    """Two topics of words (`w0`-`w99`, `w100`-`w199`) over shared filler words; (corpus glob, seeds file)."""
    rng = random.Random(0)

    def text(topic: int, words: int) -> str:
        return " ".join(f"w{rng.randrange(100) + 100 * topic if rng.random() < 0.6 else 200 + rng.randrange(200)}"
                        for _ in range(words))  # fmt: skip

    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"text": text(index % 2, rng.randrange(8, 40)), "meta": {"topic": index % 2}} for index in range(docs)]
    (directory / "corpus.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    seeds = [{"domain": f"topic{topic}", "text": text(topic, 20)} for topic in (0, 1) for _ in range(3)]
    (directory / "seeds.jsonl").write_text("".join(json.dumps(seed) + "\n" for seed in seeds))
    return str(directory / "corpus.jsonl"), str(directory / "seeds.jsonl")


def setup(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The corpus, seeds, model and SAE every run shares (each written once; a rerun finds them)."""
    if args.quick:
        model = tiny_model(work / "tiny-model")
        corpus, seeds = synthetic_corpus(work / "corpus", args.docs)
        layer, sae = 2, {"expansion_factor": 4, "k": 8, "batch_tokens": 256}
    else:
        model, layer, sae = args.model, args.layer, {}
        write_demo_corpus(str(work / "corpus"), shards=2, limit=args.docs)
        corpus, seeds = str(work / "corpus" / "*.jsonl.gz"), str(DEMO_SEEDS)
    started = time.perf_counter()
    config = TrainSAEConfig(corpus=[corpus], out=str(work / "sae"), model=model, layer=layer, epochs=1,
                            max_train_tokens=args.sae_tokens, stats_docs=args.docs, cpus=args.cpus, **sae)  # fmt: skip
    run_train_sae(config)
    logger.info("SAE ready in %.0f s", time.perf_counter() - started)
    return {"corpus": corpus, "seeds": seeds, "sae": str(work / "sae")}


# The runs -----------------------------------------------------------------------------------------------------


def curate(shared: dict[str, Any], out: Path, top_n: int, cpus: float, force: bool = False) -> dict:
    return run_curation(CurateConfig(corpus=[shared["corpus"]], seeds=shared["seeds"], sae=shared["sae"],
                                     out=str(out), top_n=top_n, cpus=cpus, force=force))  # fmt: skip


def reselect(shared: dict[str, Any], source: Path, out: Path, top_n: int, cpus: float, force: bool = False) -> dict:
    return run_reselect(ReselectConfig(scored=str(source), seeds=shared["seeds"], out=str(out), top_n=top_n,
                                       cpus=cpus, force=force))  # fmt: skip


def curated_rows(out: Path) -> dict[tuple[str, str], float]:
    table = pq.read_table(out / "curated", columns=["id", "domain", "score"])
    ids, domains, scores = (table.column(name).to_pylist() for name in ("id", "domain", "score"))
    return {(doc, domain): score for doc, domain, score in zip(ids, domains, scores, strict=True)}


def equality(curated: Path, selected: Path) -> dict[str, Any]:
    """Whether `selected` holds the rows of `curated`, and how far apart their scores are."""
    expected, got = curated_rows(curated), curated_rows(selected)
    common = expected.keys() & got.keys()
    gap = max((abs(expected[key] - got[key]) for key in common), default=0.0)
    same = expected.keys() == got.keys() and gap <= SCORE_TOLERANCE
    return {"rows": len(expected), "same_rows": expected.keys() == got.keys(), "missing": len(expected.keys() - got),
            "extra": len(got.keys() - expected.keys()), "max_score_gap": gap, "equal": same}  # fmt: skip


def code_bytes(scored: Path) -> dict[str, Any]:
    """Compressed bytes of the stored codes in `scored`'s Parquet files, against all of its columns."""
    codes = total = rows = 0
    for path in sorted(scored.glob("*.parquet")):
        metadata = pq.ParquetFile(path).metadata
        rows += metadata.num_rows
        for group in range(metadata.num_row_groups):
            for column in range(metadata.num_columns):
                chunk = metadata.row_group(group).column(column)
                total += chunk.total_compressed_size
                codes += chunk.total_compressed_size if chunk.path_in_schema.split(".")[0] in CODE_COLUMNS else 0
    return {"documents": rows, "code_bytes": codes, "scored_bytes": total, "code_bytes_per_doc": codes / max(rows, 1),
            "code_share": codes / max(total, 1)}  # fmt: skip


def timed_runs(args: argparse.Namespace, shared: dict[str, Any], work: Path) -> dict[str, float]:
    """A fresh curate run at --new-top-n against a selection at --new-top-n from the first curation."""
    methods = {
        "curate": lambda: curate(shared, work / "curate-new", args.new_top_n, args.cpus, force=True),
        "select": lambda: reselect(shared, work / "curate", work / "select-new", args.new_top_n, args.cpus, force=True),
    }
    timings = best_of_rounds(methods, rounds=args.rounds, rotate=True)
    return {name: rounds.best() for name, rounds in timings.items()}


def main() -> None:
    args = build_parser().parse_args()
    if args.quick and args.docs == build_parser().get_default("docs"):
        args.docs = 200
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(args.work) / ("quick" if args.quick else f"demo{args.docs}")
    shared = setup(args, work)
    curate(shared, work / "curate", args.top_n, args.cpus)
    reselect(shared, work / "curate", work / "select-same", args.top_n, args.cpus, force=True)
    seconds = timed_runs(args, shared, work)
    same = equality(work / "curate", work / "select-same")
    new = equality(work / "curate-new", work / "select-new")
    size = code_bytes(work / "curate" / "scored")
    report(args, seconds, same, new, size)


def report(args: argparse.Namespace, seconds: dict[str, float], same: dict, new: dict, size: dict) -> None:
    speedup = seconds["curate"] / seconds["select"]
    print(
        f"\n{size['documents']} documents ({'tiny model, synthetic' if args.quick else args.model + ', demo corpus'})"
    )
    print(f"curate again at top-n {args.new_top_n}: {seconds['curate']:.1f} s; select again from the stored codes: "
          f"{seconds['select']:.1f} s ({speedup:.1f}x faster; best of {args.rounds})")  # fmt: skip
    for label, check in ((f"top-n {args.top_n}", same), (f"top-n {args.new_top_n}", new)):
        print(f"{label}: selection equals curate: {check['equal']} ({check['rows']} rows; {check['missing']} missing, "
              f"{check['extra']} extra; largest score gap {check['max_score_gap']:.2e})")  # fmt: skip
    print(f"stored codes: {size['code_bytes_per_doc']:.0f} bytes per document, {size['code_share']:.1%} of scored/ "
          f"({size['code_bytes']:,} of {size['scored_bytes']:,} bytes)")  # fmt: skip
    if args.json:
        results = {"seconds": seconds, "same_settings": same, "new_top_n": new, "stored_codes": size}
        write_json(args.json, NAME, settings_of(args), results, {"curate / select seconds": speedup})
    if not (same["equal"] and new["equal"]):
        raise SystemExit("a selection from the stored codes differs from the curate run with the same settings")


if __name__ == "__main__":
    main()
