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
same encode in float32 at 65,536 tokens and 1,024 rows. It prints the three ratios. Needs a CUDA GPU
(exit 2 without one).

    python bench/gpu_encode.py --docs 4096
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from gpu_cores import timed  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--docs", type=int, default=4096, help="synthetic documents to encode")
    return parser.parse_args()


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
"""(max_batch_tokens, max_batch_rows) settings; the first is EncoderSpec's default."""


def encode_rate(encoder, docs: list[list[int]], max_tokens: int, max_rows: int) -> tuple[float, float]:
    """(tokens/s, peak GiB) of `encoder` over `docs` with micro-batches of this size, after a warm-up."""
    encoder.spec = dataclasses.replace(encoder.spec, max_batch_tokens=max_tokens, max_batch_rows=max_rows)
    encoder.encode(docs[:256])
    torch.cuda.reset_peak_memory_stats()
    seconds = timed(lambda: encoder.encode(docs), "cuda")[1]
    return sum(len(doc) for doc in docs) / seconds, torch.cuda.max_memory_allocated() / 2**30


def batch_sizes(setup, sae) -> list[str]:
    """Encode tokens/s and peak memory per micro-batch setting, cuDNN's attention off; then float32."""
    from gpu_cores import _encoder

    encoder = _encoder(setup, "cuda", torch.bfloat16, sae)
    rates, lines = [], []
    for max_tokens, max_rows in BATCHES:
        rate, peak = encode_rate(encoder, setup.docs, max_tokens, max_rows)
        rates.append(rate)
        lines.append(f"  {max_tokens:>7,} tokens, {max_rows:>5} rows: {rate:>12,.0f} tokens/s "
                     f"({rate / rates[0]:.2f}x the default), peak {peak:.2f} GiB")  # fmt: skip
    # The recommended micro-batches in float32 (TF32 off): what bf16 buys on this GPU.
    fp32, peak = encode_rate(_encoder(setup, "cuda", torch.float32, sae), setup.docs, *BATCHES[2])
    lines.append(f"  float32, {BATCHES[2][0]:,} tokens, {BATCHES[2][1]} rows: {fp32:,.0f} tokens/s, peak {peak:.2f} "
                 f"GiB; bf16 / float32 = {rates[2] / fp32:.2f}x")  # fmt: skip
    return lines


def measure(setup, sae, cudnn: bool) -> dict:
    from gpu_cores import _encoder

    encoder = _encoder(setup, "cuda", torch.bfloat16, sae)
    torch.backends.cuda.enable_cudnn_sdp(cudnn)  # after the load, which may set it
    encoder.encode(setup.docs[:8])  # warm-up: kernels, allocator
    seconds = timed(lambda: encoder.encode(setup.docs), "cuda")[1]
    first, repeat = sdpa_first_and_repeat(16, offset=0 if cudnn else 3)
    tokens = sum(len(doc) for doc in setup.docs)
    result = {"tokens_per_s": tokens / seconds, "seconds": seconds, "first": first, "repeat": repeat}
    return {**result, "operators": top_operators(encoder, setup.docs[-64:])}


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    from gpu_cores import SHAPES, Setup, build_model_dir, synthetic_corpus

    from curation.sae.model import SAEConfig, TopKSAE

    torch.backends.cuda.matmul.allow_tf32 = False
    with tempfile.TemporaryDirectory() as work:
        model_dir = build_model_dir(Path(work), "smollm2-135m")
        docs, topics = synthetic_corpus(SHAPES["smollm2-135m"]["vocab_size"], args.docs)
        setup = Setup(model_dir, 15, docs, topics, "cuda", torch.bfloat16)
        torch.manual_seed(0)
        sae = TopKSAE(SAEConfig(d_in=576, expansion_factor=4, k=32, layer=15))
        sae.fit_normalizer(torch.randn(4096, 576))
        settings = (("cuDNN allowed", True), ("cuDNN off", False))
        results = {label: measure(setup, sae, cudnn) for label, cudnn in settings}
        sizes = batch_sizes(setup, sae)
    tokens = sum(len(doc) for doc in docs)
    print(f"\nencode on {torch.cuda.get_device_name(0)}, bf16, {len(docs)} documents, {tokens:,} tokens:")
    for label, result in results.items():
        print(
            f"  {label:<14} {result['tokens_per_s']:>12,.0f} tokens/s ({result['seconds']:.2f} s); one SDPA at a "
            f"new length {1e3 * result['first']:.2f} ms, again {1e3 * result['repeat']:.2f} ms"
        )
        print("\n".join(result["operators"]))
    ratio = results["cuDNN off"]["tokens_per_s"] / results["cuDNN allowed"]["tokens_per_s"]
    print(f"cuDNN off / allowed: {ratio:.2f}x")
    print("micro-batch size (cuDNN off):")
    print("\n".join(sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
