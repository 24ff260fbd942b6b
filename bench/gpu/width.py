"""Curation's encode at a realistic width: a Llama-3.2-1B- or Llama-3.1-8B-shaped model on one GPU.

The model is built from its config on the GPU with seeded random weights (`bench.gpu.scale_models`), truncated
after its middle layer as the paper does (layer 8 of 16 for 1b, 16 of 32 for 8b: `core.models.TruncatedForward`
keeps blocks 0..L), and run through the curate stage's own encoder, `curation.encode.DocumentEncoder`: bf16
autocast, cuDNN's attention off, length-bucketed micro-batches, a Top-K SAE on every token (the jobs' default
width: 4 latents per coordinate, k 32) and rate pooling. Only the loading differs: the encoder is handed the
built model instead of reading a directory (`BuiltEncoder`). The weights are bf16 by default; `--weights
float32` keeps them in float32 under the same autocast, which is how the curate stage loads them.

For each micro-batch setting of `--sizes` (max_batch_tokens x max_batch_rows; the first is the encoder's
CPU-sized default) it times, over the same random documents (`--max-tokens` 256, the curate stage's cut):

- **encode**: `DocumentEncoder.encode`, everything the curate actor runs per batch: padding, the copy to the
  GPU, the truncated forward, the SAE, pooling and the vectors' copy back;
- **forward**: the bare truncated forward on the same micro-batches, already padded and on the GPU, under
  the encoder's autocast: no SAE, no pooling. encode's time less forward's is where the rest goes.

Per setting: tokens/s (real tokens, never padding), peak GPU memory (`torch.cuda.max_memory_allocated`),
achieved TFLOP/s and MFU against the GPU's dense bf16 peak (`bench.measure`: 2 FLOPs per weight of blocks
0..L, plus causal attention's two products, plus the SAE encoder's matrix for encode), and what 10^9 tokens
cost in GPU-hours. The best setting is held to the goal of 40% MFU on the 8b shape. A large bf16 matmul is
timed too, as the ceiling this GPU actually reaches.

Expected run time on one H100 (an estimate from the FLOP counts, not a measurement): 8b about 2 minutes
(400,000 tokens per setting), 1b about 1 minute (1.5M tokens), each with the model's build; tiny on a CPU a
few seconds. Needs CUDA for 1b and 8b (exit 2 without it).

    python -m bench.gpu.width --shape 8b --json runs/gpu-width-8b.json
    python -m bench.gpu.width --shape 1b --sizes 65536x1024,131072x2048 --weights float32
    python -m bench.gpu.width --shape tiny --device cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable

import torch

from bench.gpu.scale_models import (
    PAD_ID,
    SCALE_SHAPES,
    add_scale_flags,
    attention_flops,
    build_model,
    device_name,
    gib,
    gpu_hours_per_billion,
    matmul_tflops,
    parse_sizes,
    peak_gib,
    percent,
    random_documents,
    refusal,
    release,
    reset_peak,
    table,
)
from bench.measure import bench_parser, best_of_rounds, flops_per_token, mfu, peak_flops, publish
from core.batching import length_batches, pad_right
from core.models import TruncatedForward
from core.placement import resolve_device, resolve_dtype, shape_free_attention
from curation.encode import DocumentEncoder, EncoderSettings
from curation.sae.model import SAEConfig, TopKSAE

NAME = "gpu.width"
SIZES = "8192x64,65536x1024,131072x2048"
TOKENS = {"tiny": 2_000, "1b": 1_500_000, "8b": 400_000}
"""Document tokens encoded per setting: about 5 s of encode per setting at 40% MFU on an H100."""
GOAL = {"8b": 0.40}
"""MFU the best setting is held to, per shape."""
NORMALIZER_DOCS = 64


class BuiltEncoder(DocumentEncoder):
    """The curate stage's encoder over a model already built in memory.

    `DocumentEncoder.__init__` loads its model and tokenizer from `spec.model`; this one takes the built model
    and a padding id and sets up the same state, so `encode`, `hidden_batches` and `activations` run
    unchanged. `tests/test_gpu_scale.py` holds it to `DocumentEncoder` on the same weights."""

    def __init__(self, spec: EncoderSettings, model: torch.nn.Module, sae: TopKSAE | None, pad_id: int):
        self.spec = spec
        self.device = resolve_device(spec.device)
        self.tokenizer = None
        self.pad_id = pad_id
        self.dtype = resolve_dtype(spec.dtype, self.device)
        self.autocast = self.dtype == "bfloat16"
        shape_free_attention(self.device)
        self.forward = TruncatedForward(model, spec.layer)
        self.sae = sae.to(self.device).eval() if sae is not None else None
        self.coords = None
        self.weights = None


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser(NAME, __doc__)
    add_scale_flags(parser, list(SCALE_SHAPES), default="8b")
    parser.add_argument("--sizes", default=SIZES, help="micro-batch settings, max_batch_tokens x max_batch_rows")
    parser.add_argument("--tokens", type=int, default=None, help="document tokens per setting (default: by shape)")
    parser.add_argument("--max-tokens", type=int, default=256, help="longest document, in tokens")
    parser.add_argument("--weights", choices=["bfloat16", "float32"], default="bfloat16", help="the weights' dtype")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="the encoder's matmuls (EncoderSettings.dtype; float32 for a CPU without fast bf16)",
    )
    parser.add_argument("--expansion-factor", type=int, default=4, help="SAE latents per input coordinate")
    parser.add_argument("--k", type=int, default=32, help="SAE latents active per token")
    parser.add_argument("--rounds", type=int, default=1, help="timed passes per setting (the fastest counts)")
    return parser


def build_encoder(args: argparse.Namespace) -> tuple[BuiltEncoder, dict]:
    """The encoder over a model built on the device, and what it runs: layers, weights multiplied, SAE."""
    model = build_model(args.shape, args.device, getattr(torch, args.weights), args.seed)
    config = model.config
    layer = config.num_hidden_layers // 2
    linear = flops_per_token(model, layer + 1)  # counted before the blocks above `layer` are dropped
    sae_config = SAEConfig(d_in=config.hidden_size, expansion_factor=args.expansion_factor, k=args.k, layer=layer)
    sae = TopKSAE(sae_config, device=args.device, seed=args.seed)
    spec = EncoderSettings(model=f"random {args.shape}", sae_dir=None, layer=layer, device=args.device,
                           dtype=args.dtype)  # fmt: skip
    encoder = BuiltEncoder(spec, model, sae, PAD_ID)
    shape = {"layer": layer, "layers_run": layer + 1, "of_layers": config.num_hidden_layers,
             "linear_flops_per_token": linear, "sae_flops_per_token": 2 * sae_config.d_in * sae_config.num_latents,
             "sae": {"d_in": sae_config.d_in, "latents": sae_config.num_latents, "k": sae_config.k}}  # fmt: skip
    return encoder, shape


def dropping(unit: Callable[[], object]) -> Callable[[], None]:
    def call() -> None:
        unit()

    return call


def time_units(
    units: list[Callable[[], object]], warm_up: Callable[[], object], rounds: int, device: str
) -> tuple[float, float | None]:
    """(seconds: the sum of each unit's fastest round, peak GiB) after one call of `warm_up` (kernel choices,
    the allocator's pools). Each unit's output is dropped at once, so held results never count towards the peak."""
    quiet = [dropping(unit) for unit in units]
    warm_up()
    reset_peak(device)
    timings = best_of_rounds({"units": quiet}, rounds, device)
    return timings["units"].best(), peak_gib(device)


def forward_units(encoder: BuiltEncoder, docs: list[list[int]], groups: list[list[int]]) -> list[Callable]:
    """The bare truncated forward on each micro-batch, padded and on the device beforehand."""
    units = []
    for rows in groups:
        ids, mask = pad_right([docs[row] for row in rows], encoder.pad_id)
        ids, mask = ids.to(encoder.device), mask.to(encoder.device)
        shortest = min(len(docs[row]) for row in rows)

        def run(ids=ids, mask=mask, shortest=shortest) -> torch.Tensor:
            with encoder.matmul_precision(shortest):
                return encoder.forward(ids, mask)

        units.append(run)
    return units


def rates(seconds: float, tokens: int, flops: float, peak: float | None, memory: float | None) -> dict:
    tokens_per_s = tokens / seconds
    return {"seconds": seconds, "tokens_per_s": tokens_per_s, "tflops": tokens_per_s * flops / 1e12,
            "mfu": mfu(tokens_per_s, flops, peak), "peak_gib": memory,
            "gpu_hours_per_1e9_tokens": gpu_hours_per_billion(tokens_per_s)}  # fmt: skip


def measure_size(encoder: BuiltEncoder, docs: list[list[int]], size: tuple[int, int], flops: dict, args) -> dict:
    """Encode and the bare forward over `docs` with micro-batches of at most `size` (tokens, rows)."""
    max_tokens, max_rows = size
    encoder.spec = dataclasses.replace(encoder.spec, max_batch_tokens=max_tokens, max_batch_rows=max_rows)
    lengths = [len(doc) for doc in docs]
    groups = length_batches(lengths, max_tokens, max_rows)
    tokens, padded = sum(lengths), sum(len(rows) * max(lengths[row] for row in rows) for rows in groups)
    peak = peak_flops(args.device, args.peak_tflops)
    longest = [docs[row] for row in groups[0]]  # the first micro-batch holds the longest documents
    encode_s, encode_peak = time_units(
        [lambda: encoder.encode(docs)], lambda: encoder.encode(longest), args.rounds, args.device
    )
    forward = forward_units(encoder, docs, groups)
    forward_s, forward_peak = time_units(forward, forward[0], args.rounds, args.device)
    return {"max_batch_tokens": max_tokens, "max_batch_rows": max_rows, "micro_batches": len(groups),
            "padding_share": 1 - tokens / padded,
            "encode": rates(encode_s, tokens, flops["encode"], peak, encode_peak),
            "forward": rates(forward_s, tokens, flops["forward"], peak, forward_peak),
            "forward_share_of_encode": forward_s / encode_s}  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    """Every setting of `--sizes` on one shape: the figures `--json` writes."""
    sizes = parse_sizes(args.sizes)
    encoder, shape = build_encoder(args)
    vocab = SCALE_SHAPES[args.shape]["vocab_size"]
    docs = random_documents(vocab, args.tokens or TOKENS[args.shape], args.max_tokens, args.seed)
    encoder.sae.fit_normalizer(encoder.activations(docs[:NORMALIZER_DOCS]))
    lengths = [len(doc) for doc in docs]
    config = encoder.forward.base.config
    attention = attention_flops(config, lengths, shape["layers_run"]) / sum(lengths)
    forward = shape["linear_flops_per_token"] + attention
    flops = {"forward": forward, "encode": forward + shape["sae_flops_per_token"], "attention": attention}
    measured = [measure_size(encoder, docs, size, flops, args) for size in sizes]
    best = max(measured, key=lambda row: row["encode"]["tokens_per_s"])
    goal = GOAL.get(args.shape)
    met = None if goal is None or best["encode"]["mfu"] is None else best["encode"]["mfu"] >= goal
    results = {"shape": args.shape, "device": device_name(args.device), "weights": args.weights,
               "dtype": args.dtype, **shape,
               "docs": len(docs), "tokens": sum(lengths), "flops_per_token": flops,
               "peak_flops": peak_flops(args.device, args.peak_tflops), "matmul_tflops": matmul_tflops(args.device),
               "sizes": measured, "best": best, "goal_mfu": goal, "goal_met": met}  # fmt: skip
    del encoder
    release(args.device)
    return results


def size_label(row: dict) -> str:
    return f"{row['max_batch_tokens']:,} x {row['max_batch_rows']:,}"


def report(results: dict) -> list[str]:
    sae = results["sae"]
    lines = [f"encode at the {results['shape']} width on {results['device']}: blocks 0..{results['layer']} of "
             f"{results['of_layers']}, {results['weights']} weights, {results['dtype']} matmuls, "
             f"SAE {sae['d_in']:,} -> {sae['latents']:,} (k {sae['k']}), {results['docs']:,} documents, "
             f"{results['tokens']:,} tokens"]  # fmt: skip
    header = ["tokens x rows", "encode tok/s", "MFU", "peak GiB", "forward tok/s", "MFU", "peak GiB", "fwd share"]
    rows = [[size_label(row), f"{row['encode']['tokens_per_s']:,.0f}", percent(row["encode"]["mfu"]),
             gib(row["encode"]["peak_gib"]), f"{row['forward']['tokens_per_s']:,.0f}", percent(row["forward"]["mfu"]),
             gib(row["forward"]["peak_gib"]), percent(row["forward_share_of_encode"])]
            for row in results["sizes"]]  # fmt: skip
    lines += ["  " + line for line in table(header, rows)]
    lines.append(summary(results))
    if results["matmul_tflops"] is not None:
        lines.append(f"a bf16 8192^3 matmul here: {results['matmul_tflops']:.0f} TFLOP/s")
    return lines


def summary(results: dict) -> str:
    """One line: the best setting's encode rate, MFU, peak, cost, and the goal."""
    best = results["best"]["encode"]
    line = (f"width {results['shape']}: best {size_label(results['best'])}: {best['tokens_per_s']:,.0f} tokens/s, "
            f"MFU {percent(best['mfu'])}, peak {gib(best['peak_gib'])} GiB, 10^9 tokens in "
            f"{best['gpu_hours_per_1e9_tokens']:.2f} GPU-hours")  # fmt: skip
    if results["goal_mfu"] is not None:
        verdict = {True: "met", False: "not met", None: "no peak known"}[results["goal_met"]]
        line += f"; goal MFU >= {percent(results['goal_mfu'])}: {verdict}"
    return line


def ratios(results: dict) -> dict:
    best, first = results["best"], results["sizes"][0]
    return {f"{results['shape']}: encode MFU, best setting": best["encode"]["mfu"],
            f"{results['shape']}: forward MFU, same setting": best["forward"]["mfu"],
            f"{results['shape']}: forward / encode time": best["forward_share_of_encode"],
            f"{results['shape']}: best setting / {size_label(first)}":
                best["encode"]["tokens_per_s"] / first["encode"]["tokens_per_s"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        parse_sizes(args.sizes)
    except ValueError as error:
        parser.error(f"--sizes: {error}")
    if line := refusal(NAME, args.shape, args.device):
        print(line)
        return 2
    results = run(args)
    return publish(NAME, args, report(results), results, ratios(results))


if __name__ == "__main__":
    sys.exit(main())
