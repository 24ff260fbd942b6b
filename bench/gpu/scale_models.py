"""What the measurements at the paper's scale share: the Llama shapes, models built on the device, the attention
FLOPs, random documents, the flags and the refusal without CUDA.

`python -m bench.gpu.width`, `bench.gpu.prune_scale` and `bench.gpu.train_scale` build random-weight Llama
models of Llama-3.2-1B's and Llama-3.1-8B's shapes (and a tiny one for the CPU tests) directly on the device,
seeded, so nothing is downloaded and no full-precision copy of an 8B model is ever made on the host. Random
weights measure speed and memory as trained ones do: the same matrices run, whatever their values.

FLOPs: a forward multiplies each weight once per token (`bench.measure.flops_per_token`, 2 FLOPs a weight),
and attention adds its two matrix products (scores Q K^T and the weighted sum over V), which grow with the
context: `attention_flops`. MFU is `bench.measure.mfu` over both.

Imports no Ray, DeepSpeed or vLLM.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Sequence
from typing import Any

import torch

from bench.measure import cuda_peak_gib, reset_cuda_peak, timed

PAD_ID, BOS_ID, EOS_ID = 1, 2, 3
"""Special ids of the shapes' configs, as `bench.gpu.cores.word_tokenizer` numbers them; ids 4 and up are words."""
FIRST_WORD = 4

SCALE_SHAPES: dict[str, dict[str, Any]] = {
    # For the CPU tests: every code path at a size that runs in seconds.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # Llama-3.2-1B's config: 1.24B parameters, the 128k embedding tied to the LM head.
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
    # Llama-3.1-8B's config: 8.03B parameters, embedding and LM head separate.
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0),
}  # fmt: skip
CUDA_ONLY = ("1b", "8b")
"""Shapes that run on CUDA only: on a CPU they would take hours and, for 8b, more memory than a host has."""


def llama_config(shape: str):
    """The LlamaConfig of a shape (no RoPE scaling: it changes the rotary frequencies, not the work)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        **SCALE_SHAPES[shape], max_position_embeddings=8192, rms_norm_eps=1e-5,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )  # fmt: skip


def build_model(shape: str, device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A causal LM of `shape` with seeded random weights, created on `device` in `dtype` (eval mode).

    The parameters are allocated and initialised on the device itself, so an 8B model in bf16 takes its 16 GB
    there and never passes through the host. cuDNN's attention is switched off for the process, as every stage
    does when it loads a model on CUDA (`core.placement.shape_free_attention`)."""
    from transformers import AutoModelForCausalLM

    from core.placement import shape_free_attention

    torch.manual_seed(seed)  # seeds the CUDA generators too
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(shape), dtype=dtype)
    shape_free_attention(device)
    return model.eval()


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def attention_flops(config, lengths: Sequence[int], layers: int, training: bool = False) -> float:
    """FLOPs of causal attention's two matrix products over documents of these lengths, in `layers` blocks.

    A token at position t attends to the t + 1 positions up to itself: 2 FLOPs per query width for each of
    them in Q K^T and again in the sum over V, so 4 x heads x head_dim x (t + 1) per layer. Padding and the
    masked upper triangle are not counted (they are work the kernel may do, not work the model needs). A
    training step is 3 forwards, as for the weights."""
    width = config.num_attention_heads * head_dim(config)
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    return (3 if training else 1) * 4 * width * layers * pairs


def random_documents(vocab: int, tokens: int, max_tokens: int, seed: int = 0, shortest: int = 32) -> list[list[int]]:
    """Documents of random word ids, `shortest` to `max_tokens` long (uniformly), about `tokens` in all."""
    generator = torch.Generator().manual_seed(seed)
    docs, total = [], 0
    while total < tokens:
        length = int(torch.randint(shortest, max_tokens + 1, (1,), generator=generator))
        docs.append(torch.randint(FIRST_WORD, vocab, (length,), generator=generator).tolist())
        total += length
    return docs


def add_scale_flags(parser: argparse.ArgumentParser, shapes: Sequence[str], default: str) -> None:
    """--shape, --device, --seed and --peak-tflops, the same on every script."""
    parser.add_argument("--shape", choices=list(shapes), default=default, help="model shape (tiny: the CPU tests)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for --shape tiny")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and data")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: by GPU name)")


def refusal(name: str, shape: str, device: str) -> str | None:
    """The one line a script prints (and exits 2 with) when it cannot run `shape` on `device`, or None."""
    cuda = device.startswith("cuda")
    if shape in CUDA_ONLY and not cuda:
        return f"python -m bench.{name}: --shape {shape} runs on CUDA only; --shape tiny --device cpu runs on a CPU"
    if cuda and not torch.cuda.is_available():
        return (f"python -m bench.{name}: --shape {shape} needs a CUDA GPU and none is visible here; "
                "--shape tiny --device cpu runs on a CPU")  # fmt: skip
    return None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        reset_cuda_peak(device)


def peak_gib(device: str) -> float | None:
    """GPU memory held at most since `reset_peak` (None on a CPU, where the figure would be the process's)."""
    return cuda_peak_gib(device) if device.startswith("cuda") else None


def release(device: str) -> None:
    """Hand the memory of models that went out of scope back, before the next measurement's peak is read."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def weight_gib(model: torch.nn.Module) -> float:
    """GiB of the model's parameters (a tied embedding once)."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() * p.element_size() for p in unique) / 1024**3


def gpu_hours_per_billion(tokens_per_s: float) -> float:
    """GPU-hours that 10^9 tokens take at this rate, on one GPU."""
    return 1e9 / tokens_per_s / 3600


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'8192x64,65536x1024' -> [(8192, 64), (65536, 1024)]; ValueError naming the bad entry."""
    sizes = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        first, sep, second = entry.partition("x")
        if not (sep and first.isdigit() and second.isdigit() and int(first) > 0 and int(second) > 0):
            raise ValueError(f"{entry!r} is not two positive integers joined by x (e.g. 65536x1024)")
        sizes.append((int(first), int(second)))
    if not sizes:
        raise ValueError("no sizes given")
    return sizes


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Right-aligned columns under `header`, the first column left-aligned."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [str(cell).rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        return "  ".join([str(row[0]).ljust(widths[0]), *cells])

    return [line(header), *(line(row) for row in rows)]


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU, {torch.get_num_threads()} threads"


def matmul_tflops(device: str, size: int = 8192, repeats: int = 20) -> float | None:
    """TFLOP/s of a large bf16 matrix product on this GPU: the ceiling any model's matmuls can reach here, beside
    the datasheet peak MFU is quoted against. None on a CPU."""
    if not device.startswith("cuda"):
        return None
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty_like(a)
    torch.matmul(a, b, out=out)  # warm-up: the kernel choice, the workspace
    _, seconds = timed(lambda: [torch.matmul(a, b, out=out) for _ in range(repeats)], device)
    return 2 * size**3 * repeats / seconds / 1e12
