"""How curation's cost grows with the corpus, and SAE training's with its token budget.

Curation: `jobs.curate` over the first 1,000, 2,500, 5,000 and all 10,033 documents of the packaged
corpus (each size a prefix of the next, 8 shards each), with the same SAE and seeds, each run in a fresh
process on a fresh local Ray. Per size it prints the wall time, the encode stage's tokens/s (tokens over
the stage's own time, from the manifest), the driver's peak RSS and the encode actors' peak RSS and peak
USS, sampled every 0.2 s over the driver's process tree (`bench.measure.TreeMonitor`; a peak RSS is the
kernel's high-water mark of the process, `VmHWM`). RSS counts the pages of Ray's shared-memory object
store an actor has mapped (blocks passing through it); USS counts only the pages the process alone holds,
so a USS that stays flat while RSS grows is the object store, not the actor. Goals: tokens/s flat within 15%
from 2,500 documents up, driver and worker peak memory flat within 10% (nothing is collected to the driver;
actors stream).

SAE training: `jobs.train_sae` with budgets of 100k, 200k and 400k tokens on the whole corpus: wall
time, training tokens/s (tokens trained over the train stage's own time, from the manifest), and that
time's two parts: the wait for the first SAE step (the trainer task's and the activation stream's start,
then the normaliser's sample) and the steady rate from the first step on; the driver's, the trainer
task's and the activation actor's peak RSS, the activation actor's peak USS, and the trainer's peak
anonymous RSS (RSS less file-backed pages). With `--epochs` above 1 the trainer replays the drawn
activations from a file on local disk (budget x coordinates x 4 bytes) whose pages the kernel may keep
resident as page cache: they count in RSS, not in anonymous memory, which is the trainer's own.
Goals, from the second budget up: training tokens/s flat within 15% (the steady rate too, the start
apart), driver, trainer (anonymous) and activation actor memory (USS: its RSS also counts the
object-store pages its output passed through) flat within 10%.

With `--json PATH` the ratios are each goal's largest relative distance from its reference row.

    python -m bench.curation_scaling
    python -m bench.curation_scaling --sizes 1000 2500 --budgets 50000 100000   # a quick look
    python -m bench.curation_scaling --sizes --budgets 100000 200000 400000      # SAE training only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.measure import TreeMonitor, bench_parser, settings_of, write_json
from curation.demo_corpus import write_demo_corpus

NAME = "curation_scaling"
REPO = Path(__file__).resolve().parents[1]
SEEDS = REPO / "jobs" / "seeds" / "demo.jsonl"
TARGET_RATE = 0.15  # tokens/s within 15% of the 2,500-document run's
TARGET_RSS = 0.10


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser(NAME, __doc__)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 2500, 5000, 10033], help="none: no curation")
    parser.add_argument("--budget-docs", type=int, default=10033, help="corpus documents for the SAE budgets")
    parser.add_argument("--budgets", type=int, nargs="*", default=[100_000, 200_000, 400_000])
    parser.add_argument("--epochs", type=int, default=4, help="SAE training epochs (the jobs' default)")
    parser.add_argument("--work", default="runs/scaling")
    return parser


VERDICT = {True: "PASS", False: "MISS"}


def print_table(columns: list[tuple[str, str, str]], rows: list[dict]) -> None:
    """A markdown table: one (header, key, format spec) per column, one line per row."""
    print("\n| " + " | ".join(header for header, _, _ in columns) + " |")
    print("|" + "---:|" * len(columns))
    for r in rows:
        print("| " + " | ".join(format(r[key], spec) for _, key, spec in columns) + " |")


def print_flatness(
    heading: str, rows: list[dict], reference: dict, checks: list[tuple[str, str, float]]
) -> dict[str, float]:
    """Per (label, key, target): the largest relative distance of `key` from the reference row's, over `rows`;
    printed, and returned by `heading: label`."""
    parts, distances = [], {}
    for label, key, target in checks:
        value = max(abs(r[key] / max(reference[key], 1e-9) - 1) for r in rows)
        parts.append(f"{label} within {value:.1%} (target {target:.0%}) {VERDICT[value <= target]}")
        distances[f"{heading}: {label}"] = value
    print(f"\n{heading}: " + "; ".join(parts))
    return distances


def report_curation(curation: list[dict]) -> dict[str, float]:
    print_table([("documents", "docs", ","), ("tokens", "tokens", ","), ("wall s", "wall_s", ".0f"),
                 ("encode s", "encode_s", ".0f"), ("encode tokens/s", "tokens_per_s", ".0f"),
                 ("driver peak MB", "driver_mb", ".0f"), ("encode actor peak RSS MB", "encoder_mb", ".0f"),
                 ("encode actor peak USS MB", "encoder_uss_mb", ".0f")], curation)  # fmt: skip
    reference = next((r for r in curation if r["docs"] >= 2500), curation[0])
    upper = [r for r in curation if r["docs"] >= reference["docs"]]
    return print_flatness(f"from {reference['docs']:,} documents up", upper, reference,
                   [("tokens/s", "tokens_per_s", TARGET_RATE), ("driver peak RSS", "driver_mb", TARGET_RSS),
                    ("encode actor peak RSS", "encoder_mb", TARGET_RSS),
                    ("encode actor peak USS", "encoder_uss_mb", TARGET_RSS)])  # fmt: skip


def report_training(training: list[dict]) -> dict[str, float]:
    """The budgets' table, and flatness from the second budget up (the first carries the start-up most)."""
    print_table([("token budget", "budget", ","), ("tokens trained (x epochs)", "tokens", ","),
                 ("wall s", "wall_s", ".0f"), ("train s", "train_s", ".0f"), ("train tokens/s", "tokens_per_s", ".0f"),
                 ("first step s", "first_step_s", ".0f"), ("steady tokens/s", "loop_tokens_per_s", ".0f"),
                 ("driver peak MB", "driver_mb", ".0f"), ("trainer peak RSS MB", "trainer_mb", ".0f"),
                 ("trainer peak anonymous MB", "trainer_anon_mb", ".0f"),
                 ("activation actor peak RSS MB", "activations_mb", ".0f"),
                 ("activation actor peak USS MB", "activations_uss_mb", ".0f")], training)  # fmt: skip
    reference = training[1] if len(training) > 1 else training[0]
    return print_flatness(f"from a budget of {reference['budget']:,} tokens up", training[training.index(reference) :],
                   reference, [("train tokens/s", "tokens_per_s", TARGET_RATE),
                               ("steady tokens/s", "loop_tokens_per_s", TARGET_RATE),
                               ("driver peak RSS", "driver_mb", TARGET_RSS),
                               ("trainer peak anonymous RSS", "trainer_anon_mb", TARGET_RSS),
                               ("activation actor peak RSS", "activations_mb", TARGET_RSS),
                               ("activation actor peak USS", "activations_uss_mb", TARGET_RSS)])  # fmt: skip


def run_job(args: list[str], env: dict[str, str]) -> tuple[float, TreeMonitor]:
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    monitor = TreeMonitor(proc.pid)
    _, stderr = proc.communicate()
    monitor.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{args[0]} failed:\n{stderr[-3000:]}")
    return time.perf_counter() - started, monitor


def job_environment() -> dict[str, str]:
    """Each job starts a fresh local Ray of its own, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_ADDRESS": "local"}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    return env


def measure_curation(sizes: list[int], corpora: dict[int, Path], work: Path, env: dict[str, str]) -> list[dict]:
    """`jobs.curate` over each corpus size with one SAE (trained as the demo trains it, on the smallest)."""
    sae = work / "sae"
    if sizes and not (sae / "manifest.json").is_file():
        run_job(["jobs.train_sae", "--corpus", f"{corpora[min(sizes)]}/*.jsonl.gz", "--seeds", str(SEEDS),
                 "--out", str(sae), "--expansion-factor", "4", "--max-train-tokens", "60000"], env)  # fmt: skip
    curation = []
    for n in sizes:
        out = work / f"curated-{n}"
        wall, monitor = run_job(["jobs.curate", "--corpus", f"{corpora[n]}/*.jsonl.gz", "--seeds", str(SEEDS),
                                 "--sae", str(sae), "--out", str(out), "--top-n", "10", "--force"], env)  # fmt: skip
        manifest = json.loads((out / "manifest.json").read_text())
        tokens, encode_s = manifest["counts"]["tokens"], manifest["timings_s"]["encode"]
        row = {"docs": manifest["counts"]["documents"], "tokens": tokens, "wall_s": wall, "encode_s": encode_s,
               "tokens_per_s": tokens / encode_s, "driver_mb": monitor.peak(),
               "encoder_mb": monitor.peak("EncodeDocuments"), "encoder_uss_mb": monitor.peak("EncodeDocuments", True),
               "reader_mb": monitor.peak("ReadJSONL")}  # fmt: skip
        curation.append(row)
        print(f"curated {n} documents: {wall:.0f} s, {row['tokens_per_s']:.0f} tokens/s", flush=True)
    return curation


def measure_training(budgets: list[int], corpus: Path, epochs: int, work: Path, env: dict[str, str]) -> list[dict]:
    """`jobs.train_sae` on the whole corpus at each token budget."""
    training = []
    for budget in budgets:
        out = work / f"sae-{budget}"
        wall, monitor = run_job(["jobs.train_sae", "--corpus", f"{corpus}/*.jsonl.gz", "--seeds", str(SEEDS),
                                 "--out", str(out), "--expansion-factor", "4", "--max-train-tokens", str(budget),
                                 "--epochs", str(epochs), "--stats-docs", "0", "--force"], env)  # fmt: skip
        manifest = json.loads((out / "manifest.json").read_text())
        training.append({"budget": budget, "tokens": manifest["counts"]["tokens"], "wall_s": wall,
                         "train_s": manifest["timings_s"]["train"],
                         "tokens_per_s": manifest["counts"]["tokens"] / manifest["timings_s"]["train"],
                         "loop_tokens_per_s": manifest["counts"]["tokens_per_s"],
                         "first_step_s": manifest["counts"]["first_step_s"],
                         "driver_mb": monitor.peak(), "trainer_mb": monitor.peak("_train_and_save"),
                         "trainer_anon_mb": monitor.peak("_train_and_save", anon=True),
                         "activations_mb": monitor.peak("TokenActivations"),
                         "activations_uss_mb": monitor.peak("TokenActivations", uss=True)})  # fmt: skip
        print(f"trained on {budget} tokens: {wall:.0f} s", flush=True)
    return training


def main() -> None:
    args = build_parser().parse_args()
    work = Path(args.work).resolve()
    env = job_environment()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
    corpora = {n: work / f"corpus-{n}" for n in sorted({*args.sizes, args.budget_docs})}
    for n, path in corpora.items():
        write_demo_corpus(str(path), shards=8, limit=n)
    curation = measure_curation(args.sizes, corpora, work, env)
    training = measure_training(args.budgets, corpora[args.budget_docs], args.epochs, work, env)
    distances: dict[str, float] = {}
    if curation:
        distances |= report_curation(curation)
    if training:
        distances |= report_training(training)
    if args.json:
        write_json(args.json, NAME, settings_of(args), {"curation": curation, "training": training}, distances)


if __name__ == "__main__":
    main()
