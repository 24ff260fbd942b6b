"""Pruning at the paper's scale: the Taylor importance pass and the slice to 30% of an 8B-shaped model on one GPU.

The model is built from Llama-3.1-8B's config (or Llama-3.2-1B's, `--shape 1b`) on the GPU, in bf16, with
seeded random weights (`bench.gpu.scale_models`). Then the prune stage's own code runs on it, as its task does
after loading (`training.pruning.prune`, `_prune_and_save`):

- **importance**: `training.pruning.importance.taylor_importance`, activation checkpointing on (`--checkpointing`,
  the prune stage's flag for big models), over `--batches` batches of `--batch-size` x `--seq` random token ids
  (4 of 4 x 512 by default, the sizes docs/pruning.md's estimate assumed);
- **allocation**: `training.pruning.prune.allocate` to `--ratio` of the total parameters (0.30), MLP sizes in
  multiples of 64;
- **slice**: `training.pruning.structures.slice_structures`, checked against the allocation's parameter count.

It reports each part's time and peak GPU memory (`torch.cuda.max_memory_allocated`, reset before each part),
the weights' own size, and the ratio the allocation achieved (of all parameters, and of the decoder's).
docs/pruning.md estimated about 20 GB for the 8b importance pass; this is the measurement that replaces it.

Expected run time on one H100 (an estimate, not a measurement): 8b under a minute, 1b under 30 s, with the
model's build; tiny on a CPU a few seconds. Needs CUDA for 1b and 8b (exit 2 without it).

    python -m bench.gpu.prune_scale --shape 8b --json runs/gpu-prune-8b.json
    python -m bench.gpu.prune_scale --shape 1b --batches 8
    python -m bench.gpu.prune_scale --shape tiny --device cpu --seq 64
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench.gpu.scale_models import (
    FIRST_WORD,
    SCALE_SHAPES,
    add_scale_flags,
    build_model,
    device_name,
    gib,
    peak_gib,
    percent,
    refusal,
    release,
    reset_peak,
    table,
    weight_gib,
)
from bench.measure import bench_parser, publish, timed
from training.pruning.importance import Importance, taylor_importance
from training.pruning.prune import Allocation, allocate
from training.pruning.structures import Layout, count_params, layout_of, slice_structures

NAME = "gpu.prune_scale"


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser(NAME, __doc__)
    add_scale_flags(parser, list(SCALE_SHAPES), default="8b")
    parser.add_argument("--batches", type=int, default=4, help="importance batches")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--ratio", type=float, default=0.30, help="share of all parameters to remove")
    parser.add_argument("--channel-multiple", type=int, default=64, help="MLP sizes are multiples of this")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="the weights' dtype")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="activation checkpointing in the importance backward")  # fmt: skip
    return parser


def random_batches(vocab: int, args: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`--batches` (ids, mask) pairs of random words, no padding, on the CPU (the pass moves them)."""
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.batch_size, args.seq)
    return [(torch.randint(FIRST_WORD, vocab, shape, generator=generator), torch.ones(shape, dtype=torch.long))
            for _ in range(args.batches)]  # fmt: skip


def part(seconds: float, device: str, **figures) -> dict:
    return {"seconds": seconds, "peak_gib": peak_gib(device), **figures}


def importance_pass(model, layout: Layout, args: argparse.Namespace) -> tuple[Importance, dict]:
    batches = random_batches(layout.vocab_size, args)
    reset_peak(args.device)
    importance, seconds = timed(lambda: taylor_importance(model, layout, batches, args.checkpointing), args.device)
    figures = part(seconds, args.device, batches=importance.batches, tokens=importance.tokens,
                   tokens_per_s=importance.tokens / seconds)  # fmt: skip
    return importance, figures


def slice_pass(model, allocation: Allocation, args: argparse.Namespace) -> dict:
    reset_peak(args.device)
    _, seconds = timed(lambda: slice_structures(model, allocation.keep_groups, allocation.keep_channels), args.device)
    if (after := count_params(model)) != allocation.params_after:
        expected = allocation.params_after
        raise RuntimeError(f"the sliced model has {after:,} parameters, not the allocation's {expected:,}")
    return part(seconds, args.device)


def run(args: argparse.Namespace) -> dict:
    """Build, score, allocate, slice: the figures `--json` writes."""
    model = build_model(args.shape, args.device, getattr(torch, args.dtype), args.seed)
    layout = layout_of(model.config)
    if (found := count_params(model)) != layout.full_params():  # as the prune stage checks a loaded model
        raise RuntimeError(f"the model holds {found:,} parameters where its layout counts {layout.full_params():,}")
    weights = weight_gib(model)
    importance, scoring = importance_pass(model, layout, args)
    allocation, allocating = timed(
        lambda: allocate(importance, layout, args.ratio, channel_multiple=args.channel_multiple)
    )
    slicing = slice_pass(model, allocation, args)
    kept = {"groups": len(allocation.keep_groups[0]), "of_groups": layout.num_kv_heads,
            "channels": len(allocation.keep_channels[0]), "of_channels": layout.intermediate_size}  # fmt: skip
    results = {"shape": args.shape, "device": device_name(args.device), "dtype": args.dtype,
               "checkpointing": args.checkpointing, "weights_gib": weights,
               "params_before": allocation.params_before, "params_after": allocation.params_after,
               "target_ratio": args.ratio, "achieved_ratio": allocation.ratio,
               "decoder_ratio": allocation.decoder_ratio, "kept_per_layer": kept,
               "importance": scoring, "allocation": {"seconds": allocating}, "slice": slicing}  # fmt: skip
    del model
    release(args.device)
    return results


def report(results: dict) -> list[str]:
    kept = results["kept_per_layer"]
    lines = [f"pruning the {results['shape']} shape on {results['device']}: {results['params_before']:,} parameters, "
             f"{results['dtype']} weights {gib(results['weights_gib'])} GiB, checkpointing "
             f"{'on' if results['checkpointing'] else 'off'}"]  # fmt: skip
    scoring = results["importance"]
    rows = [["importance", f"{scoring['seconds']:.2f}", gib(scoring["peak_gib"]),
             f"{scoring['batches']} batches, {scoring['tokens']:,} tokens, {scoring['tokens_per_s']:,.0f} tokens/s"],
            ["allocation", f"{results['allocation']['seconds']:.2f}", "n/a",
             f"keeps {kept['groups']} of {kept['of_groups']} KV groups, {kept['channels']:,} of "
             f"{kept['of_channels']:,} MLP channels per layer"],
            ["slice", f"{results['slice']['seconds']:.2f}", gib(results["slice"]["peak_gib"]),
             f"{results['params_after']:,} parameters left"]]  # fmt: skip
    lines += ["  " + line for line in table(["part", "seconds", "peak GiB", ""], rows)]
    lines.append(summary(results))
    return lines


def summary(results: dict) -> str:
    """One line: each part's time and peak, and the achieved ratio."""
    scoring, slicing = results["importance"], results["slice"]
    return (f"prune {results['shape']}: importance {scoring['seconds']:.1f} s, peak {gib(scoring['peak_gib'])} GiB; "
            f"slice {slicing['seconds']:.1f} s, peak {gib(slicing['peak_gib'])} GiB; removed "
            f"{percent(results['achieved_ratio'])} of all parameters ({percent(results['decoder_ratio'])} of the "
            f"decoder's) for a target of {percent(results['target_ratio'])}")  # fmt: skip


def ratios(results: dict) -> dict:
    shape, scoring = results["shape"], results["importance"]
    peak = None if scoring["peak_gib"] is None else scoring["peak_gib"] / results["weights_gib"]
    return {f"{shape}: achieved / target ratio": results["achieved_ratio"] / results["target_ratio"],
            f"{shape}: importance peak / weights": peak}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if line := refusal(NAME, args.shape, args.device):
        print(line)
        return 2
    results = run(args)
    return publish(NAME, args, report(results), results, ratios(results))


if __name__ == "__main__":
    sys.exit(main())
