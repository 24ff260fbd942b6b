"""Tiny models of every family pruning supports, built from their transformers config classes, and the
masking reference that a sliced model must equal."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]


def family_config(family: str, vocab_size: int, pad: int, bos: int, eos: int, num_layers: int = 3, **extra):
    """Hidden 64, 2 KV groups of 2 query heads, MLP 128. Qwen3 and Gemma have head_dim 24 (not 64 / 4 = 16);
    the sliding-window families have windows of 4 tokens, shorter than the test inputs; Gemma 2 keeps its
    attention softcapping on (at 5, so that it bites on these weights)."""
    from conftest import TINY_SHAPE
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(
        vocab_size=vocab_size,
        num_hidden_layers=num_layers,
        **TINY_SHAPE,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
    )
    layer_types = (SLIDING * num_layers)[:num_layers]
    settings = {
        # Real Llama checkpoints have no biases; the flags exist, so the slicer must honour them.
        "llama": (LlamaConfig, dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
        "mistral": (MistralConfig, dict(tie_word_embeddings=False, sliding_window=4)),
        "qwen2": (
            Qwen2Config,
            dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=4, layer_types=layer_types),
        ),
        "qwen3": (Qwen3Config, dict(tie_word_embeddings=False, head_dim=24)),
        "gemma2": (
            Gemma2Config,
            dict(
                head_dim=24,
                query_pre_attn_scalar=24,
                sliding_window=4,
                layer_types=layer_types,
                attn_logit_softcapping=5.0,
                final_logit_softcapping=30.0,
                tie_word_embeddings=True,
            ),
        ),
        "gemma3_text": (
            Gemma3TextConfig,
            dict(
                head_dim=24,
                query_pre_attn_scalar=24,
                sliding_window=4,
                layer_types=layer_types,
                tie_word_embeddings=True,
            ),
        ),
        "phi3": (Phi3Config, dict(tie_word_embeddings=False)),
    }
    config_class, options = settings[family]
    return config_class(**{**common, **options, **extra})


def build_family_model(family: str, vocab_size: int, pad: int, bos: int, eos: int, seed: int = 0, **extra):
    """A tiny causal LM of `family` in eval mode, every parameter drawn at 0.2 standard deviation (norm
    weights included), so that every structure and every norm changes the logits."""
    from transformers import AutoModelForCausalLM

    config = family_config(family, vocab_size, pad, bos, eos, **extra)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


def save_family_model(family: str, tokenizer, directory: Path, **extra) -> str:
    """A tiny checkpoint of `family` with the given tokenizer, as a Hugging Face directory."""
    model = build_family_model(
        family, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, **extra
    )
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@contextlib.contextmanager
def masked(model: nn.Module, keep_groups: list[list[int]], keep_channels: list[list[int]]) -> Iterator[nn.Module]:
    """The unpruned model with the removed structures zeroed where they meet the residual stream: the outputs
    of the removed KV groups' query heads (o_proj's input columns) and the removed MLP channels (down_proj's
    input). Independent of how any family stores q, k and v: query head h of a group of n sits at group
    h // n, as transformers' repeat_kv pairs them."""
    config = model.config
    per_group = config.num_attention_heads // config.num_key_value_heads
    width = head_dim(config)
    handles = []
    for layer, groups, channels in zip(model.get_decoder().layers, keep_groups, keep_channels, strict=True):
        head_mask = torch.zeros(config.num_attention_heads * width)
        for group in groups:
            head_mask[group * per_group * width : (group + 1) * per_group * width] = 1
        channel_mask = torch.zeros(config.intermediate_size)
        channel_mask[sorted(channels)] = 1
        for module, mask in ((layer.self_attn.o_proj, head_mask), (layer.mlp.down_proj, channel_mask)):
            handles.append(module.register_forward_pre_hook(lambda _, args, mask=mask: (args[0] * mask,)))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
