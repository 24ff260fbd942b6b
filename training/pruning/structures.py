"""The prunable structures of a decoder-only transformer, described per model family; their parameter counts;
slicing them out.

Two kinds of structure per decoder layer:

- **attention group**: one KV head and the query heads that share it under GQA. Removing group g drops its
  `n_rep` query heads' rows of the query projection, its KV head's rows of the key and value projections
  (with their biases, where the family has them) and the same query heads' columns of o_proj. A group is the
  smallest unit that keeps `num_attention_heads / num_key_value_heads` unchanged, which transformers'
  `repeat_kv` relies on.
- **MLP channel**: one intermediate channel, i.e. a row of the gate and up projections and a column of
  down_proj.

A family is a description (:class:`Family`), not code: which linear layers hold these structures and how
they are stacked along the cut axis (Phi-3 fuses q, k and v into `qkv_proj` and gate and up into
`gate_up_proj`), which config flag gives them biases, which per-head norms a layer has and how many
hidden-size norms. One slicer, one importance reducer and one parameter count read every description.

Slicing keeps the surviving structures in their original order, so a pruned model computes exactly what the
original computes with the removed heads' outputs and the removed channels zeroed
(tests/training/test_prune.py checks this for every family).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from core.errors import ConfigError

QUERY, KV, CHANNEL = "q", "kv", "channel"
"""What a block of a projection's cut axis holds: the query heads (in KV-group order), one head per KV group
(a K or a V block), or the MLP's intermediate channels."""


@dataclass(frozen=True)
class Projection:
    """A linear layer of a decoder layer that pruning cuts, and what its cut axis holds.

    `parts` are the blocks stacked along the cut axis, in order: Llama's q_proj is (q,), Phi-3's qkv_proj rows
    are (q, kv, kv) and its gate_up_proj rows (channel, channel). `axis` 0 cuts output rows (and the bias with
    them); 1 cuts input columns (the bias, on the output, stays whole). `bias`: whether the layer has one,
    always (True), never (False), or as the config flag of that name says.
    """

    path: str
    parts: tuple[str, ...]
    axis: int
    bias: bool | str = False


@dataclass(frozen=True)
class Family:
    """What pruning needs to know about one model family's decoder layer."""

    projections: tuple[Projection, ...]
    head_norms: tuple[str, ...] = ()
    """Norms over one head's dimensions, shared by every head (q_norm, k_norm): they stay whole."""
    layer_norms: int = 2
    """Hidden-size norms per layer: input and post-attention; Gemma adds pre- and post-feedforward ones."""
    attention: str = "self_attn"
    mlp: str = "mlp"
    heads_in_config: bool = False
    """The attention reads its head count from the config while it runs (Phi-3 splits qkv_proj's output by it)."""
    rope_factors_fix_heads: bool = False
    """The config checks its RoPE scaling factors against hidden_size / num_attention_heads (Phi-3's longrope)."""


def _attention(qkv_bias: bool | str, o_bias: bool | str) -> tuple[Projection, ...]:
    return (
        Projection("self_attn.q_proj", (QUERY,), 0, qkv_bias),
        Projection("self_attn.k_proj", (KV,), 0, qkv_bias),
        Projection("self_attn.v_proj", (KV,), 0, qkv_bias),
        Projection("self_attn.o_proj", (QUERY,), 1, o_bias),
    )


def _mlp(bias: bool | str = False) -> tuple[Projection, ...]:
    return (
        Projection("mlp.gate_proj", (CHANNEL,), 0, bias),
        Projection("mlp.up_proj", (CHANNEL,), 0, bias),
        Projection("mlp.down_proj", (CHANNEL,), 1, bias),
    )


_QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")

# Module names and biases as transformers 5.24 defines them (models/<family>/modeling_<family>.py).
FAMILIES: dict[str, Family] = {
    "llama": Family(_attention("attention_bias", "attention_bias") + _mlp("mlp_bias")),
    "mistral": Family(_attention(False, False) + _mlp()),
    "qwen2": Family(_attention(True, False) + _mlp()),
    "qwen3": Family(_attention("attention_bias", "attention_bias") + _mlp(), head_norms=_QK_NORMS),
    "gemma2": Family(_attention("attention_bias", "attention_bias") + _mlp(), layer_norms=4),
    "gemma3_text": Family(_attention("attention_bias", "attention_bias") + _mlp(), head_norms=_QK_NORMS, layer_norms=4),
    "phi3": Family(
        (
            Projection("self_attn.qkv_proj", (QUERY, KV, KV), 0),
            Projection("self_attn.o_proj", (QUERY,), 1),
            Projection("mlp.gate_up_proj", (CHANNEL, CHANNEL), 0),
            Projection("mlp.down_proj", (CHANNEL,), 1),
        ),
        heads_in_config=True,
        rope_factors_fix_heads=True,
    ),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

_MOE_TYPES = ("mixtral", "dbrx", "jamba", "deepseek_v2", "deepseek_v3", "arctic", "minimax", "gpt_oss")
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")
_MOE = "is a mixture-of-experts model: its MLP is a router over many experts, and pruning cuts only dense MLPs"
_MULTIMODAL = (
    "is a multimodal checkpoint (a vision tower and a text model nested under text_config); pruning takes "
    "text-only checkpoints: for Gemma 3, a gemma3_text one such as gemma-3-1b"
)


def refusal(model_type: str) -> str | None:
    """Why a model type cannot be pruned, or None when it can (or when only its config can tell)."""
    if model_type in FAMILIES:
        return None
    if "moe" in model_type or model_type in _MOE_TYPES:
        return _MOE
    if model_type == "gemma3":
        return _MULTIMODAL
    return f"is not a family pruning slices; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"


@dataclass(frozen=True)
class Layout:
    """Shapes of a decoder, read from its config, and the family that says where they live."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    model_type: str
    biases: tuple[bool, ...]
    """Per projection of the family, whether this model's has a bias."""
    fixed_groups: str | None = None
    """Why every attention group must stay, when one must (then only MLP channels are cut)."""

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def part_shape(self, part: str) -> tuple[int, int]:
        """(structures, rows per structure) of one block of a cut axis."""
        if part == QUERY:
            return self.num_kv_heads, self.heads_per_group * self.head_dim
        if part == KV:
            return self.num_kv_heads, self.head_dim
        return self.intermediate_size, 1

    def _structure_params(self, parts: tuple[str, ...]) -> int:
        """Weights and biases of one structure made of these kinds of block, over every sliced projection."""
        total = 0
        for projection, biased in zip(self.family.projections, self.biases, strict=True):
            rows = sum(self.part_shape(part)[1] for part in projection.parts if part in parts)
            total += rows * (self.hidden_size + int(biased and projection.axis == 0))
        return total

    @property
    def group_params(self) -> int:
        """Parameters of one attention group: q rows + k and v rows (with their biases) + o columns."""
        return self._structure_params((QUERY, KV))

    @property
    def channel_params(self) -> int:
        """Parameters of one MLP channel: a gate row, an up row, a down column (and gate and up biases)."""
        return self._structure_params((CHANNEL,))

    @property
    def fixed_layer_params(self) -> int:
        """Parameters of a layer that no cut touches: its norms and the biases of o_proj and down_proj."""
        family = self.family
        biases = sum(
            self.hidden_size
            for projection, biased in zip(family.projections, self.biases, strict=True)
            if biased and projection.axis == 1
        )
        return family.layer_norms * self.hidden_size + len(family.head_norms) * self.head_dim + biases

    def layer_params(self, groups: int, channels: int) -> int:
        """Parameters of one decoder layer with `groups` attention groups and `channels` MLP channels."""
        return groups * self.group_params + channels * self.channel_params + self.fixed_layer_params

    def embedding_params(self) -> int:
        embeddings = self.vocab_size * self.hidden_size
        return embeddings if self.tie_word_embeddings else 2 * embeddings

    def total_params(self, groups: list[int], channels: list[int]) -> int:
        """All parameters of the model (embeddings, LM head unless tied, layers, final norm)."""
        layers = sum(self.layer_params(g, c) for g, c in zip(groups, channels, strict=True))
        return self.embedding_params() + layers + self.hidden_size

    def full_params(self) -> int:
        """All parameters of the unpruned model."""
        return self.total_params([self.num_kv_heads] * self.num_layers, [self.intermediate_size] * self.num_layers)


def layout_of(config) -> Layout:
    """The Layout of a transformers config; a model FineScope cannot slice fails with the reason."""
    model_type = getattr(config, "model_type", "")
    reason = refusal(model_type) or _config_refusal(config)
    if reason:
        raise ConfigError("model", model_type, reason)
    family = FAMILIES[model_type]
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        raise ConfigError("model", model_type, f"has {heads} query heads over {kv_heads} KV heads, not whole groups")
    return Layout(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        model_type=model_type,
        biases=tuple(_has_bias(config, projection.bias) for projection in family.projections),
        fixed_groups=_fixed_groups(config, family),
    )


def _config_refusal(config) -> str | None:
    """Why a config of a supported type still cannot be sliced (experts, a nested text model), or None."""
    if any(getattr(config, key, None) for key in _EXPERT_KEYS):
        return _MOE
    if getattr(config, "text_config", None) is not None:
        return _MULTIMODAL
    return None


def _has_bias(config, bias: bool | str) -> bool:
    return bool(getattr(config, bias, False)) if isinstance(bias, str) else bias


def _fixed_groups(config, family: Family) -> str | None:
    """Why this model's attention groups cannot be cut, or None."""
    rope = getattr(config, "rope_parameters", None) or {}
    if family.rope_factors_fix_heads and (rope.get("short_factor") or rope.get("long_factor")):
        # transformers refuses such a config once num_attention_heads changes, so the checkpoint would not load.
        return (
            "keeps every attention group: its config checks the longrope factors against hidden_size / "
            "num_attention_heads, so a checkpoint with fewer heads would not load; only MLP channels are cut"
        )
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_decoder().layers


def module_at(layer: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path of a decoder layer, e.g. `self_attn.q_proj`."""
    return layer.get_submodule(path)


def axis_index(layout: Layout, parts: tuple[str, ...], groups: list[int], channels: list[int]) -> torch.Tensor:
    """Indices along a cut axis made of `parts` that belong to the given attention groups and MLP channels."""
    pieces, offset = [], 0
    for part in parts:
        count, width = layout.part_shape(part)
        units = torch.tensor(_as_list(channels if part == CHANNEL else groups), dtype=torch.long)
        pieces.append(offset + (units[:, None] * width + torch.arange(width)[None, :]).flatten())
        offset += count * width
    return torch.cat(pieces)


def structure_sums(layout: Layout, parts: tuple[str, ...], scores: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Per-row scores along a cut axis made of `parts`, summed per structure: (part, (structures,)) per block."""
    sums, offset = [], 0
    for part in parts:
        count, width = layout.part_shape(part)
        sums.append((part, scores[offset : offset + count * width].view(count, width).sum(1)))
        offset += count * width
    if offset != scores.shape[0]:
        raise ValueError(f"a cut axis of {scores.shape[0]} rows does not hold {parts} of this layout ({offset})")
    return sums


def _as_list(indices: list[int] | torch.Tensor) -> list[int]:
    return sorted(int(i) for i in indices)


def _slice_linear(linear: nn.Linear, index: torch.Tensor, axis: int) -> None:
    """Keep `index` along `axis` of a Linear (0: output rows and the bias, 1: input columns), in place."""
    index = index.to(linear.weight.device)
    weight = linear.weight.data.index_select(axis, index).clone()
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if axis == 0 and linear.bias is not None:
        bias = linear.bias.data.index_select(0, index).clone()
        linear.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    linear.out_features, linear.in_features = weight.shape


@torch.no_grad()
def slice_layer(layer: nn.Module, layout: Layout, keep_groups: list[int], keep_channels: list[int]) -> None:
    """Cut one decoder layer down to `keep_groups` attention groups and `keep_channels` MLP channels."""
    if not keep_groups:
        raise ValueError("a layer needs at least one attention group")
    family = layout.family
    for projection in family.projections:
        index = axis_index(layout, projection.parts, keep_groups, keep_channels)
        _slice_linear(module_at(layer, projection.path), index, projection.axis)
    attention, mlp = module_at(layer, family.attention), module_at(layer, family.mlp)
    # The grouping ratio is unchanged, so repeat_kv still pairs each query head with its own KV head.
    attention.num_key_value_groups = layout.heads_per_group
    if hasattr(attention, "num_key_value_heads"):
        attention.num_key_value_heads = len(keep_groups)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep_channels)


def slice_structures(model: nn.Module, keep_groups: list[list[int]], keep_channels: list[list[int]]) -> nn.Module:
    """Slice every decoder layer in place and, when the sizes are uniform, update the config to match.

    Uniform sizes are what a standard Hugging Face config describes (one `num_key_value_heads` and one
    `intermediate_size` for every layer), and what transformers and vLLM load without custom code. Layers of
    other sizes run in memory; where the attention reads its head count from the config, each such layer
    gets a config of its own sizes.
    """
    layout = layout_of(model.config)
    layers = decoder_layers(model)
    for layer, groups, channels in zip(layers, keep_groups, keep_channels, strict=True):
        slice_layer(layer, layout, groups, channels)
    if is_uniform(keep_groups, keep_channels):
        _set_sizes(model.config, layout, len(keep_groups[0]), len(keep_channels[0]))
    elif layout.family.heads_in_config:
        for layer, groups, channels in zip(layers, keep_groups, keep_channels, strict=True):
            attention = module_at(layer, layout.family.attention)
            attention.config = copy.copy(model.config)
            _set_sizes(attention.config, layout, len(groups), len(channels))
    return model


def _set_sizes(config, layout: Layout, groups: int, channels: int) -> None:
    # Set explicitly: hidden_size // num_attention_heads no longer equals the head size.
    config.head_dim = layout.head_dim
    config.num_key_value_heads = groups
    config.num_attention_heads = groups * layout.heads_per_group
    config.intermediate_size = channels


def is_uniform(keep_groups: list[list[int]], keep_channels: list[list[int]]) -> bool:
    return len({len(g) for g in keep_groups}) == 1 and len({len(c) for c in keep_channels}) == 1


def count_params(model: nn.Module) -> int:
    """Unique parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
