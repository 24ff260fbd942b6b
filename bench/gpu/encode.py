"""Encode on a GPU: the attention kernels, when every batch has a new shape, and the micro-batch size.

Curation encodes micro-batches of documents grouped by length, so nearly every batch has a (batch, length)
shape the process has not seen; the teacher's prefills and decode steps likewise. With a padding mask,
torch's scaled_dot_product_attention may send such a call to cuDNN's attention, which builds an execution
plan for each new shape before it runs. FineScope switches cuDNN's attention off on CUDA
(`core.placement.shape_free_attention`). This bench measures what that buys, on the encode path the
curate stage runs (`curation.encode.DocumentEncoder`, bf16, a SmolLM2-135M-shaped model with seeded
random weights and a Top-K SAE), with cuDNN's SDPA allowed and then switched off:

- encode tokens/s over `--docs` synthetic documents of 24 to 160 tokens (many shapes);
- one SDPA call with a padding mask at 16 new lengths: the first call at each length against a second
  call at the same length;
- the operators that took the most GPU time in a profiled encode of 64 documents.

Then, with cuDNN's attention off, encode tokens/s and peak GPU memory for micro-batches of growing size
(`max_batch_tokens`, `max_batch_rows`), against the CPU-sized default (8,192 tokens, 64 rows), and the
same encode in float32 at 65,536 tokens and 1,024 rows. It prints the three ratios (and with `--json PATH`
writes them and every figure). Needs a CUDA GPU (exit 2 without one).

    python -m bench.gpu.encode --docs 4096
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import tempfile
from pathlib import Path

import torch

from bench.measure import bench_parser, cuda_peak_gib, reset_cuda_peak, settings_of, timed, write_json

NAME = "gpu.encode"


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser(NAME, __doc__)
    parser.add_argument("--docs", type=int, default=4096, help="synthetic documents to encode")
    return parser


def sdpa_first_and_repeat(lengths: int, offset: int) -> tuple[float, float]:
    """Mean seconds of the first and the second SDPA call at each of `lengths` lengths not seen before."""
    import torch.nn.functional as F

    first, repeat = [], []
    for length in range(300 + offset, 300 + offset + 7 * lengths, 7):
        q, k, v = (torch.randn(16, 9, length, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        mask = torch.ones(16, 1, length, length, device="cuda", dtype=torch.bool).tril()
        mask[:, :, :, length - 5 :] = False  # right padding
        mask[:, :, :, 0] = True
        call = functools.partial(F.scaled_dot_product_attention, q, k, v, attn_mask=mask)
        first.append(timed(call, "cuda")[1])
        repeat.append(timed(call, "cuda")[1])
    return sum(first) / len(first), sum(repeat) / len(repeat)


def top_operators(encoder, docs: list[list[int]], count: int = 6) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        encoder.encode(docs)
        torch.cuda.synchronize()
    events = sorted(profiler.key_averages(), key=lambda e: e.device_time_total, reverse=True)
    return [f"    {e.device_time_total / 1e3:9.1f} ms  {e.count:5d}x  {e.key[:90]}" for e in events[:count]]


BATCHES = [(8192, 64), (32768, 256), (65536, 1024), (131072, 2048)]
"""(max_batch_tokens, max_batch_rows) settings; the first is EncoderSettings's default."""


def encode_rate(encoder, docs: list[list[int]], max_tokens: int, max_rows: int) -> tuple[float, float]:
    """(tokens/s, peak GiB) of `encoder` over `docs` with micro-batches of this size, after a warm-up."""
    encoder.spec = dataclasses.replace(encoder.spec, max_batch_tokens=max_tokens, max_batch_rows=max_rows)
    encoder.encode(docs[:256])
    reset_cuda_peak()
    seconds = timed(lambda: encoder.encode(docs), "cuda")[1]
    return sum(len(doc) for doc in docs) / seconds, cuda_peak_gib()


def batch_sizes(setup, sae) -> dict:
    """Encode tokens/s and peak memory per micro-batch setting, cuDNN's attention off; then float32."""
    from bench.gpu.cores import build_encoder

    encoder = build_encoder(setup, "cuda", torch.bfloat16, sae)
    settings = []
    for max_tokens, max_rows in BATCHES:
        rate, peak = encode_rate(encoder, setup.docs, max_tokens, max_rows)
        settings.append({"max_batch_tokens": max_tokens, "max_batch_rows": max_rows, "tokens_per_s": rate,
                         "peak_gib": peak})  # fmt: skip
    # The recommended micro-batches in float32 (TF32 off): what bf16 buys on this GPU.
    fp32, peak = encode_rate(build_encoder(setup, "cuda", torch.float32, sae), setup.docs, *BATCHES[2])
    return {"bfloat16": settings, "float32": {"tokens_per_s": fp32, "peak_gib": peak}}


def batch_lines(sizes: dict) -> list[str]:
    rates = [row["tokens_per_s"] for row in sizes["bfloat16"]]
    lines = [f"  {row['max_batch_tokens']:>7,} tokens, {row['max_batch_rows']:>5} rows: {row['tokens_per_s']:>12,.0f} "
             f"tokens/s ({row['tokens_per_s'] / rates[0]:.2f}x the default), peak {row['peak_gib']:.2f} GiB"
             for row in sizes["bfloat16"]]  # fmt: skip
    fp32, peak = sizes["float32"]["tokens_per_s"], sizes["float32"]["peak_gib"]
    lines.append(f"  float32, {BATCHES[2][0]:,} tokens, {BATCHES[2][1]} rows: {fp32:,.0f} tokens/s, peak {peak:.2f} "
                 f"GiB; bf16 / float32 = {rates[2] / fp32:.2f}x")  # fmt: skip
    return lines


def measure(setup, sae, cudnn: bool) -> dict:
    from bench.gpu.cores import build_encoder

    encoder = build_encoder(setup, "cuda", torch.bfloat16, sae)
    torch.backends.cuda.enable_cudnn_sdp(cudnn)  # after the load, which may set it
    encoder.encode(setup.docs[:8])  # warm-up: kernels, allocator
    seconds = timed(lambda: encoder.encode(setup.docs), "cuda")[1]
    first, repeat = sdpa_first_and_repeat(16, offset=0 if cudnn else 3)
    tokens = sum(len(doc) for doc in setup.docs)
    result = {"tokens_per_s": tokens / seconds, "seconds": seconds, "first": first, "repeat": repeat}
    return {**result, "operators": top_operators(encoder, setup.docs[-64:])}


def run(docs: int) -> tuple[dict, dict, int]:
    """Both attention settings and the micro-batch sizes on a SmolLM2-shaped model: (per setting, sizes,
    tokens)."""
    from bench.gpu.cores import SHAPES, Setup, build_model_dir, synthetic_corpus
    from curation.sae.model import SAEConfig, TopKSAE

    torch.backends.cuda.matmul.allow_tf32 = False
    with tempfile.TemporaryDirectory() as work:
        model_dir = build_model_dir(Path(work), "smollm2-135m")
        corpus, topics = synthetic_corpus(SHAPES["smollm2-135m"]["vocab_size"], docs)
        setup = Setup(model_dir, 15, corpus, topics, "cuda", torch.bfloat16)
        torch.manual_seed(0)
        sae = TopKSAE(SAEConfig(d_in=576, expansion_factor=4, k=32, layer=15))
        sae.fit_normalizer(torch.randn(4096, 576))
        settings = (("cuDNN allowed", True), ("cuDNN off", False))
        results = {label: measure(setup, sae, cudnn) for label, cudnn in settings}
        sizes = batch_sizes(setup, sae)
    return results, sizes, sum(len(doc) for doc in corpus)


def main() -> int:
    args = build_parser().parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    results, sizes, tokens = run(args.docs)
    print(f"\nencode on {torch.cuda.get_device_name(0)}, bf16, {args.docs} documents, {tokens:,} tokens:")
    for label, result in results.items():
        print(
            f"  {label:<14} {result['tokens_per_s']:>12,.0f} tokens/s ({result['seconds']:.2f} s); one SDPA at a "
            f"new length {1e3 * result['first']:.2f} ms, again {1e3 * result['repeat']:.2f} ms"
        )
        print("\n".join(result["operators"]))
    ratio = results["cuDNN off"]["tokens_per_s"] / results["cuDNN allowed"]["tokens_per_s"]
    print(f"cuDNN off / allowed: {ratio:.2f}x")
    print("micro-batch size (cuDNN off):")
    print("\n".join(batch_lines(sizes)))
    if args.json:
        rates = [row["tokens_per_s"] for row in sizes["bfloat16"]]
        ratios = {"cuDNN off / allowed": ratio, "65,536 tokens, 1,024 rows / the default": rates[2] / rates[0],
                  "bfloat16 / float32": rates[2] / sizes["float32"]["tokens_per_s"]}  # fmt: skip
        figures = {"tokens": tokens, "attention": results, "batches": sizes}
        write_json(args.json, NAME, settings_of(args), figures, ratios)
    return 0


if __name__ == "__main__":
    sys.exit(main())
