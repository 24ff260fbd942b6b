"""What 4-bit rounding costs SmolLM2-135M: the embedded model against the same model rounded once more.

The embedded model is SmolLM2-135M-Instruct stored as a Q4_1 GGUF: every decoder weight was rounded to
one of 16 levels per block of 32 (the embedding is Q8_0). The float model is not available offline, so
the cost of that rounding cannot be measured directly. This script measures the cost of one *more*
rounding of the same kind, as an estimate of the first one's:

- **q4_1**: the embedded model, de-quantised (what every FineScope stage loads);
- **q4_1-again**: every decoder linear weight rounded again with Q4_1, on blocks shifted by 16 columns
  so that the new grid does not coincide with the old one (rounding on the old blocks is checked to
  change nothing).

Both go through the evaluation job (`run_evaluation`): MMLU on the fixed 500-question zero-shot sample,
with McNemar's test, and perplexity on held-out Wikipedia summaries of every topic, with bootstrap
intervals. From the job's per-question log-likelihoods it also prints a finer signal than accuracy, paired
on the same questions: the length-normalised log-likelihood of the right answer minus the mean of the
wrong ones.

    .venv/bin/python -m bench.quantisation_effect --work /tmp/quant
    .venv/bin/python -m bench.quantisation_effect --limit 200 --docs 100 --json /tmp/quant.json
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bench.measure import bench_parser, settings_of, write_json
from core.models import DEFAULT_MODEL, load_model, local_model_dir
from curation.demo_corpus import load_summaries
from training.evaluation import mmlu
from training.evaluation.evaluate import EvaluateConfig, run_evaluation

NAME = "quantisation_effect"
BLOCK = 32
LEVELS = 15  # Q4_1: 4-bit codes 0..15, a scale and a minimum per block


def round_q4_1(weight: torch.Tensor, shift: int) -> torch.Tensor:
    """Q4_1 round trip of an (out, in) weight on blocks of 32 along `in`, the blocks moved by `shift`."""
    rolled = weight.roll(-shift, dims=1)
    blocks = rolled.reshape(weight.shape[0], -1, BLOCK)
    low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    step = ((high - low) / LEVELS).clamp_min(torch.finfo(weight.dtype).tiny)
    rounded = ((blocks - low) / step).round().clamp(0, LEVELS) * step + low
    return rounded.reshape(weight.shape).roll(shift, dims=1)


def decoder_linears(model: torch.nn.Module):
    for layer in model.model.layers:
        yield from (module for module in layer.modules() if isinstance(module, torch.nn.Linear))


def round_decoder(model: torch.nn.Module, shift: int) -> float:
    """Round every decoder linear weight in place; returns the RMS of the change over the RMS of the
    weights, over all of them."""
    change, total = 0.0, 0.0
    with torch.no_grad():
        for module in decoder_linears(model):
            rounded = round_q4_1(module.weight, shift)
            change += float((rounded - module.weight).pow(2).sum())
            total += float(module.weight.pow(2).sum())
            module.weight.copy_(rounded)
    return (change / total) ** 0.5


def first_rounding_noise(model: torch.nn.Module) -> float:
    """The expected RMS of the GGUF's own rounding over the weights' RMS. In a Q4_1 block the smallest and
    largest de-quantised values are the block's minimum and minimum + 15 steps, so each block's step is
    known, and rounding to the nearest level leaves an error of step / sqrt(12) RMS."""
    noise, total = 0.0, 0.0
    for module in decoder_linears(model):
        blocks = module.weight.detach().reshape(module.weight.shape[0], -1, BLOCK)
        step = (blocks.amax(-1) - blocks.amin(-1)) / LEVELS
        noise += float((step.pow(2) / 12).sum()) * BLOCK
        total += float(module.weight.detach().pow(2).sum())
    return (noise / total) ** 0.5


def write_heldout(path: Path, n_docs: int, seed: int) -> None:
    rows = load_summaries()
    random.Random(seed).shuffle(rows)
    pq.write_table(pa.table({"text": [row["text"] for row in rows[:n_docs]]}), path)


def answer_margins(questions_path: Path, labels: list[str]) -> dict[str, np.ndarray]:
    """Per model, per question (zero-shot): the right answer's per-character log-likelihood minus the
    mean of the wrong ones'."""
    choices = {question.id: question.choices for question in mmlu.load_mmlu().questions}
    margins: dict[str, list[float]] = {label: [] for label in labels}
    with open(questions_path) as handle:
        for line in handle:
            row = json.loads(line)
            lengths = np.array([len(mmlu.continuation(choice)) for choice in choices[row["id"]]])
            for label in labels:
                normalised = np.asarray(row[f"{label}/0-shot"]) / lengths
                wrong = np.delete(normalised, row["answer"])
                margins[label].append(float(normalised[row["answer"]] - wrong.mean()))
    return {label: np.array(values) for label, values in margins.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser(NAME, __doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--work", default="/tmp/finescope-quantisation")
    parser.add_argument("--limit", type=int, default=500, help="MMLU questions of the fixed sample (seed 0)")
    parser.add_argument("--docs", type=int, default=200, help="held-out Wikipedia summaries for perplexity")
    return parser


def round_again(model_name: str, again: Path) -> dict[str, float]:
    """Save the embedded model rounded once more (shifted Q4_1 blocks) to `again`, with its tokenizer files;
    returns the RMS changes (the GGUF's own expected, on the original grid, on shifted blocks)."""
    source = Path(local_model_dir(model_name))
    model = load_model(model_name)
    first = first_rounding_noise(model)
    print(f"the GGUF's own rounding: expected change {first:.3f} x the weights' RMS")
    same_grid = round_decoder(model, shift=0)  # the GGUF's own grid: changes nothing (printed)
    print(f"rounding again on the original blocks: change {same_grid:.1e} x the weights' RMS (none)")
    noise = round_decoder(model, shift=BLOCK // 2)
    print(f"rounding again on shifted blocks: change {noise:.3f} x the weights' RMS")
    if again.exists():
        shutil.rmtree(again)
    model.save_pretrained(again)
    for name in source.iterdir():
        if name.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(name, again / name.name)
    return {"change_rms": noise, "first_rounding_rms": first, "same_grid_change_rms": same_grid}


def margin_difference(questions_path: Path) -> tuple[dict[str, np.ndarray], np.ndarray, float, float]:
    """Both models' answer margins, q4_1's minus q4_1-again's per question, and its 95% bootstrap interval."""
    margins = answer_margins(questions_path, ["q4_1", "q4_1-again"])
    difference = margins["q4_1"] - margins["q4_1-again"]
    rng = np.random.default_rng(0)
    boot = [difference[rng.integers(0, len(difference), len(difference))].mean() for _ in range(2000)]
    low, high = np.percentile(boot, [2.5, 97.5])
    return margins, difference, float(low), float(high)


def main() -> None:
    args = build_parser().parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    again = work / "q4_1-again"
    changes = round_again(args.model, again)
    documents = work / "heldout.parquet"
    write_heldout(documents, args.docs, seed=0)

    out = work / "eval"
    config = EvaluateConfig(
        models=[f"q4_1={local_model_dir(args.model)}", f"q4_1-again={again}"], out=str(out), mmlu=["all"],
        limit=args.limit, sample_seed=0, ppl=[str(documents)], ppl_name="wikipedia", force=True,
    )  # fmt: skip
    run_evaluation(config)
    margins, difference, low, high = margin_difference(out / "questions.jsonl")
    means = {label: f"{values.mean():+.4f}" for label, values in margins.items()}
    print(f"answer margin (nats/char): q4_1 {means['q4_1']}, q4_1-again {means['q4_1-again']}")
    print(f"  q4_1 minus q4_1-again: {difference.mean():+.4f}, 95% bootstrap [{low:+.4f}, {high:+.4f}]")
    print((out / "report.md").read_text())
    if args.json:
        figures = {**changes, "margin": {k: float(v.mean()) for k, v in margins.items()},
                   "margin_difference": [float(difference.mean()), low, high],
                   "results": json.loads((out / "results.json").read_text())}  # fmt: skip
        ratios = {
            "second rounding / the GGUF's own (RMS change)": changes["change_rms"] / changes["first_rounding_rms"]
        }
        write_json(args.json, NAME, settings_of(args), figures, ratios)


if __name__ == "__main__":
    main()
