"""The prunable structures of a Llama-style decoder, their parameter counts, and slicing them out.

Two kinds of structure per decoder layer:

- **attention group**: one KV head and the query heads that share it under GQA. Removing group g drops the
  rows of q_proj for its `n_rep` query heads, the rows of k_proj and v_proj for its KV head, and the same
  query heads' columns of o_proj. A group is the smallest unit that keeps `num_attention_heads /
  num_key_value_heads` unchanged, which transformers' `repeat_kv` relies on.
- **MLP channel**: one intermediate channel, i.e. a row of gate_proj and up_proj and a column of down_proj.

Slicing keeps the surviving structures in their original order, so a pruned model computes exactly what
the original computes with the removed structures' weights set to zero (tests/test_prune.py checks this).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from core.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama",)


@dataclass(frozen=True)
class Layout:
    """Shapes of a decoder, read from its config."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def group_params(self) -> int:
        """Weights of one attention group: q rows + k and v rows + o columns."""
        return self.head_dim * self.hidden_size * (2 * self.heads_per_group + 2)

    @property
    def channel_params(self) -> int:
        """Weights of one MLP channel: a gate row, an up row and a down column."""
        return 3 * self.hidden_size

    def layer_params(self, groups: int, channels: int) -> int:
        """Weights of one decoder layer with `groups` attention groups and `channels` MLP channels (norms too)."""
        return groups * self.group_params + channels * self.channel_params + 2 * self.hidden_size

    def embedding_params(self) -> int:
        embeddings = self.vocab_size * self.hidden_size
        return embeddings if self.tie_word_embeddings else 2 * embeddings

    def total_params(self, groups: list[int], channels: list[int]) -> int:
        """All parameters of the model (embeddings, LM head unless tied, layers, final norm)."""
        layers = sum(self.layer_params(g, c) for g, c in zip(groups, channels, strict=True))
        return self.embedding_params() + layers + self.hidden_size


def layout_of(config) -> Layout:
    """The Layout of a transformers config; a model type FineScope cannot slice fails with the fix."""
    model_type = getattr(config, "model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            "model",
            model_type,
            f"pruning supports model types {', '.join(SUPPORTED_MODEL_TYPES)} (Llama-style q/k/v/o and gate/up/down)",
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ConfigError("model", model_type, "projections with biases are not supported by the slicer")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Layout(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_decoder().layers


def query_rows(layout: Layout, groups: list[int] | torch.Tensor) -> torch.Tensor:
    """Row indices of q_proj (= column indices of o_proj) that belong to the given attention groups."""
    heads = [g * layout.heads_per_group + h for g in _as_list(groups) for h in range(layout.heads_per_group)]
    return _head_rows(heads, layout.head_dim)


def kv_rows(layout: Layout, groups: list[int] | torch.Tensor) -> torch.Tensor:
    """Row indices of k_proj and v_proj that belong to the given attention groups."""
    return _head_rows(_as_list(groups), layout.head_dim)


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    if not heads:
        return torch.empty(0, dtype=torch.long)
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def _as_list(indices: list[int] | torch.Tensor) -> list[int]:
    return sorted(int(i) for i in indices)


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep `index` along `dim` of a bias-free Linear's weight (0: output rows, 1: input columns), in place."""
    weight = linear.weight.data.index_select(dim, index.to(linear.weight.device)).clone()
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    linear.out_features, linear.in_features = weight.shape


@torch.no_grad()
def slice_layer(layer: nn.Module, layout: Layout, keep_groups: list[int], keep_channels: list[int]) -> None:
    """Cut one decoder layer down to `keep_groups` attention groups and `keep_channels` MLP channels."""
    if not keep_groups:
        raise ValueError("a layer needs at least one attention group")
    attention, mlp = layer.self_attn, layer.mlp
    q_index, kv_index = query_rows(layout, keep_groups), kv_rows(layout, keep_groups)
    _slice_linear(attention.q_proj, q_index, 0)
    _slice_linear(attention.k_proj, kv_index, 0)
    _slice_linear(attention.v_proj, kv_index, 0)
    _slice_linear(attention.o_proj, q_index, 1)
    # The grouping ratio is unchanged, so repeat_kv still pairs each query head with its own KV head.
    attention.num_key_value_groups = layout.heads_per_group
    channel_index = torch.tensor(sorted(keep_channels), dtype=torch.long)
    _slice_linear(mlp.gate_proj, channel_index, 0)
    _slice_linear(mlp.up_proj, channel_index, 0)
    _slice_linear(mlp.down_proj, channel_index, 1)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep_channels)


def slice_structures(model: nn.Module, keep_groups: list[list[int]], keep_channels: list[list[int]]) -> nn.Module:
    """Slice every decoder layer in place and, when the sizes are uniform, update the config to match.

    Uniform sizes are what a standard Hugging Face config describes (one `num_key_value_heads` and one
    `intermediate_size` for every layer), and what transformers and vLLM load without custom code.
    """
    layout = layout_of(model.config)
    layers = decoder_layers(model)
    for layer, groups, channels in zip(layers, keep_groups, keep_channels, strict=True):
        slice_layer(layer, layout, groups, channels)
    group_counts = {len(groups) for groups in keep_groups}
    channel_counts = {len(channels) for channels in keep_channels}
    if len(group_counts) == 1 and len(channel_counts) == 1:
        (groups,), (channels,) = group_counts, channel_counts
        model.config.num_key_value_heads = groups
        model.config.num_attention_heads = groups * layout.heads_per_group
        # Set explicitly: hidden_size // num_attention_heads no longer equals the head size.
        model.config.head_dim = layout.head_dim
        model.config.intermediate_size = channels
    return model


def is_uniform(keep_groups: list[list[int]], keep_channels: list[list[int]]) -> bool:
    return len({len(g) for g in keep_groups}) == 1 and len({len(c) for c in keep_channels}) == 1


def count_params(model: nn.Module) -> int:
    """Unique parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
